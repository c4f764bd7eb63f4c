import subprocess

import pytest

from ddpdiff import config
from ddpdiff.config import ConfigError

from conftest import CONFIGS


def _root(path):
    """The trainer a shipped config is for, by its name."""
    for prefix, root in (("sr", config.SRTrainerConfig), ("classifier", config.ClassifierTrainerConfig)):
        if path.name.startswith(prefix):
            return root
    return config.Config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = config.load(path, root=_root(path))
    assert config.from_dict(config.to_dict(cfg), _root(path)) == cfg


@pytest.mark.parametrize("root, own, others", [
    (config.Config, {"model", "diffusion", "sample", "eval"}, {"sr", "classifier"}),
    (config.SRTrainerConfig, {"sr"}, {"model", "diffusion", "sample", "eval", "classifier"}),
    (config.ClassifierTrainerConfig, {"classifier"}, {"model", "diffusion", "sample", "eval", "sr"}),
])
def test_each_trainer_has_only_its_own_keys(root, own, others):
    sections = {line.split()[0][2:].split(".")[0] for line in config.reference(root).splitlines()
                if line.startswith("  --")}
    assert sections == own | {"data", "train", "checkpoint", "log", "dist", "run"} and not sections & others
    with pytest.raises(ConfigError, match="unknown config key"):
        config.load(None, [f"--{sorted(others)[0]}.x", "1"], root=root)
    assert ("--data.condition" in config.reference(root)) == (root is config.Config)
    assert ("--train.cond_drop" in config.reference(root)) == (root is config.Config)


def test_checkpoint_configs_of_the_former_single_config_still_load():
    """A checkpoint written before each trainer had its own root holds every trainer's sections."""
    former = config.to_dict(config.Config())
    former.update(sr=config.to_dict(config.SRTrainerConfig())["sr"], classifier={"width": 8, "blocks": [1]})
    assert config.from_dict(former) == config.Config()
    sr = config.from_dict(former, config.SRTrainerConfig)
    assert sr == config.SRTrainerConfig() and not hasattr(sr.data, "condition")
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        config.from_dict({**former, "train": {"nope": 1}}, config.SRTrainerConfig)


def test_celeba64_keeps_the_original_hyperparameters():
    cfg = config.load(CONFIGS / "celeba64.yaml")
    assert (cfg.train.epochs, cfg.diffusion.timesteps, cfg.train.global_batch) == (100, 100, 1250)
    assert (cfg.train.optimizer, cfg.train.lr, cfg.diffusion.schedule) == ("adam", 1e-3, "cosine")


def test_overrides_win_over_yaml_and_later_flags_win():
    cfg = config.load(CONFIGS / "smoke.yaml", ["--train.lr", "3e-4", "--model.channel_mult=1,2,4",
                                               "--train.lr=5e-4", "--train.grad_checkpointing", "true"])
    assert cfg.train.lr == 5e-4
    assert cfg.model.channel_mult == [1, 2, 4]
    assert cfg.train.grad_checkpointing is True


@pytest.mark.parametrize("args, fragment", [
    (["--train.lrr", "1"], "unknown config key 'train.lrr'"),
    (["--nosuch.key", "1"], "unknown config key 'nosuch'"),
    (["--train.max_steps", "ten"], "train.max_steps: expected an integer"),
    (["--train.max_steps", "1.5"], "train.max_steps: expected an integer"),
    (["--train.precision", "fp8"], "train.precision: expected one of fp32, bf16, fp16"),
    (["--train.grad_checkpointing", "maybe"], "train.grad_checkpointing: expected true or false"),
    (["--model.channel_mult", "1,x"], "model.channel_mult[1]: expected an integer"),
    (["--train.lr"], "--train.lr: missing value"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_overrides_are_one_line_errors_naming_the_key(args, fragment):
    with pytest.raises(ConfigError) as e:
        config.load(None, args)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.lr: expected a number"):
        config.load(bad)
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        config.load(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")


def test_cli_exits_2_with_one_line_and_dry_run_prints_resolved_config(python, repo):
    bad = subprocess.run([python, "-c", "from ddpdiff import config; config.parse_args('t')",
                          "--config", str(CONFIGS / "smoke.yaml"), "--train.nope", "1"],
                         capture_output=True, text=True, cwd=repo)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "unknown config key 'train.nope'" in bad.stderr
    ok = subprocess.run([python, "-c", "from ddpdiff import config; config.parse_args('t')",
                         "--config", str(CONFIGS / "smoke.yaml"), "--train.lr", "0.25", "--dry-run"],
                        capture_output=True, text=True, cwd=repo)
    assert ok.returncode == 0, ok.stderr
    assert config.from_dict(__import__("yaml").safe_load(ok.stdout)).train.lr == 0.25


def test_the_settings_a_resume_refuses_are_marked_on_their_own_fields():
    import dataclasses

    def section(cls, name):
        return {f"{name}.{f.name}" for f in dataclasses.fields(cls)}

    shared = {"train.seed", "train.global_batch", "train.optimizer", "train.betas", "train.weight_decay"}
    assert config.fixed_keys(config.Config()) == (shared | section(config.ModelConfig, "model")
                                                  | section(config.DiffusionConfig, "diffusion"))
    assert config.fixed_keys(config.SRTrainerConfig()) == shared | {"sr.scale", "sr.channels", "sr.num_blocks",
                                                                     "sr.hr_patch"}
    assert config.fixed_keys(config.ClassifierTrainerConfig()) == shared | {"classifier.width", "classifier.blocks"}
    lines = config.reference().splitlines()
    assert "  --train.seed int (default 0; fixed on resume)" in lines and "  --train.lr float (default 0.001)" in lines
