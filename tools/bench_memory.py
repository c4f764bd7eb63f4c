"""Activation memory per training image on a CUDA GPU, measured without one.

  python tools/bench_memory.py [--config jobs/configs/celeba64.yaml] [--grad-checkpointing off|on|both]
      [--batches 2 4] [--tokens 36] [--top N] [--json OUT] [--section.field value ...]

A training step's memory is a fixed part (weights, gradients, Adam's two moments and the EMA, all float32:
20 bytes a parameter) and a part that grows with the batch: the activations autograd saves in the forward
for the backward. This tool measures the second part as a GPU holds it, on any machine. It runs the
denoiser's forward on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and strides, no memory, no
device) under CUDA's autocast policy in the config's precision and memory format, and records every tensor
autograd saves (`saved_tensors_hooks`), each storage once. Bytes per image are the difference between two
batch sizes, so the weights' low-precision copies, which do not grow with the batch, fall out.

What a real GPU adds, and this leaves out: the allocator's rounding and fragmentation, the backward's
transient gradients, and with gradient checkpointing the one block recomputed at a time. Attention runs
through the fused kernels an sm80+ GPU takes (flash attention without a mask, memory-efficient attention
with the text mask), because a fake device cannot be asked which it supports. `tools/gpu_check.sh` runs
this beside `tools/bench_train.py`, whose peak is measured on the GPU.

Before/after a change: copy this file into a checkout of the old commit and run it there (it imports the
`ddpdiff` beside it). Prints Markdown tables to stderr and one JSON object to stdout (and `--json`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpdiff import config  # noqa: E402
from ddpdiff.models import build_model, count_params, example_inputs, uses_tokens  # noqa: E402

FIXED_BYTES_PER_PARAM = 4 * 5  # float32 weight, gradient, Adam's two moments, EMA
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
MiB = 2 ** 20


class FusedAttention(TorchFunctionMode):
    """`F.scaled_dot_product_attention` through the kernels a CUDA GPU (sm80+) picks for these calls: flash
    attention when there is no mask, memory-efficient attention with the text mask (flash takes none). SDPA
    cannot pick them on a fake device, and its fallback (the math kernel, float32 softmax on CUDA) saves the
    whole attention matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, *rest = args
        mask = kwargs.get("attn_mask", rest[0] if rest else None)
        if kwargs.get("dropout_p", 0.0) or kwargs.get("is_causal", False) or len(rest) > 1:
            raise NotImplementedError("bench_memory: attention with dropout or a causal mask")
        if mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[0]


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype | None):
    """CUDA's autocast policy in `dtype` (None: off) on a machine without CUDA, where `torch.autocast("cuda")`
    refuses: the same thread-local state it sets."""
    if dtype is None:
        yield
        return
    prev_enabled, prev_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev_enabled)
        torch.set_autocast_dtype("cuda", prev_dtype)


def saved_tensors(model: torch.nn.Module, batch: int, image_size: int, tokens: int, dtype: torch.dtype | None,
                  channels_last: bool) -> dict[str, dict]:
    """What one training forward of `batch` images saves for the backward on a CUDA device: storage -> dtype,
    bytes and shape, each storage once, the parameters' own storages left out."""
    mode, cuda = FakeTensorMode(), torch.device("cuda")

    def fake(t: torch.Tensor) -> torch.Tensor:
        return FakeTensor(mode, t.to("meta"), cuda)

    state = {n: torch.nn.Parameter(fake(p)) for n, p in model.named_parameters()}
    state.update({n: fake(b) for n, b in model.named_buffers()})
    x, t, cond, drop = (fake(v) if torch.is_tensor(v) else {k: fake(c) for k, c in v.items()}
                        for v in example_inputs(model, batch, image_size, tokens))
    saved: dict = {}
    with mode:
        params = {StorageWeakRef(p.untyped_storage()) for p in state.values()}
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            ref = StorageWeakRef(tensor.untyped_storage())
            if ref not in params and ref not in saved:
                saved[ref] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                              "bytes": tensor.untyped_storage().nbytes(), "shape": tuple(tensor.shape)}
            return tensor

        with (warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
              FusedAttention(), cuda_autocast(dtype)):
            warnings.filterwarnings("ignore", "CUDA is not available")  # the model's own autocast(enabled=False)
            torch.func.functional_call(model, state, (x, t, cond, drop))
    return saved


