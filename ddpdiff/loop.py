"""The training loop every ddpdiff trainer runs: DDP, mixed precision, accumulation, EMA, checkpoints, resume.

A trainer (diffusion, super-resolution, attribute classifier) supplies a `Task`: its loader, model, loss and
periodic evaluation. Everything else — the part that must be right on hundreds of GPUs — lives here once.
All randomness of optimizer step s on rank r is drawn from a seed derived from (train.seed, s, r), so a
resumed run repeats an uninterrupted one bit for bit, at any point it was killed.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, config, data, dist
from .atomic import write_text
from .config import ConfigError, TrainerConfig
from .ema import EMA
from .errors import cli
from .models import Meta
from .monitor import Monitor


class Task(Protocol):
    """What a trainer plugs into the loop. A task is made from its config and this rank's `dist.Env`, and
    keeps both (`cfg`, `env`)."""
    cfg: TrainerConfig
    env: dist.Env

    def loader(self) -> Any:
        """A `ddpdiff.data.Loader` (or anything with `batches_per_epoch` and `epoch(e, start)`)."""

    def validate(self) -> list[str]:
        """Problems with the config for this task, to be reported together with the loop's own."""

    def build_model(self) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Mean loss of a micro-batch and logging stats {name: (sum tensor, count tensor)}."""

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Figures for the first log line (parameter count, FLOPs per image…)."""

    def metadata(self) -> Meta:
        """What a checkpoint must carry to be used without the training data (e.g. which CLIP made it)."""

    def eval_due(self, step: int) -> bool:
        """Whether `evaluate` runs after `step` (and at step 0 of a fresh run)."""

    def evaluate(self, step: int, model: nn.Module, monitor: Monitor) -> None:
        """Periodic evaluation with the EMA weights, called on every rank when `eval_due(step)`."""


def launch(make_task: Callable[[Any, dist.Env], Task], root: type[TrainerConfig], description: str, prog: str,
           argv: list[str] | None = None) -> int:
    """A trainer's entrypoint: parse its config, join the process group, run the loop, always leave the group.

    Config and data problems end the run with status 2 and one line; anything else raises, so torchrun
    reports it and stops the other ranks instead of leaving them waiting.
    """
    cfg, _ = config.parse_args(description, argv, prog=prog, root=root)
    stop = StopRequest()  # before dist.init and the task: a signal while they run still ends the run with 75
    try:
        with kernels(cfg.train.deterministic):
            return cli(prog)(lambda: run(make_task(cfg, dist.init(cfg.dist.timeout_s, cfg.dist.device)), stop))()
    finally:
        stop.restore()
        # DDP's reducer sits in reference cycles, and its gloo work objects hold tensors: left to the collector at
        # interpreter exit, their C++ destructors take the GIL during finalization and abort the process
        # (`terminate called without an active exception`, seen once on a rank after `done`). Free them now.
        gc.collect()
        dist.cleanup()


@contextlib.contextmanager
def kernels(deterministic: bool) -> Iterator[None]:
    """The kernels while the run lasts. `train.deterministic`: cuBLAS needs its workspace setting before its
    first use, cuDNN its own flags; an op without a deterministic kernel then fails loudly. Otherwise the
    fast ones: cuDNN autotuning (the shapes are fixed) and TF32 for float32 matmuls and convolutions (sampling
    and the fp32 parts of mixed precision; 10 mantissa bits, far below the noise the model learns)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    else:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = True, True
        if torch.cuda.is_available():  # the CPU's float32 matmuls stay exact
            torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.allow_tf32) = saved[1:4]
        torch.set_float32_matmul_precision(saved[4])
        if saved[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 so the loop can checkpoint at a step every rank agrees on."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def due(step: int, every: int) -> bool:
    """Whether a periodic action set to `every` steps (0 = never) comes due at `step`."""
    return every > 0 and step % every == 0


def step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0])


def lr_at(step: int, total: int, cfg: config.TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def loss_weight(examples: int, world_size: int, global_batch: int) -> float:
    """Weight of a micro-batch's mean loss such that DDP's average of the ranks' gradients is the gradient of
    the mean over the global batch, however it is split into ranks (which may differ by one) and micro-batches."""
    return world_size * examples / global_batch


@contextlib.contextmanager
def ddp_sync(model: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step (also through a
    torch.compile wrapper, which is not itself a DDP module)."""
    model = getattr(model, "_orig_mod", model)
    if sync or not isinstance(model, DDP):
        yield
    else:
        with model.no_sync():
            yield


