"""Training throughput of a config on one device: images/s, step time, peak memory and model FLOPs utilisation.

  python tools/bench_train.py --config jobs/configs/celeba64.yaml [--data.shards DIR | --synthetic] \
      --steps 20 --warmup 5 [--batch N] [--compile] [--grad-checkpointing off|on|both] [--peak-tflops X] \
      [--reference diffusers] [--saves N [--save-dir DIR]] [--json OUT] [--section.field value ...]

Each step is the training loop's (ddpdiff/loop.py): the batch from the loader, `DiffusionTask.loss` under the
config's autocast, backward, gradient clipping, the optimizer step (fused Adam on a GPU), the EMA update;
precision, channels_last and torch.compile come from the config (`--compile` sets train.compile). One
process, the GPU when there is one. `--synthetic` replaces the shards by one random batch of the config's
sizes (image 64, CLIP dim 512, token states 512 x `--tokens` 36, all valid: ViT-B-32's widths and the mean
CelebA prompt length; uint8 pixels and float16 embeddings, as the loader gives them), so it times the model and
optimizer only (and the conversion to float on the device); otherwise batches come from the real
`Loader` over `data.shards`, and their time is included.

The first `--warmup` steps are not timed (compilation, autotuning, allocator growth). Each timed step is
wall clock between device synchronisations; images/s = batch / median step time. MFU = achieved model
FLOPs/s / peak, where model FLOPs per image = 3 x forward FLOPs (torch.utils.flop_counter, a multiply-add
counts 2, `--tokens` text tokens; backward counted as twice the forward) -- the recomputation of gradient
checkpointing is not counted, so it shows as lower MFU. Peak: `--peak-tflops`, by default 989 (H100 SXM
dense bf16/fp16) on CUDA with bf16 or fp16; otherwise MFU is null unless the flag is given. Memory is
torch.cuda.max_memory_allocated over the timed steps on a GPU, the process's max RSS on the CPU (a
high-water mark over the whole process: with `--grad-checkpointing both` the checkpointed variant runs
first, so each figure is its own). On CUDA, `host_syncs_per_step` counts the host-device synchronisations
that `torch.cuda.set_sync_debug_mode` reports inside the timed steps (the target is 0). Prints progress to
stderr and one JSON object to stdout (and `--json`).

`--saves N` also times N checkpoint saves of the trained state (model, EMA, optimizer, scaler, config), blocking
(`checkpoint.async_write false`) and in the background (`checkpoint.Writer`): how long each holds the training
loop, and how long until its file is written, fsynced, hashed and renamed.

`--reference diffusers` also times diffusers' `UNet2DConditionModel` built to the config's U-Net
(`reference_unet`: the same widths, residual blocks per level, scale-shift time embedding, pooled CLIP
embedding added to it, and cross-attention on the same token states at the same resolutions) in the same
training step, device and dtype, one step of each in turn, and reports both models' FLOPs per image,
images/s, TFLOP/s and ours / reference. diffusers' attention is a transformer block (self-attention,
cross-attention and a GEGLU feed-forward) wherever ours has cross-attention, so its FLOPs differ: the
TFLOP/s ratio is the one at equal work. Memory is then the two models' together.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpdiff import celeba, checkpoint, config, dist, loop  # noqa: E402
from ddpdiff.config import Config, ConfigError, ModelConfig  # noqa: E402
from ddpdiff.errors import cli  # noqa: E402
from ddpdiff.models import DenoiserMeta, count_params, flops_per_image, uses_tokens  # noqa: E402
from ddpdiff.models.layers import with_null, with_null_tokens  # noqa: E402
from ddpdiff.train import DiffusionTask  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0


class SyntheticLoader:
    """One random batch of a shard set's sizes and the loader's dtypes (uint8 pixels, float16 embeddings, so
    the step converts them on the device as in training), given again at every step (a `Loader` for
    `loop.batches`)."""

    def __init__(self, batch: int, image_size: int, dim: int, token_dim: int | None, tokens: int, steps: int):
        g = torch.Generator().manual_seed(0)
        text, image = (torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).half()
                       for _ in range(2))
        self.batch = {"key": [f"{i:06d}" for i in range(batch)],
                      "image": torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g,
                                             dtype=torch.uint8),
                      "clip_text": text, "clip_image": image}
        if token_dim:
            self.batch["tokens"] = torch.randn(batch, tokens, token_dim, generator=g).half()
            self.batch["token_mask"] = torch.ones(batch, tokens, dtype=torch.bool)
        self.batches_per_epoch = steps

    def epoch(self, epoch: int, start: int = 0):
        return (self.batch for _ in range(start, self.batches_per_epoch))


class BenchTask(DiffusionTask):
    """`DiffusionTask` (model, loss, checks) over `SyntheticLoader` batches with --synthetic, and with
    `reference` the diffusers U-Net as its model: the same data, loss, optimizer and precision."""

    def __init__(self, cfg: Config, env: dist.Env, args: argparse.Namespace, reference: bool = False):
        super().__init__(cfg, env)
        self.args, self.reference = args, reference

    def loader(self):
        if not self.args.synthetic:
            return super().loader()
        a, clip = self.args, self.manifest["clip"]
        return SyntheticLoader(self.cfg.train.global_batch, self.manifest["image_size"], clip["dim"],
                               clip["token_dim"], a.tokens, a.warmup + a.steps)

    def build_model(self) -> torch.nn.Module:
        if not self.reference:
            return super().build_model()
        model = reference_unet(self.cfg.model, self.metadata(), self.cfg.diffusion.timesteps)
        model.set_grad_checkpointing(self.cfg.train.grad_checkpointing)
        return model


def synthetic_manifest(out: Path, args: argparse.Namespace) -> Path:
    """A shard directory's manifest.json with these sizes and no shards, so `DiffusionTask` reads it as usual."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({
        "format": "ddpdiff-shards", "image_size": args.image_size, "attributes": list(celeba.ATTRIBUTES),
        "clip": {"model": "synthetic", "dim": args.dim, "token_dim": args.token_dim or None},
        "empty_prompt": {"clip_text": [0.0] * args.dim,
                         "tokens": [[0.0] * args.token_dim] * 2 if args.token_dim else None},  # <sot>, <eot>
        "splits": {}}))
    return out


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DConditionModel behind our denoiser's call, `model(x_t, t, cond, drop)`, with the same
    null pooled embedding and empty-prompt token states for dropped examples."""

    def __init__(self, cfg: ModelConfig, image_size: int, cond_dim: int, token_dim: int, null_tokens: torch.Tensor,
                 timesteps: int):
        super().__init__()
        from diffusers import (
            UNet2DConditionModel,  # the dev extra: only this comparison needs it
        )

        sizes = [image_size // 2 ** i for i in range(len(cfg.channel_mult))]
        cross = [size in cfg.cross_attn_resolutions for size in sizes]
        self.unet = UNet2DConditionModel(
            sample_size=image_size, in_channels=3, out_channels=3,
            block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
            down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
            up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
            mid_block_type="UNetMidBlock2DCrossAttn" if cross[-1] else None,
            cross_attention_dim=token_dim, attention_head_dim=cfg.num_heads,  # diffusers reads it as the head count
            norm_num_groups=math.gcd(32, cfg.channels), resnet_time_scale_shift="scale_shift",
            class_embed_type="projection", projection_class_embeddings_input_dim=cond_dim, dropout=cfg.dropout,
            flip_sin_to_cos=True, freq_shift=0)
        self.cond_dim, self.token_dim, self.time_scale = cond_dim, token_dim, 1000 / timesteps
        self.null = torch.nn.Parameter(torch.zeros(cond_dim))
        self.register_buffer("null_tokens", null_tokens.detach().float().clone())

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        (self.unet.enable_gradient_checkpointing if enabled else self.unet.disable_gradient_checkpointing)()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, drop: torch.Tensor) -> torch.Tensor:
        pooled = with_null(cond["pooled"], self.null, drop)
        tokens, mask = with_null_tokens(cond["tokens"], cond["mask"], self.null_tokens, drop)
        return self.unet(x, t * self.time_scale, encoder_hidden_states=tokens, class_labels=pooled,
                         encoder_attention_mask=mask).sample


def reference_unet(cfg: ModelConfig, meta: DenoiserMeta, timesteps: int) -> DiffusersUNet:
    """The diffusers U-Net matching `cfg` (model.name unet with token states: the comparison needs both)."""
    if cfg.name != "unet" or not uses_tokens(cfg) or not meta.clip.get("token_dim"):
        raise ConfigError("--reference diffusers compares the unet with cross-attention: set model.name unet, "
                          "model.cond tokens|both, and use shards (or --synthetic --token-dim) with token states")
    return DiffusersUNet(cfg, meta.image_size, meta.clip["dim"], meta.clip["token_dim"],
                         torch.tensor(meta.empty_prompt["tokens"], dtype=torch.float32), timesteps)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")),
                platform.machine())


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@contextlib.contextmanager
def syncs_counted(enabled: bool):
    """The host-device synchronisations inside the block, as CUDA's sync debug mode reports them (a list of
    warnings; empty when not `enabled`)."""
    if not enabled:
        yield []
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")
    seen[:] = [w for w in seen if "synchroniz" in str(w.message)]


class Stepper:
    """One task's training state and batches, stepped one training step at a time (so two can interleave):
    the loop's own `train_step` for one rank (no DDP, no logging, no checkpoints)."""

    def __init__(self, task: DiffusionTask, loader):
        self.task, self.cuda = task, task.env.device.type == "cuda"
        self.tr = loop.setup(task)
        loop.wrap(self.tr, task)
        self.data = loop.batches(loader, 0, 0)
        self.times, self.nonfinite, self.stats, self.step_index, self.syncs = [], 0, {}, 0, 0

    def step(self, timed: bool) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _, _, batch = next(self.data)
        self.tr.step = self.step_index
        with syncs_counted(self.cuda and timed) as seen:
            _, _, flags = loop.train_step(self.tr, self.task, batch, self.stats)
            self.nonfinite = self.nonfinite + flags.any().int()  # on the device, read once at the end
        self.syncs += len(seen)
        if self.cuda:
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - start)
        self.step_index += 1

    def result(self) -> dict:
        median = statistics.median(self.times)
        t = self.task.cfg.train
        result = {"grad_checkpointing": t.grad_checkpointing, "step_s_median": median, "step_s_min": min(self.times),
                  "step_s_max": max(self.times), "images_per_s": t.global_batch / median,
                  "nonfinite_steps": int(self.nonfinite)}
        if self.cuda:
            result["host_syncs_per_step"] = self.syncs / len(self.times)  # the target is 0
        return result


