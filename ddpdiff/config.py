"""Typed run configuration: dataclass defaults < YAML file < `--section.field value` flags.

`TrainerConfig` holds what the training loop reads (data, train, checkpoint, log, dist, run); each trainer's
root adds its own sections: `Config` (the diffusion model), `SRTrainerConfig`, `ClassifierTrainerConfig`.
A trainer's `--help`, saved config and checkpoints hold its root's keys only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UsageError


class ConfigError(UsageError):
    """A bad config key or value; the message is one line that names the key."""


def _f(default: Any, help: str, fixed: bool = False) -> Any:
    """A dataclass field with a help line (shown by `--help`); lists get a fresh copy per instance. `fixed`: the
    setting decides the data order or the network, or is restored from the checkpoint whatever the config says
    (the optimizer's hyperparameters), so a resume with another value is refused (`fixed_keys`)."""
    metadata = {"help": help, "fixed": fixed}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    shards: str = _f("data/celeba/shards", "shard directory written by tools/make_shards.py (holds manifest.json)")
    workers: int = _f(2, "data loader worker processes per rank")
    timeout_s: float = _f(600.0, "seconds a rank waits for its next batch from its loader workers before the run "
                                 "fails (a worker hung, e.g. on a stalled filesystem); 0 waits forever")
    max_bad: int = _f(10, "unusable samples (bad JPEG, corrupt member) replaced and reported before the run "
                          "stops with their list; 0: any is an error")
    verify: bool = _f(False, "check every training shard against manifest.json's sha256 before training (reads "
                             "all of them, on every rank)")


@dataclass
class DiffusionDataConfig(DataConfig):
    condition: Literal["text", "image", "mix"] = _f(
        "text", "CLIP embedding the model is conditioned on; mix picks text or image per example")


@dataclass
class ModelConfig:
    name: Literal["unet", "unet_classic"] = _f("unet", "denoiser architecture (ddpdiff.models.MODELS)", fixed=True)
    channels: int = _f(64, "base channel width", fixed=True)
    channel_mult: list[int] = _f([1, 2, 2, 4], "width multiplier per resolution level", fixed=True)
    num_res_blocks: int = _f(2, "residual blocks per level (unet)", fixed=True)
    attn_resolutions: list[int] = _f([16], "feature-map sizes that get self-attention (unet)", fixed=True)
    num_heads: int = _f(4, "attention heads", fixed=True)
    cond: Literal["pooled", "tokens", "both"] = _f(
        "both", "condition on the pooled CLIP embedding, the per-token text states, or both (unet)", fixed=True)
    cross_attn_resolutions: list[int] = _f([16, 8], "feature-map sizes with cross-attention over text tokens",
                                           fixed=True)
    dropout: float = _f(0.0, "dropout inside residual blocks", fixed=True)


@dataclass
class DiffusionConfig:
    timesteps: int = _f(100, "number of diffusion steps T", fixed=True)
    schedule: Literal["cosine", "linear"] = _f("cosine", "noise schedule", fixed=True)
    target: Literal["eps", "x0", "v", "prev"] = _f(
        "eps", "what the network predicts: noise, clean image, velocity, or the previous (less noisy) image",
        fixed=True)
    min_snr_gamma: float = _f(0.0, "min-SNR-gamma loss weighting; 0 disables it", fixed=True)


@dataclass
class TrainConfig:
    epochs: int = _f(100, "passes over the training split (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps to run; 0 means run `epochs` epochs")
    global_batch: int = _f(1250, "images per optimizer step, summed over all ranks", fixed=True)
    micro_batch: int = _f(0, "images per rank per forward pass; 0 means global_batch / world_size")
    optimizer: Literal["adam", "adamw"] = _f("adam", "optimizer (fused kernels on GPU)", fixed=True)
    lr: float = _f(1e-3, "peak learning rate")
    betas: list[float] = _f([0.9, 0.999], "Adam betas", fixed=True)
    weight_decay: float = _f(0.0, "weight decay", fixed=True)
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "learning rate after warm-up")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping")
    ema_decay: float = _f(0.999, "EMA decay of the weights used for sampling")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "autocast precision; fp16 uses a GradScaler")
    grad_checkpointing: bool = _f(False, "recompute block activations in backward to save memory")
    channels_last: bool = _f(False, "use channels_last memory format (faster convs on GPU)")
    compile: bool = _f(False, "torch.compile the model")
    max_nonfinite: int = _f(10, "stop after this many non-finite losses in a row")
    seed: int = _f(0, "global seed; each rank derives its own", fixed=True)
    deterministic: bool = _f(False, "deterministic kernels (and CUBLAS_WORKSPACE_CONFIG), so that bitwise "
                                    "resume holds on GPUs too (same hardware); slower")


