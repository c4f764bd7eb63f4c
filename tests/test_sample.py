"""Text-to-face sampling (`ddpdiff.sample`) from tiny trained checkpoints, with and without the upsampler."""

import json

import pytest
import torch
from PIL import Image

from ddpdiff import checkpoint, clip, sample, train
from ddpdiff.pipeline import Pipeline

from conftest import CONFIGS

PROMPTS = ["Photo of person eyeglasses, smiling.", "Photo of person blond hair."]


@pytest.fixture(scope="module")
def run(shards_dir, tmp_path_factory):
    """A 4-step smoke diffusion run (EMA decay 0.9, so EMA and raw weights differ)."""
    out = tmp_path_factory.mktemp("diffusion")
    assert train.main(["--config", str(CONFIGS / "smoke.yaml"), "--data.shards", str(shards_dir),
                       "--run.dir", str(out), "--train.max_steps", "4"]) == 0
    return out


def _generate(run, prompts=PROMPTS, ema=True, clip_pretrained=None, **kw):
    """Guidance at every step unless asked otherwise: in 3 steps (t = 99, 50, 0) the default band guides one."""
    pipe = Pipeline.from_checkpoint(run, "cpu", ema=ema, clip_pretrained=clip_pretrained)
    return pipe.sample(prompts, **{"num": 2, "steps": 3, "guidance_interval": None, **kw})


def _cli(run, out, *extra):
    return sample.main(["--checkpoint", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num", "2",
                        "--steps", "3", "--out", str(out), *map(str, extra)])


def _tampered(run, tmp_path, edit):
    """A copy of the run's checkpoint file with `edit(state)` applied."""
    state = checkpoint.load(checkpoint.resolve(run))
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


