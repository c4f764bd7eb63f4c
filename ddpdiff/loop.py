"""The training loop every ddpdiff trainer runs: DDP, mixed precision, accumulation, EMA, checkpoints, resume.

A trainer (diffusion, super-resolution, attribute classifier) supplies a `Task`: its loader, model, loss and
periodic evaluation. Everything else — the part that must be right on hundreds of GPUs — lives here once.
All randomness of optimizer step s on rank r is drawn from a seed derived from (train.seed, s, r), so a
resumed run repeats an uninterrupted one bit for bit, at any point it was killed.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, config, dist
from .atomic import write_text
from .config import Config, ConfigError
from .data import DataError, share
from .ema import EMA
from .monitor import Monitor


class Task(Protocol):
    """What a trainer plugs into the loop."""

    def loader(self, cfg: Config, env: dist.Env) -> Any:
        """A `ddpdiff.data.Loader` (or anything with `batches_per_epoch` and `epoch(e, start)`)."""

    def build_model(self, cfg: Config) -> nn.Module: ...

    def validate(self, cfg: Config) -> list[str]:
        """Problems with this config for this task, to be reported together with the loop's own."""

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Mean loss of a micro-batch and logging stats {name: (sum tensor, count tensor)}."""

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Figures for the first log line (parameter count, FLOPs per image…)."""

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint must carry to be used without the training data (e.g. which CLIP made it)."""

    def evaluate(self, step: int, model: nn.Module, monitor: Monitor) -> None:
        """Periodic evaluation with the EMA weights; called on every rank at each step where
        `sample.every_steps` or `eval.every_steps` comes due (the task checks which)."""


def launch(make_task, description: str, prog: str, argv: list[str] | None = None) -> int:
    """A trainer's entrypoint: parse its config, join the process group, run the loop, always leave the group.

    Config and data problems end the run with status 2 and one line; anything else raises, so torchrun
    reports it and stops the other ranks instead of leaving them waiting.
    """
    cfg, _ = config.parse_args(description, argv, prog=prog)
    env = dist.init(cfg.dist.timeout_s)
    try:
        return run(cfg, make_task(cfg, env))
    except (ConfigError, DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.cleanup()


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
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
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
class Training:
    """The model and what updates it, as `setup` builds them; `backward` and `update` make one step."""
    model: nn.Module  # unwrapped: what checkpoints store
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    forward: nn.Module  # the module losses are computed through (DDP and/or compiled wrapper of `model`)


def setup(cfg: Config, task: Task, env: dist.Env) -> Training:
    """Model (the same initial weights on every rank and every run), EMA, optimizer, precision."""
    t, cuda = cfg.train, env.device.type == "cuda"
    torch.manual_seed(t.seed)
    model = task.build_model(cfg).to(env.device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                        **({"fused": True} if cuda else {"foreach": True}))
    return Training(model, EMA(model, t.ema_decay), optimizer,
                    torch.amp.GradScaler(env.device.type, enabled=t.precision == "fp16"),
                    {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision), model)


def wrap(tr: Training, cfg: Config, env: dist.Env) -> None:
    """DDP across ranks (and torch.compile if asked), once the weights are final (after resume)."""
    forward = tr.model
    if env.world_size > 1:
        # DDP re-buckets gradients after its first step unless find_unused_parameters is set; a resumed
        # process would then sum its first step's gradients in another order than the uninterrupted run did.
        # (With two ranks every sum has two terms, exact in either order, so nothing needs fixing there.)
        forward = DDP(tr.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                      find_unused_parameters=cfg.dist.fixed_buckets and env.world_size > 2)
    tr.forward = torch.compile(forward) if cfg.train.compile else forward


def backward(tr: Training, cfg: Config, env: dist.Env, task: Task, batch: dict, step: int,
             stats: dict[str, list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one global batch's share on this rank, micro-batch by micro-batch, unscaled and clipped.

    Returns the micro-batches' losses and the gradient norm; adds the task's logging stats into `stats`.
    """
    t = cfg.train
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
            acc = stats.setdefault(name, [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)])
            acc[0] += total.detach().double().cpu()
            acc[1] += count.detach().double().cpu()
    tr.scaler.unscale_(tr.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
    return torch.stack(losses), grad_norm


def update(tr: Training, step: int, apply: bool) -> None:
    """Apply the gradients (and move the EMA), or drop them when any rank saw a non-finite value."""
    if apply:
        tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=True)
    if apply:
        tr.ema.update(tr.model, step)


def checked_loader(cfg: Config, env: dist.Env, task: Task) -> Any:
    """The task's training loader, after `validate`; a split smaller than one global batch is an error."""
    validate(cfg, env, task)
    loader = task.loader(cfg, env)
    if loader.batches_per_epoch == 0:
        raise ConfigError(f"data.shards: the training split is smaller than one global batch of "
                          f"{cfg.train.global_batch}")
    return loader


def validate(cfg: Config, env: dist.Env, task: Task) -> None:
    """Every problem with this run's config, in one error, before any data is opened."""
    t = cfg.train
    problems = list(task.validate(cfg))
    if t.global_batch < env.world_size:
        problems.append(f"train.global_batch {t.global_batch} is smaller than the world size {env.world_size}")
    if t.micro_batch < 0:
        problems.append(f"train.micro_batch must be >= 0, got {t.micro_batch}")
    if t.max_steps < 0 or t.epochs < 1:
        problems.append("train.max_steps must be >= 0 and train.epochs >= 1")
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep < 1:
        problems.append("checkpoint.every_steps and checkpoint.keep must be >= 1")
    if problems:
        raise ConfigError("invalid run: " + "; ".join(problems))