def batches(loader, epoch: int, start: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index in epoch, batch) from a position onwards, across epoch boundaries."""
    while True:
        for i, batch in enumerate(loader.epoch(epoch, start=start), start):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0


def micro_batches(batch: dict, size: int) -> Iterator[dict]:
    n = len(batch["key"])
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in batch.items()}


@dataclass
class TrainState:
    """The model and what updates it, and where the run is: `state_dict()` is what a checkpoint holds and
    `load_state_dict()` what a resume restores, so the two cannot drift apart."""
    model: nn.Module  # unwrapped: what checkpoints store
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    forward: nn.Module  # the module losses are computed through (DDP and/or compiled wrapper of `model`)
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch and batch index in it that come next
    batch: int = 0
    samples_seen: int = 0
    shards: str = ""  # `data.fingerprint` of the shards it trains on: saved, and compared on resume, not restored

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "epoch": self.epoch, "batch": self.batch, "samples_seen": self.samples_seen,
                "shards_sha256": self.shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(_regrouped(state["optimizer"], self.model, self.optimizer))
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.samples_seen = state["samples_seen"]

    def advance(self, global_batch: int, epoch: int, index: int, batches_per_epoch: int) -> None:
        """Count the step just taken on batch `index` of `epoch`."""
        self.step += 1
        self.samples_seen += global_batch
        self.epoch, self.batch = (epoch, index + 1) if index + 1 < batches_per_epoch else (epoch + 1, 0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the weights of linear and convolution layers only; never on norms, biases, embeddings or
    learned null conditions (nanoGPT's `configure_optimizers`, by layer type rather than tensor rank)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def _regrouped(saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state saved with one parameter group (checkpoints before `param_groups`) renumbered into the
    optimizer's groups; any other state as it is."""
    if len(saved["param_groups"]) != 1 or len(optimizer.param_groups) == 1:
        return saved
    old_index = {id(p): i for i, p in enumerate(model.parameters())}
    hyper = {k: v for k, v in saved["param_groups"][0].items() if k not in ("params", "weight_decay")}
    groups, state, new = [], {}, 0
    for group in optimizer.param_groups:
        indices = []
        for p in group["params"]:
            if old_index[id(p)] in saved["state"]:
                state[new] = saved["state"][old_index[id(p)]]
            indices.append(new)
            new += 1
        groups.append({**hyper, "weight_decay": group["weight_decay"], "params": indices})
    return {"state": state, "param_groups": groups}


def setup(task: Task) -> TrainState:
    """Model (the same initial weights on every rank and every run), EMA, optimizer, precision."""
    t, env = task.cfg.train, task.env
    torch.manual_seed(t.seed)
    model = task.build_model().to(env.device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                        fused=True)  # fused: `update` gates it with a found-inf tensor
    return TrainState(model, EMA(model, t.ema_decay), optimizer,
                      torch.amp.GradScaler(env.device.type, enabled=t.precision == "fp16"),
                      {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision), model)


def wrap(state: TrainState, task: Task) -> None:
    """DDP across ranks (and torch.compile if asked), once the weights are final (after resume)."""
    cfg, env = task.cfg, task.env
    forward = state.model
    if env.world_size > 1:
        forward = DDP(state.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                      **ddp_options(state.model, task))
    state.forward = torch.compile(forward) if cfg.train.compile else forward