def test_cli_writes_images_grids_upsampled_512_and_an_index(run, sr_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(run, out, "--upsampler", sr_run, "--seed", 7) == 0
    for p in range(2):
        for s in range(2):
            assert Image.open(out / f"p{p:03d}_s{s:03d}.png").size == (64, 64)
            assert Image.open(out / f"p{p:03d}_s{s:03d}_512.png").size == (512, 512)
        assert Image.open(out / f"p{p:03d}_grid.png").size == (2 * 66 + 2, 68)
        assert Image.open(out / f"p{p:03d}_grid_512.png").size == (2 * 514 + 2, 516)
    index = json.loads((out / "samples.json").read_text())
    assert index["upsampler"] == str(checkpoint.resolve(sr_run))
    assert [(f["file"], f["prompt"], f["upsampled"]) for f in index["files"]] == [
        (f"p{p:03d}_s{s:03d}.png", PROMPTS[p], f"p{p:03d}_s{s:03d}_512.png") for p in range(2) for s in range(2)]
    for f in index["files"]:
        assert (f["seed"], f["steps"], f["guidance"], f["guidance_interval"], f["sampler"], f["ema"]) == (
            7, 3, 2.0, [0.17, 0.88], "dpmpp2m", True)
        assert f["checkpoint"] == str(checkpoint.resolve(run))
    assert not list(out.glob(".*"))  # no temporaries left behind
    assert "4 images for 2 prompts" in capsys.readouterr().out


def test_the_same_seed_gives_the_same_files(run, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert sample.main(["--checkpoint", str(run), "--prompt", PROMPTS[0], "--num", "2", "--steps", "2",
                            "--sampler", "ddpm", "--seed", str(seed), "--out", str(tmp_path / name)]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "p000_s000.png").read_bytes() != (tmp_path / "c" / "p000_s000.png").read_bytes()


def test_images_do_not_depend_on_batch_size_and_are_prompt_major(run):
    whole = _generate(run, batch_size=4)
    assert whole.shape == (4, 3, 64, 64) and whole.min() >= -1 and whole.max() <= 1
    torch.testing.assert_close(_generate(run, batch_size=3), whole, atol=1e-4, rtol=0)
    second = _generate(run, PROMPTS[1:])
    assert not torch.allclose(second, whole[2:])  # prompt 1's noise is seeded by its index, not its position
    assert not torch.allclose(whole[0], whole[1])


def test_guidance_changes_the_images(run):
    assert (_generate(run, guidance=0.0) - _generate(run, guidance=3.0)).abs().max() > 1e-3


def test_a_guidance_interval_is_sampled_and_recorded(run, tmp_path):
    """Guidance over every t/T (0..1) is full guidance; a band of it is neither that nor guidance 1."""
    full, plain = _generate(run, guidance=3.0), _generate(run, guidance=1.0)
    assert torch.equal(_generate(run, guidance=3.0, guidance_interval=(0.0, 1.0)), full)
    band = _generate(run, guidance=3.0, guidance_interval=(0.6, 1.0))  # the step at t = 99 (not 50, 0)
    # the smoke model's images are settled after the first step: later guidance moves them only slightly
    assert (band - plain).abs().max() > 1e-3 and not torch.equal(band, full)
    assert _cli(run, tmp_path / "out", "--guidance-interval", "0.3,0.7") == 0
    index = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert index["guidance_interval"] == [0.3, 0.7] and all(f["guidance_interval"] == [0.3, 0.7]
                                                            for f in index["files"])


def test_ema_weights_by_default_raw_on_request(run, tmp_path):
    ema, raw = _generate(run), _generate(run, ema=False)
    assert (ema - raw).abs().max() > 1e-3

    def ema_is_raw(state):
        state["ema"] = state["model"]
    torch.testing.assert_close(_generate(_tampered(run, tmp_path, ema_is_raw)), raw)


def test_a_checkpoint_whose_clip_differs_is_an_error(run, tmp_path, capsys):
    def wider(state):
        state["meta"]["clip"]["dim"] += 1
    path = _tampered(run, tmp_path, wider)
    assert _cli(path, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    dim = checkpoint.load(checkpoint.resolve(run))["meta"]["clip"]["dim"]
    assert "CLIP mismatch" in err and f"dim={dim + 1}" in err and f"dim={dim}," in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_from_before_the_activation_was_recorded_samples_the_same(run, tmp_path):
    older = _tampered(run, tmp_path, lambda state: state["meta"]["clip"].pop("quick_gelu"))
    torch.testing.assert_close(_generate(older), _generate(run))


def test_a_clip_without_the_recorded_activation_is_an_error(run, tmp_path, tiny_quick_gelu, capsys):
    """The checkpoint's CLIP config now builds QuickGELU (same seeded weights), its embeddings came from GELU."""
    def quick_config(state):
        state["meta"]["clip"] |= {"model": str(tiny_quick_gelu.resolve()), "quick_gelu": False}
    assert _cli(_tampered(run, tmp_path, quick_config), tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "CLIP mismatch" in err and "quick_gelu=False}, but" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_clip_weights_can_be_relocated_but_must_be_the_same(run, tmp_path, capsys):
    same = tmp_path / "same.pt"
    torch.save(clip.load("tiny", "none").model.state_dict(), same)
    torch.testing.assert_close(_generate(run, clip_pretrained=str(same)), _generate(run))

    other = tmp_path / "other.pt"
    torch.save({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in clip.load("tiny", "none").model.state_dict().items()}, other)
    assert _cli(run, tmp_path / "out", "--clip-pretrained", other) == 2
    err = capsys.readouterr().err
    assert "CLIP mismatch" in err and "embeds the empty prompt differently" in err


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "500"], "--steps 500 is outside 1..100"),
    (["--sampler", "ddpm", "--eta", "0.5"], "--eta must be >= 0 and applies to the ddim sampler only"),
    (["--num", "0"], "--num, --batch-size and --sr-batch-size must be >= 1"),
    (["--guidance-interval", "0.8,0.2"], "--guidance-interval 0.8,0.2: expected LO,HI with 0 <= LO < HI <= 1"),
])
def test_bad_arguments_exit_2_with_one_line(run, tmp_path, capsys, args, fragment):
    assert _cli(run, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and err.count("\n") == 0


def test_wrong_kind_of_checkpoint_and_missing_prompts(run, sr_run, tmp_path, capsys):
    assert _cli(sr_run, tmp_path / "out") == 2
    assert "not a diffusion checkpoint" in capsys.readouterr().err
    assert _cli(run, tmp_path / "out", "--upsampler", run) == 2
    assert "not an SRResNet checkpoint" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert _cli(tmp_path / "nowhere", tmp_path / "out") == 2
    assert "no such checkpoint file or run directory" in capsys.readouterr().err


def test_prompts_file_adds_one_prompt_per_line(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    assert sample.main(["--checkpoint", str(run), "--prompts-file", str(prompts), "--num", "1", "--steps", "1",
                        "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "samples.json").read_text())["prompts"] == PROMPTS


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exit:
        sample.main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    for flag in ("--checkpoint", "--prompt", "--prompts-file", "--num", "--sampler", "--steps", "--guidance",
                 "--guidance-interval", "--seed", "--batch-size", "--device", "--out", "--upsampler", "--clip-pretrained", "--raw",
                 "--attributes", "--list-attributes", "--unconditional"):
        assert flag in out


@pytest.mark.parametrize("args, fragment", [
    ([], "no prompts: pass --prompt TEXT, --attributes NAMES, --prompts-file FILE, or --unconditional"),
    (["--prompt", ""], "prompt 1 is empty: pass --unconditional"),
    (["--prompt", PROMPTS[0], "--prompt", "   "], "prompt 2 is empty"),
    (["--attributes", "Smiling,Bogus"], "--attributes 'Smiling,Bogus': unknown bogus; expected CelebA attribute"),
    (["--unconditional", "--prompt", PROMPTS[0]], "--unconditional samples without a prompt"),
])
def test_prompts_are_checked_before_anything_loads(tmp_path, capsys, args, fragment):
    """The checkpoint does not exist: the prompt's error comes first, so nothing was loaded for it."""
    assert sample.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and err.count("\n") == 0


def test_attributes_build_the_training_prompt_and_unconditional_samples_need_none(run, tmp_path):
    assert sample.main(["--checkpoint", str(run), "--attributes", "smiling,Blond hair", "--num", "1", "--steps", "1",
                        "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "samples.json").read_text())["prompts"] == ["Photo of person blond hair, "
                                                                                    "smiling."]
    assert sample.main(["--checkpoint", str(run), "--unconditional", "--num", "1", "--steps", "1",
                        "--out", str(tmp_path / "u")]) == 0
    index = json.loads((tmp_path / "u" / "samples.json").read_text())
    assert index["prompts"] == [""] and index["guidance"] == 0.0


def test_words_the_model_never_saw_get_one_warning_line(run, tmp_path, capsys):
    assert sample.main(["--checkpoint", str(run), "--prompt", "a smiling woman with blond hair", "--num", "1",
                        "--steps", "1", "--out", str(tmp_path / "out")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "words no training prompt had, which the model may ignore: a, with, woman" \
        in warnings[0]


def test_list_attributes_needs_no_checkpoint(capsys):
    assert sample.main(["--list-attributes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 40 and lines[0].split() == ["5_o_Clock_Shadow", "5", "o", "clock", "shadow"]
    assert "Wearing_Hat           wearing hat" in lines


def test_the_diffusers_call_gives_pil_images_of_the_generators_seed(run):
    import numpy as np

    from ddpdiff.images import to_pil

    pipe = Pipeline.from_checkpoint(run).to("cpu")
    out = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(7))
    same = pipe.sample(PROMPTS, num=2, seed=7, steps=2, guidance=3.0)
    assert len(out.images) == 4 and all(isinstance(i, Image.Image) for i in out.images)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, to_pil(same)))
    other = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(8)).images
    assert len(other) == 1 and not np.array_equal(np.asarray(other[0]), np.asarray(out.images[0]))
