import errno
import io
import threading
import time

import pytest
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
    assert checkpoint.candidates(tmp_path) == [path]  # the unusable ones are set aside, never counted again
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "set_aside" / "1").iterdir()) == [
        "step_00000002.pt", "step_00000002.pt.sha256", "step_00000003.pt", "step_00000003.pt.sha256"]


def test_a_resume_past_corrupt_checkpoints_never_loses_the_one_it_writes(tmp_path):
    """With keep=1, counting a corrupt newer file as complete made each save delete the one it had just written."""
    for step in (3, 6):
        checkpoint.save(tmp_path, step, _state(step), keep=2)
    corrupt = checkpoint.path_for(tmp_path, 6)
    corrupt.write_bytes(corrupt.read_bytes()[:-10])
    state, _ = checkpoint.load_latest(tmp_path, log=lambda m: None)
    assert state["step"] == 3
    for step in (4, 5):
        written = checkpoint.save(tmp_path, step, _state(step), keep=1)
        assert checkpoint.candidates(tmp_path) == [written] and checkpoint.verify(written) is None


def test_an_older_step_written_after_a_newer_one_is_kept(tmp_path):
    checkpoint.save(tmp_path, 9, _state(9), keep=1)
    written = checkpoint.save(tmp_path, 4, _state(4), keep=1)  # e.g. a newer file that was never verified
    assert written in checkpoint.candidates(tmp_path)


def test_when_no_checkpoint_is_usable_the_run_is_refused_not_restarted(tmp_path):
    """The refusal stays: the unusable files are set aside, so a later start that trusted the empty folder
    would train from step 0. Until the user deletes REFUSED (or starts afresh), every start is refused."""
    checkpoint.save(tmp_path, 2, _state(2), keep=2)
    path = checkpoint.path_for(tmp_path, 2)
    path.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint is usable \(step_00000002.pt: checksum"):
        checkpoint.load_latest(tmp_path, log=lambda m: None)
    marker = tmp_path / "checkpoints" / checkpoint.REFUSED
    for _ in range(2):
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load_latest(tmp_path, log=pytest.fail)
        assert str(e.value).startswith(f"{marker}: resume refused by an earlier start: no checkpoint is usable (")
        assert "--run.fresh true" in str(e.value) and f"delete {marker}" in str(e.value) and "\n" not in str(e.value)
    marker.unlink()  # the user's act: the run may start from step 0
    assert checkpoint.load_latest(tmp_path) is None


def test_what_is_set_aside_twice_under_one_name_keeps_both_copies(tmp_path):
    copies = []
    for attempt in (b"first", b"second"):
        checkpoint.save(tmp_path, 1, _state(1), keep=2)
        checkpoint.save(tmp_path, 2, _state(2), keep=2)
        checkpoint.path_for(tmp_path, 2).write_bytes(attempt)
        state, _ = checkpoint.load_latest(tmp_path, log=lambda m: None)
        assert state["step"] == 1
        copies.append(attempt)
    assert sorted(p.read_bytes() for p in (tmp_path / "checkpoints" / "set_aside").rglob("step_00000002.pt")) == copies


def test_run_fresh_sets_aside_once_per_job(tmp_path):
    """A requeued job repeats `--run.fresh true`; only its first start may set the run's checkpoints aside."""
    checkpoint.save(tmp_path, 5, _state(5), keep=2)
    assert [p.name for p in checkpoint.start_fresh(tmp_path, "SLURM_JOB_ID=7")] == ["step_00000005.pt"]
    checkpoint.save(tmp_path, 1, _state(1), keep=2)  # what the fresh start saved before it was requeued
    assert checkpoint.start_fresh(tmp_path, "SLURM_JOB_ID=7") is None
    assert checkpoint.load_latest(tmp_path)[0]["step"] == 1
    assert [p.name for p in checkpoint.start_fresh(tmp_path, "SLURM_JOB_ID=8")] == ["step_00000001.pt"]
    assert [p.name for p in checkpoint.start_fresh(tmp_path, None)] == []  # a plain process always starts afresh
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "set_aside").iterdir()) == ["1", "2"]  # none for nothing