def ddp_options(model: nn.Module, task: Task) -> dict[str, Any]:
    """DDP's settings. DDP re-buckets gradients after its first step unless find_unused_parameters is set; a
    resumed process would then sum its first step's gradients in another order than the uninterrupted run
    did, so `dist.fixed_buckets` keeps that search where results can be bitwise (deterministic mode, or gloo).
    (With two ranks every sum has two terms, exact in either order, so nothing needs fixing there.) Otherwise
    the graph is static (every parameter is used in every step), gradients live in the buckets, and buffers
    are broadcast only for models whose buffers change in training (BatchNorm statistics); the graph is static
    only where no rank accumulates micro-batches."""
    cfg, env = task.cfg, task.env
    if cfg.dist.fixed_buckets and env.world_size > 2 and (cfg.train.deterministic or env.backend == "gloo"):
        return {"find_unused_parameters": True}
    running_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    options = {"gradient_as_bucket_view": True, "broadcast_buffers": running_stats}
    # A static graph is traced in DDP's first backward, which must all-reduce: one under `no_sync` (the first
    # micro-batch of an accumulated step) fails in the reducer (`expect_autograd_hooks_` assert).
    return options if accumulates(task) else {"static_graph": True, **options}


def accumulates(task: Task) -> bool:
    """Whether some rank splits its share of a step into micro-batches (rank 0's share is the largest)."""
    t = task.cfg.train
    return 0 < t.micro_batch < data.share(t.global_batch, task.env.world_size, 0)[1]


