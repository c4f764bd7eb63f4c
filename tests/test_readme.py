import re

from conftest import REPO, load_tool


def test_config_reference_in_readme_matches_the_code():
    tool = load_tool("config_reference")
    text = (REPO / "README.md").read_text()
    assert tool.render(text) == text, "README's config reference is stale: run tools/config_reference.py"


def test_readme_names_only_files_that_exist():
    text = (REPO / "README.md").read_text()
    for path in set(re.findall(r"`((?:jobs|slurm|tools|docs|ddpdiff)/[\w./-]+\.(?:py|sh|yaml|md))`", text)):
        assert (REPO / path).is_file(), path
    for name in re.findall(r"`(\w+\.yaml)`", text):
        assert (REPO / "jobs" / "configs" / name).is_file(), name


def test_readme_python_example_runs(diffusion_run, sr_run):
    """The README's Python example, on the smoke runs instead of runs/celeba64 and runs/sr."""
    import torch

    block = next(b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
                 if "Pipeline.from_checkpoint" in b)
    code = block.replace('"runs/celeba64"', repr(str(diffusion_run))).replace('"runs/sr"', repr(str(sr_run)))
    scope = {}
    exec(code, scope)
    assert scope["faces"].shape == (8, 3, 64, 64) and scope["big"].shape == (8, 3, 512, 512)
    assert scope["faces"].min() >= -1 and scope["faces"].max() <= 1 and not torch.equal(scope["faces"][0], scope["faces"][1])


def test_readme_export_example_runs(diffusion_run, tmp_path, monkeypatch):
    """The README's five-line notebook example, on the smoke run exported where the example looks for it."""
    from PIL import Image

    from ddpdiff import export

    block = next(b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
                 if "Pipeline.from_pretrained" in b)
    assert len(block.strip().splitlines()) == 5
    assert export.main(["--checkpoint", str(diffusion_run), "--out", str(tmp_path / "celeba64.safetensors")]) == 0
    monkeypatch.chdir(tmp_path)
    exec(block, {})
    faces = [Image.open(tmp_path / f"face{i}.png") for i in range(2)]
    assert [f.size for f in faces] == [(64, 64)] * 2 and faces[0].tobytes() != faces[1].tobytes()


def test_one_shard_path_for_celeba():
    """The configs that train on CelebA and every README command read the shards where step 2 writes them."""
    import yaml

    path = "data/celeba/shards"
    for name in ("celeba64.yaml", "sr.yaml", "classifier.yaml"):
        assert yaml.safe_load((REPO / "jobs" / "configs" / name).read_text())["data"]["shards"] == path, name
    text = (REPO / "README.md").read_text()
    used = re.findall(r"(?:--data\.shards|--out|slurm/shard\.sh \S+) (\S*shards)\b", text)
    assert used and set(used) == {path}, used