def per_image(small: dict, large: dict, batches: tuple[int, int]) -> tuple[dict[str, float], float]:
    """Saved bytes per image by dtype, and the part that does not grow with the batch (bytes)."""
    def by_dtype(saved: dict) -> dict[str, int]:
        sums: dict[str, int] = defaultdict(int)
        for s in saved.values():
            sums[s["dtype"]] += s["bytes"]
        return sums

    a, b = by_dtype(small), by_dtype(large)
    per = {d: (b.get(d, 0) - a.get(d, 0)) / (batches[1] - batches[0]) for d in sorted(set(a) | set(b))}
    return per, sum(a.values()) - batches[0] * sum(per.values())


def largest(saved: dict, top: int) -> list[dict]:
    """The `top` largest kinds of saved tensor (dtype and shape) and their MiB in all."""
    kinds: dict = defaultdict(lambda: [0, 0])
    for s in saved.values():
        kind = kinds[(s["dtype"], s["shape"])]
        kind[0] += 1
        kind[1] += s["bytes"]
    rows = sorted(kinds.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"dtype": d, "shape": list(shape), "count": n, "mib": nbytes / MiB}
            for (d, shape), (n, nbytes) in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/celeba64.yaml", help="YAML file from jobs/configs/")
    parser.add_argument("--grad-checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--batches", type=int, nargs=2, default=[2, 4], metavar=("B1", "B2"),
                        help="the two batch sizes whose difference gives the bytes per image")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512, help="CLIP embedding width (ViT-B-32: 512)")
    parser.add_argument("--token-dim", type=int, default=512, help="CLIP text-state width (ViT-B-32: 512)")
    parser.add_argument("--tokens", type=int, default=36, help="prompt length (36: CelebA's mean, docs/benchmarks.md)")
    parser.add_argument("--top", type=int, default=0,
                        help="also list the N largest kinds of saved tensor at the larger batch")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    args, rest = parser.parse_known_args(argv)
    cfg = config.load(args.config, rest)
    if not 0 < args.batches[0] < args.batches[1]:
        parser.exit(2, f"{parser.prog}: error: --batches needs two sizes, the first smaller (got {args.batches})\n")
    dtype = DTYPES[cfg.train.precision]
    tokens = uses_tokens(cfg.model)
    model = build_model(cfg.model, args.image_size, args.dim, args.token_dim if tokens else None,
                        torch.zeros(2, args.token_dim) if tokens else None, cfg.diffusion.timesteps)
    params = count_params(model)
    report = {"config": args.config, "precision": cfg.train.precision, "channels_last": cfg.train.channels_last,
              "tokens": args.tokens, "params": params, "fixed_mib": params * FIXED_BYTES_PER_PARAM / MiB,
              "results": []}
    print(f"{args.config}: {params / 1e6:.2f}M parameters, fixed {report['fixed_mib']:.0f} MiB "
          f"(float32 weights, gradients, Adam, EMA); {cfg.train.precision}, "
          f"channels_last {cfg.train.channels_last}, {args.tokens} tokens", file=sys.stderr)
    print("\n| checkpointing | saved MiB / image | by dtype | not per image (MiB) |\n| --- | ---: | --- | ---: |",
          file=sys.stderr)
    for on in {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]:
        model.set_grad_checkpointing(on)
        small, large = (saved_tensors(model, b, args.image_size, args.tokens, dtype, cfg.train.channels_last)
                        for b in args.batches)
        per, rest_bytes = per_image(small, large, tuple(args.batches))
        result = {"grad_checkpointing": on, "saved_mib_per_image": sum(per.values()) / MiB,
                  "by_dtype_mib_per_image": {d: v / MiB for d, v in per.items()},
                  "not_per_image_mib": rest_bytes / MiB}
        if args.top:
            result[f"largest_at_batch_{args.batches[1]}"] = largest(large, args.top)
        report["results"].append(result)
        dtypes = ", ".join(f"{d} {v:.1f}" for d, v in result["by_dtype_mib_per_image"].items() if v >= 0.05)
        print(f"| {'on' if on else 'off'} | {result['saved_mib_per_image']:.1f} | {dtypes} | "
              f"{result['not_per_image_mib']:.0f} |", file=sys.stderr)
        for row in result.get(f"largest_at_batch_{args.batches[1]}", []):
            print(f"    {row['count']:4d} x {row['dtype']:9s} {str(row['shape']):24s} {row['mib']:7.2f} MiB",
                  file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
