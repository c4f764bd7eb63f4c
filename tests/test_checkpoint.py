import torch

from ddpdiff import checkpoint


def _state(step):
    return {"step": step, "model": {"w": torch.full((3,), float(step))}}


def test_save_load_roundtrip_with_weights_only(tmp_path):
    path = checkpoint.save(tmp_path, 7, _state(7), keep=3)
    assert path.name == "step_00000007.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.full((3,), 7.0))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_keep_prunes_oldest_after_the_new_one_is_safe(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, _state(step), keep=2)
    assert [p.name for p in checkpoint.candidates(tmp_path)] == ["step_00000004.pt", "step_00000003.pt"]
    assert len(list((tmp_path / "checkpoints").glob("*.sha256"))) == 2


def test_truncated_or_corrupt_newest_falls_back_to_previous(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _state(step), keep=5)
    newest = checkpoint.path_for(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:100])
    middle = checkpoint.path_for(tmp_path, 2)
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    middle.write_bytes(bytes(data))
    messages = []
    state, path = checkpoint.load_latest(tmp_path, log=messages.append)
    assert state["step"] == 1 and path == checkpoint.path_for(tmp_path, 1)
    assert len(messages) == 2 and "step_00000003.pt" in messages[0] and "checksum" in messages[0]


def test_unfinished_save_without_checksum_is_ignored(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1), keep=5)
    torch.save(_state(2), checkpoint.path_for(tmp_path, 2))  # as if killed before the checksum was written
    state, _ = checkpoint.load_latest(tmp_path, log=lambda m: None)
    assert state["step"] == 1
    assert checkpoint.resolve(tmp_path) == checkpoint.path_for(tmp_path, 1)


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert checkpoint.load_latest(tmp_path) is None