def run(cfg: Config, task: Task) -> int:
    env = dist.env()
    run_dir = Path(cfg.run.dir)
    t = cfg.train

    # Config and data checks (every rank reaches the same verdict, so none is left waiting).
    loader = checked_loader(cfg, env, task)
    per_rank = share(t.global_batch, env.world_size, env.rank)[1]
    micro = t.micro_batch or per_rank
    total_steps = t.max_steps or t.epochs * loader.batches_per_epoch

    # Model, EMA, optimizer, precision.
    tr = setup(cfg, task, env)
    model, ema, optimizer, scaler = tr.model, tr.ema, tr.optimizer, tr.scaler
    cuda = env.device.type == "cuda"

    # Resume from the newest checkpoint that verifies; every rank must land on the same step.
    step, epoch, index, samples_seen = 0, 0, 0, 0
    found = checkpoint.load_latest(run_dir, log=dist.print0)
    if found is not None:
        state, path = found
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, index, samples_seen = state["step"], state["epoch"], state["batch"], state["samples_seen"]
        dist.print0(f"resumed from {path} (step {step}, epoch {epoch}, batch {index})")
    if not dist.all_equal(step):
        raise RuntimeError(f"ranks resumed from different steps (this rank: {step}); is {run_dir} shared?")
    if dist.is_main():
        write_text(run_dir / "config.yaml", config.dump(cfg))
    wrap(tr, cfg, env)

    monitor = Monitor(run_dir, dist.is_main())
    evaluate_every = (cfg.sample.every_steps, cfg.eval.every_steps)
    info = {"world_size": env.world_size, "ranks_per_node": env.local_world_size, "device": str(env.device),
            "backend": env.backend, "precision": t.precision, **task.describe(model)}
    dist.print0("ddpdiff " + " ".join(f"{k}={v}" for k, v in info.items()))
    dist.print0(f"training to step {total_steps}: {loader.batches_per_epoch} steps per epoch, global batch "
                f"{t.global_batch} ({per_rank} on rank 0, in micro-batches of at most {micro}), run dir {run_dir}")
    if found is None and any(e > 0 for e in evaluate_every):
        task.evaluate(0, ema.model, monitor)
    stop = StopRequest()
    last_saved = step if found is not None else -1
    nonfinite_run, nonfinite_total = 0, 0
    stats: dict[str, list[torch.Tensor]] = {}
    tick, tick_step = time.perf_counter(), step

    def save() -> None:
        nonlocal last_saved
        if dist.is_main():
            checkpoint.save(run_dir, step, {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "batch": index,
                "samples_seen": samples_seen, "config": config.to_dict(cfg), "meta": task.metadata(),
                "rng": {"seed": t.seed, "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if cuda else []},
            }, cfg.checkpoint.keep)
        last_saved = step
        dist.barrier()

    # The loop: one optimizer step per global batch.
    try:
        data = batches(loader, epoch, index) if step < total_steps else iter(())
        for epoch_now, i, batch in data:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total_steps, t)
            losses, grad_norm = backward(tr, cfg, env, task, batch, step, stats)
            finite = bool(torch.isfinite(losses).all()) and bool(torch.isfinite(grad_norm))
            bad, stopping = dist.any_rank(not finite, stop.signal is not None)

            # Skip a step with a non-finite loss or gradient on any rank; too many in a row ends the run.
            update(tr, step, apply=not bad)
            if bad:
                nonfinite_run += 1
                nonfinite_total += 1
                if nonfinite_run > t.max_nonfinite:
                    raise FloatingPointError(
                        f"{nonfinite_run} non-finite losses in a row at step {step}; stopping with the last good "
                        f"checkpoint intact (lower train.lr, use bf16, or raise train.max_nonfinite)")
            else:
                nonfinite_run = 0
            step += 1
            samples_seen += t.global_batch
            epoch, index = (epoch_now, i + 1) if i + 1 < loader.batches_per_epoch else (epoch_now + 1, 0)

            # Monitoring, periodic evaluation and checkpoints.
            if step % cfg.log.every_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - tick
                values = {"train/loss": dist.all_mean(losses.mean().float().cpu()).item(),
                          "train/lr": optimizer.param_groups[0]["lr"], "train/grad_norm": float(grad_norm),
                          "train/images_per_s": t.global_batch * (step - tick_step) / max(elapsed, 1e-9),
                          "train/samples_seen": samples_seen, "train/epoch": epoch_now,
                          "train/nonfinite_steps": nonfinite_total}
                for name, (s, c) in sorted(stats.items()):
                    s, c = dist.all_sum(s), dist.all_sum(c)
                    if c > 0:
                        values[name] = (s / c).item()
                if cuda:
                    values["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                monitor.scalars(step, values)
                stats.clear()
                tick, tick_step = time.perf_counter(), step
            if any(e > 0 and step % e == 0 for e in evaluate_every):
                task.evaluate(step, ema.model, monitor)
            if step % cfg.checkpoint.every_steps == 0 or step == total_steps or stopping:
                save()
            if stopping:
                dist.print0(f"stopped by signal {stop.signal or '(on another rank)'} at step {step}; "
                            f"checkpoint saved, the same command resumes")
                break
            if step >= total_steps:
                break

        # Final save, unless this step is already on disk.
        if last_saved != step:
            save()
    finally:
        stop.restore()
        monitor.close()
    if step >= total_steps:
        dist.print0(f"done: {step} steps, checkpoints in {run_dir / 'checkpoints'}, TensorBoard logs in "
                    f"{run_dir / 'tb'}")
    return 0