def backward(tr: TrainState, task: Task, batch: dict, stats: dict[str, list[torch.Tensor]],
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one global batch's share on this rank for step `tr.step`, micro-batch by micro-batch,
    unscaled and clipped, without reading anything back from the device.

    Returns the micro-batches' losses and the gradient norm; adds the task's logging stats into `stats`
    (on the device).
    """
    t, env, step = task.cfg.train, task.env, tr.step
    tr.model.train()
    parts = list(micro_batches(batch, t.micro_batch or len(batch["key"])))
    losses = []
    for m, part in enumerate(parts):
        seed = step_seed(t.seed, step, env.rank, m)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
        gen = torch.Generator(env.device).manual_seed(seed)
        with ddp_sync(tr.forward, m == len(parts) - 1), \
                torch.autocast(env.device.type, dtype=tr.autocast_dtype, enabled=tr.autocast_dtype is not None):
            loss, part_stats = task.loss(tr.forward, part, gen)
        tr.scaler.scale(loss * loss_weight(len(part["key"]), env.world_size, t.global_batch)).backward()
        losses.append(loss.detach())
        for name, (total, count) in part_stats.items():
            add_stat(stats, name, total, count)
    tr.scaler.unscale_(tr.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
    return torch.stack(losses), grad_norm


def add_stat(stats: dict[str, list[torch.Tensor]], name: str, total: torch.Tensor, count: torch.Tensor) -> None:
    """Add a (sum, count) pair into `stats` on its device, in float64."""
    acc = stats.setdefault(name, [torch.zeros((), dtype=torch.float64, device=total.device),
                                  torch.zeros((), dtype=torch.float64, device=total.device)])
    acc[0] += total.detach().double()
    acc[1] += count.detach().double()


def step_flags(losses: torch.Tensor, grad_norm: torch.Tensor, scaled: bool) -> torch.Tensor:
    """[bad, overflow] of this step, true on every rank if true on any, as a device tensor (one all-reduce and no
    host read): bad is a non-finite loss, or non-finite gradients without a GradScaler; overflow is non-finite
    gradients (with fp16, the GradScaler's routine overflow)."""
    overflow = ~torch.isfinite(grad_norm)
    bad = ~torch.isfinite(losses).all() | (overflow & (not scaled))
    flags = torch.stack([bad, overflow]).to(torch.int32)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags.bool()


def train_step(tr: TrainState, task: Task, batch: dict, stats: dict[str, list[torch.Tensor]],
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step at the learning rate already set, on this rank's share of a global batch: gradients
    (`backward`), the skip decision every rank shares (`step_flags`: a non-finite loss or gradient on any rank;
    with fp16, infinite gradients are the GradScaler's routine overflow, skipped but not counted), the update and
    the EMA. Nothing is read back from the device. The loop and tools/bench_train.py both take their steps here.

    Returns the micro-batches' losses, the gradient norm and the step's [bad, overflow] flags.
    """
    losses, grad_norm = backward(tr, task, batch, stats)
    flags = step_flags(losses, grad_norm, tr.scaler.is_enabled())
    update(tr, flags.any())
    return losses, grad_norm, flags


def update(tr: TrainState, skip: torch.Tensor) -> None:
    """Apply the gradients and move the EMA, or, where `skip` (a device bool) is true, leave both as they are
    (a non-finite loss on some rank, or an fp16 overflow after which the GradScaler lowers its scale). The
    fused optimizer reads the gate as GradScaler hands it over (its `found_inf`), so no step reads it back."""
    tr.optimizer.found_inf = skip.float()
    try:
        tr.optimizer.step()
    finally:
        del tr.optimizer.found_inf
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.ema.update(tr.model, tr.step, skip)


def train_loader(task: Task, **options) -> data.Loader:
    """This rank's loader over the training split of `data.shards`, in the loop's batches, with the data
    section's `max_bad`, `verify` and `timeout_s`; `options` are the task's own (`tokens`, `extra`,
    `map_sample`). Pinned batches on a GPU, so their copies (in the compact dtypes) overlap compute."""
    cfg, env = task.cfg, task.env
    return data.Loader(cfg.data.shards, split="train", global_batch=cfg.train.global_batch, rank=env.rank,
                       world_size=env.world_size, seed=cfg.train.seed, workers=loader_workers(task),
                       pin_memory=env.device.type == "cuda", max_bad=cfg.data.max_bad, verify=cfg.data.verify,
                       timeout_s=cfg.data.timeout_s, **options)


def loader_workers(task: Task) -> int:
    """`data.workers`, under SLURM capped so that a rank's workers and the rank itself fit the CPUs it was
    given (`dist.cpus_per_rank`: SLURM_CPUS_PER_TASK shared by the ranks of a task): more would only slow every
    rank down. Elsewhere the setting is taken as it is."""
    wanted = task.cfg.data.workers
    if "SLURM_CPUS_PER_TASK" not in os.environ:
        return wanted
    cpus = dist.cpus_per_rank(task.env.local_world_size)
    workers = min(wanted, max(0, cpus - 1))
    if workers < wanted:
        dist.print0(f"data.workers {wanted} capped to {workers}: {cpus} CPUs per rank "
                    f"(SLURM_CPUS_PER_TASK={os.environ['SLURM_CPUS_PER_TASK']})")
    return workers


def micro_size(task: Task) -> int:
    """Images per forward pass on this rank: `train.micro_batch`, else the rank's whole share of a step.
    Evaluation batches use it too, as memory is known to hold that many."""
    t = task.cfg.train
    return t.micro_batch or data.share(t.global_batch, task.env.world_size, task.env.rank)[1]


def as_input(x: torch.Tensor, task: Task) -> torch.Tensor:
    """A batch tensor on this rank's device as the model reads it (`data.to_float`), in its memory format."""
    x = data.to_float(x, task.env.device)
    return x.contiguous(memory_format=torch.channels_last) if task.cfg.train.channels_last else x


def checked_loader(task: Task) -> Any:
    """The task's training loader, after `validate`; a split smaller than one global batch is an error."""
    validate(task)
    loader = task.loader()
    if loader.batches_per_epoch == 0:
        raise ConfigError(f"data.shards: the training split is smaller than one global batch of "
                          f"{task.cfg.train.global_batch}")
    return loader


def validate(task: Task) -> None:
    """Every problem with this run's config, in one error, before any data is opened."""
    cfg, t = task.cfg, task.cfg.train
    problems = list(task.validate())
    if t.global_batch < task.env.world_size:
        problems.append(f"train.global_batch {t.global_batch} is smaller than the world size {task.env.world_size}")
    if t.micro_batch < 0:
        problems.append(f"train.micro_batch must be >= 0, got {t.micro_batch}")
    if t.max_steps < 0 or t.epochs < 1:
        problems.append("train.max_steps must be >= 0 and train.epochs >= 1")
    problems += [f"train.{name} must be {rule}, got {value}" for name, value, ok, rule in (
        ("lr", t.lr, t.lr > 0, "> 0"),
        ("betas", t.betas, len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "two values in [0, 1)"),
        ("weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("grad_clip", t.grad_clip, t.grad_clip >= 0, ">= 0 (0 disables clipping)"),
        ("ema_decay", t.ema_decay, 0 <= t.ema_decay <= 1, "in [0, 1]"),
        ("max_nonfinite", t.max_nonfinite, t.max_nonfinite >= 0, ">= 0"),
        ("seed", t.seed, t.seed >= 0, ">= 0")) if not ok]
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep < 1:
        problems.append("checkpoint.every_steps and checkpoint.keep must be >= 1")
    if problems:
        raise ConfigError("invalid run: " + "; ".join(problems))


def save(tr: TrainState, task: Task, writer: checkpoint.Writer, wait_s: float | None = None) -> bool:
    """Rank 0 hands the checkpoint of the current step (with the config and the model's metadata) to `writer`,
    once the previous write is complete; the loop goes on while it is written (`checkpoint.async_write`).
    With `wait_s`, rank 0 abandons a previous write still in flight after that long and saves nothing (False on
    rank 0: `checkpoint.Writer.start`)."""
    return on_main(lambda: writer.start(task.cfg.run.dir, tr.step,
                                        {**tr.state_dict(), "config": config.to_dict(task.cfg),
                                         "meta": task.metadata().to_dict()},
                                        task.cfg.checkpoint.keep, wait_s)) is not False


def on_main(action: Callable[[], Any]) -> Any:
    """Run a checkpoint writer's `action` on rank 0 and return its result there (None elsewhere); if a write
    failed, every rank raises (rank 0 the one-line error naming the file), so none is left waiting. All ranks
    leave together."""
    error, result = None, None
    if dist.is_main():
        try:
            result = action()
        except checkpoint.CheckpointError as e:
            error = e
    if dist.any_rank(error is not None):
        raise error or checkpoint.CheckpointError("rank 0 could not write a checkpoint (see its error)")
    return result


EX_TEMPFAIL = 75  # exit status of a run stopped by a signal after saving: not finished, run it again


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": value}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_changes(state: dict[str, Any], tr: TrainState, cfg: TrainerConfig, step: int) -> None:
    """Refuse a resume from checkpoint `state` whose config changes what decides the data order, the network or
    the optimizer state it restores (each such key named: the fields marked `fixed`, `config.fixed_keys`), or
    whose shards have other content (their manifest's sha256; a copy elsewhere is the same shards); report any
    other change (learning rate, cadences, step budget, the shards' path…), which is allowed. A checkpoint from
    before shards were fingerprinted is compared by path: nothing proves the content the same."""
    before, now = _flat(state["config"]), _flat(config.to_dict(cfg))
    changed = [k for k in now if k in before and before[k] != now[k]]
    fixed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in changed if k in config.fixed_keys(cfg)]
    if state.get("shards_sha256", tr.shards) != tr.shards:
        fixed.append(f"data.shards: other content (manifest sha256 {state['shards_sha256'][:12]}… -> "
                     f"{tr.shards[:12]}…)")
    elif "shards_sha256" not in state and "data.shards" in changed:
        fixed.append(f"data.shards {before['data.shards']!r} -> {now['data.shards']!r} (the checkpoint predates "
                     "shard fingerprints)")
    if fixed:
        raise ConfigError(f"{cfg.run.dir} was trained to step {step} with other settings that decide the data order, "
                          f"the model or its optimizer: {'; '.join(fixed)}; use the same values, or another --run.dir")
    if changed:
        dist.print0(f"settings changed since step {step}: " + "; ".join(f"{k} {before[k]!r} -> {now[k]!r}"
                                                                        for k in changed))


def resume(tr: TrainState, task: Task, hold: contextlib.ExitStack) -> bool:
    """Take the run directory (rank 0 holds its lock in `hold`) and restore the newest checkpoint that verifies,
    if any. Rank 0 alone lists, verifies and chooses (so a stale network-filesystem listing on another node
    cannot split the ranks), and a refusal reaches every rank; every rank then loads the chosen file."""
    cfg = task.cfg
    run_dir = Path(cfg.run.dir)
    found, problem = None, None
    if dist.is_main():
        try:
            hold.enter_context(checkpoint.locked(run_dir, log=dist.print0))
            for stale in checkpoint.remove_temporaries(run_dir):
                dist.print0(f"removed {stale}, left by a save that was killed")
            if cfg.run.fresh:
                fresh(run_dir)
            found = checkpoint.load_latest(run_dir, log=dist.print0)
        except (checkpoint.CheckpointError, OSError) as e:  # raised on rank 0; the others get a line saying so
            problem = e
    step = dist.from_main(-2 if problem else found[0]["step"] if found else -1)
    if step == -2:
        raise problem or checkpoint.CheckpointError(f"{run_dir}: rank 0 could not resume (see its error)")
    if step == -1:
        return False
    state = found[0] if found else checkpoint.load(checkpoint.path_for(run_dir, step))
    check_changes(state, tr, cfg, step)
    tr.load_state_dict(state)
    dist.print0(f"resumed from {checkpoint.path_for(run_dir, step)} "
                f"(step {tr.step}, epoch {tr.epoch}, batch {tr.batch})")
    return True


def fresh(run_dir: Path) -> None:
    """`run.fresh`: set the run's checkpoints aside, once per job (`dist.job_id`), so that a requeue or an
    elastic restart, which repeats the arguments, resumes from what this job has saved since."""
    job = dist.job_id()
    moved = checkpoint.start_fresh(run_dir, job)
    if moved is None:
        dist.print0(f"run.fresh: skipped: this job ({job}) started {run_dir} afresh before, so its restart resumes "
                    f"(delete {run_dir / checkpoint.FRESH} to start afresh again)")
    for path in moved or ():
        dist.print0(f"run.fresh: {path.name} moved to {path.parent}")


class Logger:
    """Accumulates the task's stats, the loss and the skipped steps on the device between log steps; `check`
    and `log` are the only places they are read back (at sync points, see `sync_due`)."""

    def __init__(self, monitor: Monitor, device: torch.device, step: int, total: int):
        self.monitor, self.cuda, self.total = monitor, device.type == "cuda", total
        self.stats: dict[str, list[torch.Tensor]] = {}
        # non-finite steps, fp16 overflow steps, the current run of non-finite steps and the longest run
        self.health = torch.zeros(4, dtype=torch.int64, device=device)
        self.tick, self.tick_step = time.perf_counter(), step

    def record(self, losses: torch.Tensor, flags: torch.Tensor) -> None:
        """Count a step's outcome (`step_flags`); its loss goes into the mean unless the step was skipped."""
        bad, overflow = flags[0], flags[1]
        add_stat(self.stats, "train/loss", torch.where(bad, 0.0, losses.float().mean()), ~bad)
        nonfinite, overflows, run, longest = self.health.unbind()
        run = (run + 1) * bad
        self.health = torch.stack([nonfinite + bad, overflows + (overflow & ~bad), run, torch.maximum(longest, run)])

    def check(self, step: int, max_nonfinite: int) -> tuple[int, int]:
        """The non-finite and overflow step totals; an error when more than `max_nonfinite` came in a row."""
        nonfinite, overflows, _, longest = self.health.tolist()
        if longest > max_nonfinite:
            raise FloatingPointError(
                f"{longest} non-finite losses in a row by step {step}; stopping with the last good checkpoint "
                f"intact (lower train.lr, use bf16, or raise train.max_nonfinite)")
        return nonfinite, overflows

    def log(self, tr: TrainState, epoch: int, grad_norm: torch.Tensor, global_batch: int,
            max_nonfinite: int) -> None:
        """One line and the scalars: `train/loss` and the task's stats are means since the last log step."""
        nonfinite, overflows = self.check(tr.step, max_nonfinite)
        elapsed = time.perf_counter() - self.tick
        values = {"train/lr": tr.optimizer.param_groups[0]["lr"], "train/grad_norm": float(grad_norm),
                  "train/images_per_s": global_batch * (tr.step - self.tick_step) / max(elapsed, 1e-9),
                  "train/samples_seen": tr.samples_seen, "train/epoch": epoch, "train/nonfinite_steps": nonfinite}
        if tr.scaler.is_enabled():
            values.update({"train/overflow_steps": overflows, "train/loss_scale": tr.scaler.get_scale()})
        for name, (s, c) in sorted(self.stats.items()):
            s, c = dist.all_sum(s), dist.all_sum(c)
            if c > 0:
                values[name] = (s / c).item()
        if self.cuda:
            values["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        eta = elapsed / max(tr.step - self.tick_step, 1) * (self.total - tr.step)
        self.monitor.scalars(tr.step, values, total=self.total, eta_s=eta)
        self.stats.clear()
        self.tick, self.tick_step = time.perf_counter(), tr.step


def run(task: Task, stop: StopRequest) -> int:
    """Train to `train.max_steps` (or `train.epochs`): 0 when done, EX_TEMPFAIL (75) when a signal (`stop`,
    installed before any work) stopped it, so launchers can tell a run to start again from a finished one."""
    with contextlib.ExitStack() as hold:
        return _run(task, stop, hold)


def _run(task: Task, stop: StopRequest, hold: contextlib.ExitStack) -> int:
    cfg, env, t = task.cfg, task.env, task.cfg.train
    run_dir = Path(cfg.run.dir)

    # Prepare: config and data checks (every rank reaches the same verdict, so none is left waiting), then the
    # model, EMA, optimizer and precision.
    loader = checked_loader(task)
    per_rank = data.share(t.global_batch, env.world_size, env.rank)[1]
    total_steps = t.max_steps or t.epochs * loader.batches_per_epoch
    tr = setup(task)
    tr.shards = data.fingerprint(data.load_manifest(cfg.data.shards))

    # Resume from the newest checkpoint that verifies; then wrap for DDP and write the resolved config.
    resumed = resume(tr, task, hold)
    if dist.is_main():
        write_text(run_dir / "config.yaml", config.dump(cfg))
    wrap(tr, task)
    monitor = Monitor(run_dir, dist.is_main(), purge_step=tr.step + 1 if resumed else None)
    try:
        info = {"world_size": env.world_size, "ranks_per_node": env.local_world_size, "device": str(env.device),
                "backend": env.backend, "precision": t.precision, **task.describe(tr.model)}
        dist.print0("ddpdiff " + " ".join(f"{k}={v}" for k, v in info.items()))
        dist.print0(f"training to step {total_steps}: {loader.batches_per_epoch} steps per epoch, global batch "
                    f"{t.global_batch} ({per_rank} on rank 0, in micro-batches of at most {micro_size(task)}), run "
                    f"dir {run_dir}")
        if not resumed and task.eval_due(0):
            task.evaluate(0, tr.ema.model, monitor)
        if tr.step < total_steps and dist.any_rank(stop.signal is not None):
            dist.print0(f"stopped by signal {stop.signal or '(on another rank)'} before step {tr.step + 1}; "
                        "nothing new to save, the same command resumes")
            return EX_TEMPFAIL
        writer = hold.enter_context(checkpoint.Writer(cfg.checkpoint.async_write))  # waited for before unlocking
        return _loop(task, tr, loader, total_steps, monitor, stop, resumed, writer)
    finally:
        monitor.close()


STOP_CHECK_STEPS = 10  # a signal is acted on within this many steps (or at the next log step, if sooner)
# The stop's save waits at most this long for a write in flight, so that the steps to the next check, the wait
# and the stop's own write fit the grace a launcher gives after its signal (torchrun and SLURM's KillWait: 30 s
# by default; docs/benchmarks.md has the times). If that write is still going, the stop saves nothing and the
# checkpoint before it stays the newest complete one.
STOP_WAIT_S = 10


def sync_due(task: Task, step: int, total_steps: int) -> bool:
    """Whether the host reads the device after `step`: to log, evaluate, save, or check for a stop signal.
    No other step waits for the device; every rank reaches the same answer."""
    cfg = task.cfg
    return (step == total_steps or due(step, cfg.log.every_steps) or due(step, cfg.checkpoint.every_steps)
            or task.eval_due(step) or due(step, STOP_CHECK_STEPS))


def _loop(task: Task, tr: TrainState, loader: Any, total_steps: int, monitor: Monitor, stop: StopRequest,
          resumed: bool, writer: checkpoint.Writer) -> int:
    """One optimizer step per global batch, with monitoring, evaluation and checkpoints, then the final save,
    waited for."""
    cfg, env, t = task.cfg, task.env, task.cfg.train
    last_saved = tr.step if resumed else -1
    logger = Logger(monitor, env.device, tr.step, total_steps)
    stopping, saved = False, True
    batches_left = batches(loader, tr.epoch, tr.batch) if tr.step < total_steps else iter(())
    for epoch, index, batch in batches_left:
        for g in tr.optimizer.param_groups:
            g["lr"] = lr_at(tr.step, total_steps, t)
        # The step; one skipped for a non-finite loss or gradient on any rank is counted, and too many in a row
        # end the run (checked at the next sync point, before any save).
        losses, grad_norm, flags = train_step(tr, task, batch, logger.stats)
        logger.record(losses, flags)
        tr.advance(t.global_batch, epoch, index, loader.batches_per_epoch)
        if not sync_due(task, tr.step, total_steps):
            continue

        # Monitoring, periodic evaluation and checkpoints.
        logger.check(tr.step, t.max_nonfinite)
        stopping = dist.any_rank(stop.signal is not None)
        if due(tr.step, cfg.log.every_steps) or tr.step == total_steps:
            logger.log(tr, epoch, grad_norm, t.global_batch, t.max_nonfinite)
        if task.eval_due(tr.step):
            task.evaluate(tr.step, tr.ema.model, monitor)
        if due(tr.step, cfg.checkpoint.every_steps) or tr.step == total_steps or stopping:
            saved = save(tr, task, writer, STOP_WAIT_S if stopping and tr.step < total_steps else None)
            last_saved = tr.step
        if stopping or tr.step >= total_steps:
            break

    # Final save, unless this step is already saved; the run ends only once it is on disk.
    if last_saved != tr.step:
        save(tr, task, writer)
    on_main(writer.wait)
    if stopping and tr.step < total_steps:
        dist.print0(f"stopped by signal {stop.signal or '(on another rank)'} at step {tr.step}; " + (
            "checkpoint saved, the same command resumes" if saved else
            f"not saved: the previous checkpoint's write was still in flight after {STOP_WAIT_S} s (STOP_WAIT_S) "
            "and was abandoned; the same command resumes from the newest complete checkpoint"))
        return EX_TEMPFAIL
    dist.print0(f"done: {tr.step} steps, checkpoints in {Path(cfg.run.dir) / 'checkpoints'}, TensorBoard logs in "
                f"{Path(cfg.run.dir) / 'tb'}")
    return 0
