"""Exported weights (`python -m ddpdiff.export`, ddpdiff/weights.py): what the file holds, the same images as the
checkpoint wherever a checkpoint is accepted, and one line for a file that cannot be used."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddpdiff import checkpoint, export, sample, weights
from ddpdiff import eval as ev
from ddpdiff.atomic import sha256_file
from ddpdiff.images import to_uint8
from ddpdiff.models import ClassifierMeta, DenoiserMeta, SRMeta
from ddpdiff.pipeline import Pipeline, load_network

PROMPTS = ["Photo of person eyeglasses, smiling.", "Photo of person blond hair."]
# 8-bit pixel differences between the images of a bf16/fp16 export and its checkpoint's (same prompts, 3 DDIM
# steps), measured on the smoke model over seeds 3, 0, 1: bf16 max 14/22/24 levels, mean 0.0018/0.0032/0.0034;
# fp16 max 4/6/3, mean 0.0004/0.0006/0.0006. The smoke model is untrained and 99.4% of its pixels saturate at
# 0 or 255 (identical in both), so the means are over mostly equal pixels. The bounds (seed 3 here) leave room
# for other CPUs' rounding; README "Export" states the same figures.
TOLERANCE = {"bf16": (32, 0.01), "fp16": (8, 0.002)}


@pytest.fixture(scope="module")
def exported(diffusion_run, sr_run, classifier_run, tmp_path_factory):
    """Every kind of run exported in every dtype: {(name, dtype): file}."""
    out = tmp_path_factory.mktemp("exported")
    files = {}
    for name, run in (("diffusion", diffusion_run), ("sr", sr_run), ("classifier", classifier_run)):
        for dtype in weights.DTYPES:
            files[name, dtype] = out / f"{name}_{dtype}.safetensors"
            assert export.main(["--checkpoint", str(run), "--out", str(files[name, dtype]), "--dtype", dtype]) == 0
    return files


def _images(source, **kw):
    pipe = (Pipeline.from_pretrained if str(source).endswith(".safetensors") else Pipeline.from_checkpoint)(
        source, "cpu")
    return to_uint8(pipe.sample(PROMPTS, num=2, seed=3, steps=3, **kw)).int()


def _sample_cli(source, out, *extra):
    return sample.main(["--checkpoint", str(source), "--prompt", PROMPTS[0], "--num", "2", "--steps", "2",
                        "--out", str(out), *map(str, extra)])


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), load_file(path)


@pytest.mark.parametrize("name, kind", [("diffusion", DenoiserMeta), ("sr", SRMeta), ("classifier", ClassifierMeta)])
def test_the_file_holds_the_ema_weights_config_and_meta_only(name, kind, exported, request):
    run = request.getfixturevalue(f"{name}_run")
    path = checkpoint.resolve(run)
    state = checkpoint.load(path)
    metadata, tensors = _metadata(exported[name, "fp32"])
    assert (metadata["format"], metadata["format_version"], metadata["kind"]) == ("ddpdiff-weights", "1", kind.kind)
    assert json.loads(metadata["meta"]) == state["meta"] and json.loads(metadata["config"]) == state["config"]
    assert (int(metadata["step"]), metadata["dtype"], metadata["checkpoint"]) == (state["step"], "fp32", path.name)
    assert metadata["checkpoint_sha256"] == sha256_file(path)
    assert tensors.keys() == state["ema"].keys()
    assert all(torch.equal(tensors[k], state["ema"][k]) for k in tensors)
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in tensors)  # so the EMA, not the raw
    half = _metadata(exported[name, "bf16"])[1]
    assert all(t.dtype == (torch.bfloat16 if t.is_floating_point() else state["ema"][k].dtype)
               for k, t in half.items())
    assert exported[name, "fp32"].stat().st_size < path.stat().st_size / 3  # no model copy, no Adam moments
    assert not list(exported[name, "fp32"].parent.glob(".*"))  # no temporaries left behind


def test_fp32_export_gives_the_checkpoints_images_exactly(diffusion_run, exported):
    assert torch.equal(_images(exported["diffusion", "fp32"]), _images(diffusion_run))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_export_gives_images_within_the_stated_tolerance(dtype, diffusion_run, exported):
    diff = (_images(exported["diffusion", dtype]) - _images(diffusion_run)).abs().float()
    most, mean = TOLERANCE[dtype]
    assert diff.max() <= most and diff.mean() <= mean, (dtype, diff.max().item(), diff.mean().item())


def test_sample_cli_takes_exported_model_and_upsampler_and_writes_the_same_files(diffusion_run, sr_run, exported,
                                                                                 tmp_path):
    assert _sample_cli(diffusion_run, tmp_path / "ckpt", "--upsampler", sr_run) == 0
    assert _sample_cli(exported["diffusion", "fp32"], tmp_path / "file", "--upsampler", exported["sr", "fp32"]) == 0
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.png"))
    assert "p000_s000_512.png" in names and names == sorted(p.name for p in (tmp_path / "file").glob("*.png"))
    for name in names:
        assert (tmp_path / "ckpt" / name).read_bytes() == (tmp_path / "file" / name).read_bytes(), name
    index = json.loads((tmp_path / "file" / "samples.json").read_text())
    assert (index["checkpoint"], index["upsampler"]) == (str(exported["diffusion", "fp32"]), str(exported["sr", "fp32"]))


def test_an_exported_file_is_known_by_its_content_without_the_suffix(diffusion_run, exported, tmp_path):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(exported["diffusion", "fp32"].read_bytes())
    assert weights.is_exported(renamed) and not weights.is_exported(checkpoint.resolve(diffusion_run))
    assert Pipeline.from_checkpoint(renamed, "cpu", encoder=False).step == 2


def test_classifier_export_predicts_as_its_checkpoint(classifier_run, exported):
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ckpt, meta, _ = load_network(classifier_run, ClassifierMeta, "cpu")
    file, file_meta, path = load_network(exported["classifier", "fp32"], ClassifierMeta, "cpu")
    assert file_meta == meta and path == exported["classifier", "fp32"]
    with torch.no_grad():
        assert torch.equal(file(x), ckpt(x))


@pytest.mark.slow
def test_eval_takes_exported_model_and_classifier_and_reports_the_same(diffusion_run, classifier_run, shards_dir,
                                                                        exported, tmp_path, capsys):
    reports = []
    for model, classifier, out in ((diffusion_run, classifier_run, "ckpt"),
                                   (exported["diffusion", "fp32"], exported["classifier", "fp32"], "file")):
        assert ev.main(["--checkpoint", str(model), "--data", str(shards_dir), "--classifier", str(classifier),
                        "--metrics", "attr_acc", "--num", "2", "--steps", "2", "--attributes", "visible",
                        "--no-progress", "--save-samples", str(tmp_path / out)]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["attr_acc"] == reports[1]["attr_acc"] and reports[1]["step"] == 2
    for image in sorted((tmp_path / "ckpt").iterdir()):
        assert image.read_bytes() == (tmp_path / "file" / image.name).read_bytes(), image.name


def _rewritten(src, dst, metadata=None, tensors=None):
    """A copy of export `src` with its metadata and tensors edited."""
    stored, stored_tensors = _metadata(src)
    save_file(tensors(stored_tensors) if tensors else stored_tensors, str(dst),
              metadata(stored) if metadata else stored)
    return dst


def _first(tensors):
    name = next(iter(tensors))
    return {**tensors, name: torch.zeros(3, 1)}


def _wider(stored):
    config = json.loads(stored["config"])
    config["model"]["channels"] *= 2
    return {**stored, "config": json.dumps(config)}


BAD = {
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[:-100]), "not a readable safetensors file"),
    "not safetensors": (lambda src, dst: dst.write_text("hello"), "not a readable safetensors file"),
    "no metadata": (lambda src, dst: _rewritten(src, dst, lambda m: {}), "not a ddpdiff export"),
    "newer format": (lambda src, dst: _rewritten(src, dst, lambda m: {**m, "format_version": "2"}),
                     "format_version '2', this ddpdiff reads 1"),
    "missing config": (lambda src, dst: _rewritten(src, dst, lambda m: {k: v for k, v in m.items() if k != "config"}),
                       "its metadata lacks config"),
    "bad json": (lambda src, dst: _rewritten(src, dst, lambda m: {**m, "meta": "{"}), "unreadable metadata"),
    "kind disagrees": (lambda src, dst: _rewritten(src, dst, lambda m: {**m, "kind": "srresnet"}),
                       "its meta does not describe the kind it records (srresnet)"),
    "wrong shape": (lambda src, dst: _rewritten(src, dst, tensors=_first), "is [3, 1], expected"),
    "other model": (lambda src, dst: _rewritten(src, dst, _wider), "do not match the model its metadata describes"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_corrupt_or_mismatched_file_stops_with_one_line_naming_it(case, exported, tmp_path, capsys):
    make, fragment = BAD[case]
    bad = tmp_path / "bad.safetensors"
    make(exported["diffusion", "fp32"], bad)
    assert _sample_cli(bad, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ddpdiff.sample: error: {bad}: ") and fragment in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_wrong_kind_of_file_is_named(exported, tmp_path, capsys):
    assert _sample_cli(exported["sr", "bf16"], tmp_path / "out") == 2
    assert f"{exported['sr', 'bf16']}: not a diffusion checkpoint, it holds an SRResNet" in capsys.readouterr().err
    assert _sample_cli(exported["diffusion", "bf16"], tmp_path / "out", "--upsampler", exported["classifier", "bf16"]) == 2
    assert "not an SRResNet checkpoint, it holds an attribute classifier" in capsys.readouterr().err
    assert _sample_cli(exported["diffusion", "bf16"], tmp_path / "out", "--raw") == 2
    assert "holds the EMA weights only" in capsys.readouterr().err
    assert _sample_cli(tmp_path / "absent.safetensors", tmp_path / "out") == 2
    assert "absent.safetensors: no such exported file" in capsys.readouterr().err


def test_export_refuses_what_it_cannot_write_and_leaves_no_file(diffusion_run, tmp_path, capsys):
    assert export.main(["--checkpoint", str(diffusion_run), "--out", str(tmp_path / "model.pt")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "model.pt").exists()
    assert export.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "no such checkpoint file or run directory" in capsys.readouterr().err

    state = checkpoint.load(checkpoint.resolve(diffusion_run))
    name = next(k for k, v in state["ema"].items() if v.is_floating_point())
    state["ema"][name] = state["ema"][name] + 1e6
    torch.save(state, tmp_path / "huge.pt")
    out = tmp_path / "huge.safetensors"
    assert export.main(["--checkpoint", str(tmp_path / "huge.pt"), "--out", str(out), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"EMA weight {name} is not finite in fp16" in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".*"))

    corrupt = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(checkpoint.resolve(diffusion_run).read_bytes()[:-10])
    corrupt.with_name(corrupt.name + ".sha256").write_text(sha256_file(checkpoint.resolve(diffusion_run)))
    assert export.main(["--checkpoint", str(corrupt), "--out", str(out)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err and not out.exists()


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exit:
        export.main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    for text in ("--checkpoint", "--out", "--dtype", "bf16", "fp16", "fp32", "ddpdiff.sample", "from_pretrained"):
        assert text in out