def time_saves(task: DiffusionTask, loader, saves: int, run_dir: Path) -> dict:
    """How long a checkpoint save holds the training loop (`loop.save`'s `checkpoint.Writer.start`) and how long
    until its file is complete, blocking (`checkpoint.async_write false`) and in the background, as the median of
    `saves` saves of each: the task's whole training state after one step (so the optimizer has its state), into
    a run directory under `run_dir` with `keep` 1. Each save starts once the previous one is complete, as when
    the write takes less than `checkpoint.every_steps` steps; otherwise the loop also waits for the rest of the
    previous write."""
    stepper = Stepper(task, loader)
    stepper.step(timed=False)
    state = {**stepper.tr.state_dict(), "config": config.to_dict(task.cfg), "meta": task.metadata().to_dict()}
    result = {}
    for mode in ("blocking", "background"):
        held, written = [], []
        with checkpoint.Writer(background=mode == "background") as writer:
            for step in range(1, saves + 1):
                start = time.perf_counter()
                writer.start(run_dir / mode, step, state, keep=1)
                held.append(time.perf_counter() - start)
                writer.wait()
                written.append(time.perf_counter() - start)
        result[mode] = {"held_s_median": statistics.median(held), "held_s_max": max(held),
                        "written_s_median": statistics.median(written)}
        dist.print0(f"  checkpoint save ({mode}): holds the loop {1e3 * result[mode]['held_s_median']:.0f} ms, "
                    f"complete after {1e3 * result[mode]['written_s_median']:.0f} ms (medians of {saves})",
                    file=sys.stderr)
    result["bytes"] = checkpoint.candidates(run_dir / "background")[0].stat().st_size
    return result