@dataclass
class DiffusionTrainConfig(TrainConfig):
    cond_drop: float = _f(0.1, "probability of replacing the condition by the null embedding (for guidance)")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(1000, "save a checkpoint every N optimizer steps (also at the end and on SIGTERM/SIGUSR1)")
    keep: int = _f(3, "number of newest checkpoints kept")
    async_write: bool = _f(True, "write checkpoints in a background thread from a copy in host memory (rank 0 "
                                 "holds one more copy of the state while it writes); false: the loop waits")


@dataclass
class LogConfig:
    every_steps: int = _f(50, "console and TensorBoard scalars every N steps")


@dataclass
class SampleConfig:
    every_steps: int = _f(1000, "sample grid to TensorBoard every N steps; 0 disables it")
    num_prompts: int = _f(8, "validation prompts in the grid")
    sampler: Literal["ddpm", "ddim", "dpmpp2m"] = _f(
        "dpmpp2m", "dpmpp2m (DPM-Solver++(2M), second order, for 10-20 steps), ddim or ddpm (ancestral)")
    steps: int = _f(20, "sampling steps (respaced, at most diffusion.timesteps)")
    guidance: float = _f(2.0, "classifier-free guidance scale; 0 means unconditional, 1 plain conditional")
    guidance_interval: list[float] = _f([0.17, 0.88], "[LO, HI]: guidance only where LO <= t/T < HI (more "
                                        "varied samples); [] every step")
    eta: float = _f(0.0, "DDIM eta (0 is deterministic)")


@dataclass
class SRConfig:
    scale: Literal[4, 8] = _f(8, "upsampling factor of the SRResNet (64 -> 512 at 8)", fixed=True)
    channels: int = _f(64, "SRResNet feature width", fixed=True)
    num_blocks: int = _f(16, "SRResNet residual blocks", fixed=True)
    hr_patch: int = _f(128, "side of the random high-resolution training patches (a multiple of scale)", fixed=True)
    eval_every_steps: int = _f(1000, "score the EMA weights by PSNR every N steps; 0 disables it")
    eval_images: int = _f(64, "validation images for PSNR against bicubic upsampling")


@dataclass
class ClassifierConfig:
    width: int = _f(32, "channels of the first stage of the attribute ResNet (doubled per stage)", fixed=True)
    blocks: list[int] = _f([2, 2, 2, 2], "residual blocks per stage", fixed=True)
    eval_every_steps: int = _f(1000, "score the EMA weights on the whole val split every N steps; 0 disables it")


@dataclass
class EvalConfig:
    every_steps: int = _f(0, "evaluate during training every N steps (all ranks share the work); 0 disables it")
    num: int = _f(64, "generated images per evaluation")
    metrics: list[str] = _f(["attr_acc", "clip_cosine"], "any of attr_acc, clip_cosine, fid, diversity "
                                                          "(clip_score: clip_cosine's former name)")
    classifier: str = _f("", "attribute classifier run dir or checkpoint (train_classifier), for attr_acc")
    inception: str = _f("", "local Inception weights file for fid (or env DDPDIFF_INCEPTION_WEIGHTS)")
    sampler: Literal["ddpm", "ddim", "dpmpp2m"] = _f("dpmpp2m", "sampler for evaluation (as sample.sampler)")
    steps: int = _f(50, "sampling steps for evaluation")
    guidance: float = _f(2.0, "guidance scale for evaluation")
    guidance_interval: list[float] = _f([0.17, 0.88], "[LO, HI]: guidance only where LO <= t/T < HI, for "
                                        "evaluation; [] every step")
    eta: float = _f(0.0, "DDIM eta for evaluation")


@dataclass
class DistConfig:
    device: Literal["auto", "cuda", "cpu"] = _f(
        "auto", "auto: this rank's GPU when CUDA works, else the CPU (an error if the launch expects GPUs); "
                "cuda: GPUs or an error; cpu: the CPU with gloo")
    timeout_s: int = _f(600, "a collective that waits longer than this fails the job")
    fixed_buckets: bool = _f(
        True, "where a run can be bitwise (train.deterministic, or gloo), keep DDP's gradient buckets in one "
              "layout (find_unused_parameters), so a resumed run is bit-identical on more than 2 ranks; elsewhere, "
              "and when false, DDP runs with a static graph and gradients as bucket views")


@dataclass
class RunConfig:
    dir: str = _f("runs/default", "run directory: config, checkpoints, TensorBoard logs")
    fresh: bool = _f(False, "start again from step 0 although the run directory has checkpoints (they are moved "
                            "to checkpoints/set_aside/N/); once per job: a requeue or torchrun restart of the same "
                            "job resumes")