def test_a_checkpoint_whose_pickle_would_run_code_is_rejected_unexecuted(tmp_path):
    import hashlib
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "ran"),))
    checkpoint.save(tmp_path, 1, _state(1), keep=5)
    path = checkpoint.path_for(tmp_path, 2)
    path.write_bytes(pickle.dumps({"step": 2, "x": Boom()}))
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    messages = []
    state, _ = checkpoint.load_latest(tmp_path, log=messages.append)
    assert state["step"] == 1 and "does not load" in messages[0] and not (tmp_path / "ran").exists()


def test_leftovers_of_killed_saves_are_removed(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1), keep=5)
    stale = tmp_path / "checkpoints" / ".step_00000002.pt.4242.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert checkpoint.remove_temporaries(tmp_path) == [stale] and not stale.exists()


@pytest.mark.parametrize("code", ["ENOLCK", "ENOSYS"])
def test_a_filesystem_that_refuses_flock_leaves_the_run_directory_unprotected_with_one_line(refusing_flock, code):
    """A FUSE filesystem whose flock fails as NFS without lockd (ENOLCK) or Lustre mounted noflock (ENOSYS) does:
    the run goes on, and says so once."""
    run = refusing_flock(getattr(errno, code))
    lines = []
    with checkpoint.locked(run, log=lines.append):
        with checkpoint.locked(run, log=lines.append):  # nothing stops a second run there
            pass
    assert lines == [f"{run}: unprotected: its filesystem refused flock ({code}), so nothing stops a second run "
                     "from writing here at the same time (docs/reliability.md#shared-filesystems)"] * 2


def test_any_other_lock_failure_is_one_line_naming_the_file(refusing_flock):
    run = refusing_flock(errno.EIO)
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{run}/.lock: cannot lock \(EIO: Input/output error\)$"):
        with checkpoint.locked(run, log=pytest.fail):
            pass


def test_a_run_directory_is_held_by_one_run(tmp_path):
    with checkpoint.locked(tmp_path):
        with pytest.raises(checkpoint.CheckpointError, match=r"in use by another run \(pid \d+ on "):
            with checkpoint.locked(tmp_path):
                pass
    with checkpoint.locked(tmp_path):  # released with its holder
        pass


def test_unfinished_save_without_checksum_is_ignored(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1), keep=5)
    torch.save(_state(2), checkpoint.path_for(tmp_path, 2))  # as if killed before the checksum was written
    state, _ = checkpoint.load_latest(tmp_path, log=lambda m: None)
    assert state["step"] == 1
    assert checkpoint.resolve(tmp_path) == checkpoint.path_for(tmp_path, 1)


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert checkpoint.load_latest(tmp_path) is None



def _hold_writes(monkeypatch, before_serialising: bool) -> threading.Event:
    """From now on checkpoint writes stop until the returned event is set, as a slow file system holds them:
    before serialising the state, or after, with the temporary file complete but not yet renamed."""
    release, save = threading.Event(), torch.save

    def held(obj, f, *args, **kwargs):
        if before_serialising:
            assert release.wait(timeout=60), "the write was never released"
        save(obj, f, *args, **kwargs)
        assert release.wait(timeout=60), "the write was never released"
    monkeypatch.setattr(torch, "save", held)
    return release


def _temporaries(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".step_*.tmp"))