def model_size(task: DiffusionTask, tokens: int) -> tuple[int, int]:
    """Trainable parameters and forward FLOPs per image of the task's model."""
    model = task.build_model()
    return count_params(model), flops_per_image(model, task.manifest["image_size"], tokens)


def compare(ours: dict, ref: dict) -> dict:
    """Ours / the reference's images/s and achieved TFLOP/s, printed and returned."""
    out = {"grad_checkpointing": ours["grad_checkpointing"]}
    if not ours.get("oom") and not ref.get("oom"):
        out.update(images_per_s_ratio=ours["images_per_s"] / ref["images_per_s"],
                   tflops_ratio=ours["tflops"] / ref["tflops"])
        dist.print0(f"  grad_checkpointing={out['grad_checkpointing']}: ours / diffusers: images/s "
                    f"{out['images_per_s_ratio']:.3f}x, TFLOP/s {out['tflops_ratio']:.3f}x", file=sys.stderr)
    return out


def measure(tasks: list[DiffusionTask], loaders: list, steps: int, warmup: int) -> list[dict]:
    """Median step time and peak memory of `steps` training steps of each task after `warmup` untimed ones,
    one step of each task in turn (memory is the tasks' together)."""
    cuda = tasks[0].env.device.type == "cuda"
    steppers = [Stepper(task, loader) for task, loader in zip(tasks, loaders)]
    for step in range(warmup + steps):
        if step == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for stepper in steppers:
            stepper.step(timed=step >= warmup)
    results = [stepper.result() for stepper in steppers]
    memory = ({"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30} if cuda else {"max_rss_gib": max_rss_gib()})
    for r in results:
        r.update(memory)
    del steppers
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return results


@cli("bench_train")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file from jobs/configs/")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch", type=int, help="images per step (default: the config's train.global_batch)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (sets train.compile)")
    parser.add_argument("--grad-checkpointing", choices=["off", "on", "both"],
                        help="default: the config's train.grad_checkpointing; both measures each and the difference")
    parser.add_argument("--peak-tflops", type=float,
                        help=f"device peak for MFU (default on CUDA with bf16/fp16: {H100_BF16_DENSE_TFLOPS}, H100 "
                             "SXM dense; elsewhere MFU is null without it)")
    parser.add_argument("--synthetic", action="store_true", help="random batches instead of data.shards")
    parser.add_argument("--image-size", type=int, default=64, help="with --synthetic")
    parser.add_argument("--dim", type=int, default=512, help="CLIP embedding width, with --synthetic (ViT-B-32: 512)")
    parser.add_argument("--token-dim", type=int, default=512,
                        help="CLIP text-state width, with --synthetic (ViT-B-32: 512; 0 for none)")
    parser.add_argument("--tokens", type=int, default=36,
                        help="prompt length for the FLOP count and the synthetic token states (mean CelebA "
                             "prompt under ViT-B-32's tokenizer: 36)")
    parser.add_argument("--reference", choices=["diffusers"],
                        help="also time diffusers' UNet2DConditionModel of the config's sizes, steps interleaved, "
                             "and print ours / its images/s and TFLOP/s (needs the dev extra)")
    parser.add_argument("--saves", type=int, default=0,
                        help="also time N checkpoint saves of the trained state, blocking and in the background: how "
                             "long each holds the training loop and how long until its file is complete")
    parser.add_argument("--save-dir", type=Path,
                        help="where --saves writes (default: a temporary directory; pick the file system runs use)")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    args, rest = parser.parse_known_args(argv)
    cfg = config.load(args.config, rest)
    if args.steps < 1 or args.warmup < 0 or args.saves < 0:
        parser.exit(2, f"{parser.prog}: error: --steps must be >= 1, --warmup and --saves >= 0\n")
    t = cfg.train
    t.global_batch = args.batch or t.global_batch
    t.compile = t.compile or args.compile
    cfg.eval.every_steps = cfg.sample.every_steps = 0  # nothing here evaluates
    variants = {"off": [False], "on": [True], "both": [True, False], None: [t.grad_checkpointing]}
    variants = variants[args.grad_checkpointing]

    env = dist.init(cfg.dist.timeout_s, cfg.dist.device)
    try:
        if env.world_size > 1:
            raise ConfigError("run tools/bench_train.py as one process (it measures one device)")
        with tempfile.TemporaryDirectory() as tmp:
            if args.synthetic:
                cfg.data.shards = str(synthetic_manifest(Path(tmp) / "shards", args))
            tasks = [BenchTask(cfg, env, args, reference) for reference in ([False, True] if args.reference else
                                                                             [False])]
            loaders = [loop.checked_loader(task) for task in tasks]
            task = tasks[0]
            sizes = [model_size(task, args.tokens) for task in tasks]
            params, flops = sizes[0]
            peak = args.peak_tflops
            if peak is None and env.device.type == "cuda" and t.precision in ("bf16", "fp16"):
                peak = H100_BF16_DENSE_TFLOPS
            report = {
                "config": args.config, "data": "synthetic" if args.synthetic else cfg.data.shards,
                "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else
                f"cpu ({cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
                "torch": torch.__version__, "model": cfg.model.name, "params": params,
                "image_size": task.manifest["image_size"], "tokens": args.tokens,
                "gflops_forward_per_image": flops / 1e9, "batch": t.global_batch, "micro_batch": t.micro_batch or
                t.global_batch, "precision": t.precision, "channels_last": t.channels_last, "compile": t.compile,
                "steps": args.steps, "warmup": args.warmup, "peak_tflops": peak, "results": []}
            if args.reference:
                report["reference"] = {"model": "diffusers UNet2DConditionModel", "params": sizes[1][0],
                                       "gflops_forward_per_image": sizes[1][1] / 1e9, "results": []}
                dist.print0(f"bench_train: reference diffusers UNet2DConditionModel {sizes[1][0] / 1e6:.2f}M params, "
                            f"{sizes[1][1] / 1e9:.3f} forward GFLOPs/image, steps interleaved", file=sys.stderr)
            dist.print0(f"bench_train: {report['device']}, {cfg.model.name} {params / 1e6:.2f}M params, "
                        f"{flops / 1e9:.3f} forward GFLOPs/image, batch {t.global_batch}, {t.precision}",
                        file=sys.stderr)
            for checkpointing in variants:
                t.grad_checkpointing = checkpointing
                try:
                    results = measure(tasks, loaders, args.steps, args.warmup)
                except torch.cuda.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()
                    results = [{"grad_checkpointing": checkpointing, "oom": True}] * len(tasks)
                    dist.print0(f"  grad_checkpointing={checkpointing}: out of memory", file=sys.stderr)
                for r, (_, model_flops), name in zip(results, sizes, ["", "reference "]):
                    if not r.get("oom"):
                        r["tflops"] = 3 * model_flops * r["images_per_s"] / 1e12
                        r["mfu"] = r["tflops"] / peak if peak else None
                        memory = (f"peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else
                                  f"max RSS {r['max_rss_gib']:.2f} GiB")
                        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                        dist.print0(f"  {name}grad_checkpointing={checkpointing}: {r['images_per_s']:.1f} images/s, "
                                    f"step {1e3 * r['step_s_median']:.1f} ms (median), {r['tflops']:.3f} TFLOP/s, "
                                    f"MFU {mfu}, {memory}", file=sys.stderr)
                report["results"].append(results[0])
                if args.reference:
                    report["reference"]["results"].append(results[1])
            if args.saves:
                with tempfile.TemporaryDirectory(dir=args.save_dir) as save_dir:
                    report["checkpoint_saves"] = time_saves(task, loaders[0], args.saves, Path(save_dir))
        report["results"].sort(key=lambda r: r["grad_checkpointing"])
        if args.reference:
            report["reference"]["results"].sort(key=lambda r: r["grad_checkpointing"])
            report["vs_reference"] = [compare(ours, ref) for ours, ref in zip(report["results"],
                                                                             report["reference"]["results"])]
        if len(report["results"]) == 2 and not any(r.get("oom") for r in report["results"]):
            off, on = report["results"]
            mem = "peak_mem_gib" if "peak_mem_gib" in off else "max_rss_gib"
            report["checkpointing"] = {"memory_saving": 1 - on[mem] / off[mem],
                                       "time_cost": on["step_s_median"] / off["step_s_median"] - 1}
            dist.print0(f"  grad checkpointing saves {100 * report['checkpointing']['memory_saving']:.1f}% of "
                        f"{mem} and costs {100 * report['checkpointing']['time_cost']:+.1f}% step time",
                        file=sys.stderr)
    finally:
        dist.cleanup()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