@dataclass
class TrainerConfig:
    """What every trainer shares: the training loop's sections."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class Config(TrainerConfig):
    """The text-conditioned diffusion trainer (`python -m ddpdiff.train`)."""
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class SRTrainerConfig(TrainerConfig):
    """The SRResNet upsampler trainer (`python -m ddpdiff.train_sr`)."""
    sr: SRConfig = field(default_factory=SRConfig)


@dataclass
class ClassifierTrainerConfig(TrainerConfig):
    """The attribute classifier trainer (`python -m ddpdiff.train_classifier`)."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


def _check(key: str, value: Any, tp: Any) -> Any:
    """Return value converted to type tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check(key, value, inner)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def update(cfg: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested dict of values to a config dataclass in place, type-checking every leaf."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    hints = _section_types(type(cfg))
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"unknown config key '{full}' (known keys here: {known})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            update(current, value, f"{full}.")
        else:
            setattr(cfg, key, _check(full, value, hints[key]))


def set_key(cfg: TrainerConfig, dotted: str, raw: str) -> None:
    """Set `section.field` from a command-line string (parsed as YAML, so 1e-3, true, [1,2] work)."""
    parts = dotted.split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip() not in ("null", "~", ""):
        value = raw
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    update(cfg, nested)


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         root: type[TrainerConfig] = Config) -> Any:
    """Build a `root` config from defaults, an optional YAML file and `--a.b value` / `--a.b=value` overrides."""
    cfg = root()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        try:
            update(cfg, values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for key, raw in _pairs(overrides or []):
        set_key(cfg, key, raw)
    return cfg


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.field value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(args):
            raw = args[i + 1]
            i += 2
        else:
            raise ConfigError(f"--{key}: missing value")
        if "." not in key:
            raise ConfigError(f"--{key}: overrides look like --section.field value")
        pairs.append((key, raw))
    return pairs


def to_dict(cfg: TrainerConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any], root: type[TrainerConfig] = Config) -> Any:
    """A `root` config from a saved one (a checkpoint's). What checkpoints of the former all-trainers config
    hold and `root` lacks is dropped: whole sections of other trainers, and keys that moved to a subclass."""
    cfg = root()
    kept = {}
    for name, section in values.items():
        if not hasattr(cfg, name):
            if name in _FORMER_SECTIONS:
                continue
        elif isinstance(section, dict):
            own = getattr(cfg, name)
            section = {k: v for k, v in section.items() if hasattr(own, k) or k not in _MOVED_KEYS}
        kept[name] = section
    update(cfg, kept)
    return cfg


# What the former single config had for every trainer: other trainers' sections, and keys now in subclasses.
_FORMER_SECTIONS = ("model", "diffusion", "sample", "sr", "classifier", "eval")
_MOVED_KEYS = ("condition", "cond_drop")


def fixed_keys(cfg: TrainerConfig) -> set[str]:
    """The "section.key" settings of `cfg`'s trainer marked `fixed` (the data order or the network)."""
    return {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, section.name)) if f.metadata.get("fixed")}


def dump(cfg: TrainerConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def reference(root: type[TrainerConfig] = Config, own: bool = False) -> str:
    """Every config key of a trainer with its type, default and help line: its `--help` and the README tables.
    With `own`, only the sections the trainer adds to `TrainerConfig`."""
    cfg = root()
    shared = {f.name for f in dataclasses.fields(TrainerConfig)} if own else set()
    lines = []
    for section in dataclasses.fields(cfg):
        if section.name in shared:
            continue
        sub = getattr(cfg, section.name)
        hints = _section_types(type(sub))
        for f in dataclasses.fields(sub):
            tp = hints[f.name]
            if typing.get_origin(tp) is Literal:
                tname = "|".join(map(str, typing.get_args(tp)))
            else:
                tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
                if typing.get_origin(tp) is list:
                    tname = f"list[{typing.get_args(tp)[0].__name__}]"
            default = getattr(sub, f.name)
            fixed = "; fixed on resume" if f.metadata.get("fixed") else ""
            lines.append(f"  --{section.name}.{f.name} {tname} (default {default!r}{fixed})\n"
                         f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_args(description: str, argv: list[str] | None = None, prog: str | None = None,
               extra: typing.Callable[[argparse.ArgumentParser], None] | None = None,
               root: type[TrainerConfig] = Config) -> tuple[Any, argparse.Namespace]:
    """Command-line front end shared by the training entrypoints: `root`'s keys, `--config`, `--dry-run`.

    Exits with status 2 and a one-line message on any bad key or value.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with --section.field value; later flags win):\n" + reference(root))
    parser.add_argument("--config", help="YAML file from jobs/configs/ (defaults apply to keys it omits)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    if extra is not None:
        extra(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load(args.config, rest, root)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.dry_run:
        sys.stdout.write(dump(cfg))
        parser.exit(0)
    return cfg, args