def test_a_background_write_holds_the_state_as_it_was_when_the_save_began(tmp_path, monkeypatch):
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    state = {"step": 1, "model": model.state_dict(), "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    reference = io.BytesIO()
    torch.save(state, reference)  # what a blocking save writes
    release = _hold_writes(monkeypatch, before_serialising=True)
    with checkpoint.Writer() as writer:
        writer.start(tmp_path, 1, state, keep=2)
        with torch.no_grad():
            model.weight.zero_()  # the next steps change the live state in place while the write waits
        state["groups"][0]["lr"] = 0.2
        assert checkpoint.candidates(tmp_path) == []
        release.set()
    written = checkpoint.path_for(tmp_path, 1)
    assert written.read_bytes() == reference.getvalue() and checkpoint.verify(written) is None


def test_while_a_write_is_in_flight_the_previous_checkpoint_is_the_newest_and_pruning_waits(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, _state(1), keep=1)
    release = _hold_writes(monkeypatch, before_serialising=False)
    with checkpoint.Writer() as writer:
        writer.start(tmp_path, 2, _state(2), keep=1)
        deadline = time.monotonic() + 60
        while not _temporaries(tmp_path):  # serialised, not yet renamed: where a kill leaves a save half-way
            assert time.monotonic() < deadline
            time.sleep(0.01)
        state, path = checkpoint.load_latest(tmp_path, log=pytest.fail)
        assert state["step"] == 1 and checkpoint.candidates(tmp_path) == [path]
        release.set()
    assert checkpoint.candidates(tmp_path) == [checkpoint.path_for(tmp_path, 2)] and not _temporaries(tmp_path)
    assert checkpoint.load_latest(tmp_path)[0]["step"] == 2


def test_a_save_with_a_deadline_abandons_a_write_still_in_flight_and_writes_nothing(tmp_path, monkeypatch):
    """The stop's save (`loop.STOP_WAIT_S`): the previous complete checkpoint stays the newest."""
    checkpoint.save(tmp_path, 1, _state(1), keep=1)
    release = _hold_writes(monkeypatch, before_serialising=False)
    writer = checkpoint.Writer()
    writer.start(tmp_path, 2, _state(2), keep=1)
    began = time.monotonic()
    assert writer.start(tmp_path, 3, _state(3), keep=1, wait_s=0.5) is False
    assert 0.5 <= time.monotonic() - began < 5
    assert writer.wait() and checkpoint.candidates(tmp_path) == [checkpoint.path_for(tmp_path, 1)]
    assert [t.daemon for t in threading.enumerate() if t.name == "checkpoint-writer"] == [True]  # ends with us
    release.set()


def test_a_failed_background_write_is_raised_by_the_next_save_once(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # no run directory can be made under a file
    writer = checkpoint.Writer()
    writer.start(blocker, 1, _state(1), keep=2)  # returns at once; the failure comes later
    pattern = r"^.*file/checkpoints/step_00000001.pt: writing the checkpoint failed \((NotADirectoryError|FileExistsError)"
    with pytest.raises(checkpoint.CheckpointError, match=pattern) as e:
        writer.start(tmp_path, 2, _state(2), keep=2)
    assert "\n" not in str(e.value) and checkpoint.candidates(tmp_path) == []  # step 2 was not started
    writer.wait()  # raised once
    writer.start(tmp_path, 3, _state(3), keep=2)
    writer.wait()
    assert checkpoint.load_latest(tmp_path)[0]["step"] == 3


def test_a_failed_write_is_raised_at_exit_or_reported_beside_the_error_that_ends_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="step_00000001.pt: writing the checkpoint failed"), \
            checkpoint.Writer() as writer:
        writer.start(blocker, 1, _state(1), keep=2)
    with pytest.raises(FloatingPointError, match="the run's own error"), checkpoint.Writer() as writer:
        writer.start(blocker, 2, _state(2), keep=2)
        raise FloatingPointError("the run's own error")
    assert "step_00000002.pt: writing the checkpoint failed" in capsys.readouterr().err


def test_a_blocking_writer_writes_before_it_returns_and_raises_at_once(tmp_path):
    writer = checkpoint.Writer(background=False)
    writer.start(tmp_path, 1, _state(1), keep=2)
    assert checkpoint.verify(checkpoint.path_for(tmp_path, 1)) is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="writing the checkpoint failed"):
        writer.start(blocker, 2, _state(2), keep=2)
