"""Parameters and forward FLOPs per image of the denoisers, and what cross-attention costs at each resolution.

  python tools/bench_models.py [--config jobs/configs/celeba64.yaml] [--tokens 77 24]

Prints Markdown tables for docs/benchmarks.md. FLOPs come from torch.utils.flop_counter (a multiply-add
counts 2) and do not depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict

import torch

from ddpdiff import config
from ddpdiff.models import build_model, count_params, example_inputs, flop_counts, uses_tokens


def cross_attention_sizes(model: torch.nn.Module, image_size: int) -> dict[str, int]:
    """Module name -> feature-map size for every cross-attention layer (found by one traced forward)."""
    sizes, hooks = {}, []

    def record(name: str):
        def hook(module, args, out):
            sizes[f"{type(model).__name__}.{name}"] = args[0].shape[-1]  # FlopCounterMode's naming
        return hook

    for name, module in model.named_modules():
        if name.endswith(".cross"):
            hooks.append(module.register_forward_hook(record(name)))
    with torch.no_grad():
        model(*example_inputs(model, 1, image_size, 1))
    for h in hooks:
        h.remove()
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/celeba64.yaml")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512, help="CLIP embedding width (ViT-B-32: 512)")
    parser.add_argument("--token-dim", type=int, default=512, help="CLIP text-state width (ViT-B-32: 512)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[77, 24],
                        help="prompt lengths to price (77 = CLIP's context; ~24 a typical CelebA prompt)")
    args = parser.parse_args()
    cfg = config.load(args.config).model
    variants = {
        f"unet ({args.config}, cond={cfg.cond})": cfg,
        "unet (same, cond=pooled)": dataclasses.replace(cfg, cond="pooled"),
        "unet (ModelConfig defaults)": config.ModelConfig(),
        "unet_classic 64x[1,2,4,8,16]": config.ModelConfig(name="unet_classic", channels=64,
                                                            channel_mult=[1, 2, 4, 8, 16], cond="pooled"),
    }
    print(f"| model | params (M) | GFLOPs / image ({args.image_size}x{args.image_size}, "
          f"{args.tokens[0]} tokens) |\n| --- | ---: | ---: |")
    token_model = None
    for label, mcfg in variants.items():
        tokens = uses_tokens(mcfg)
        model = build_model(mcfg, args.image_size, args.dim, args.token_dim if tokens else None,
                            torch.zeros(2, args.token_dim) if tokens else None)
        total = flop_counts(model, args.image_size, args.tokens[0])["Global"]
        print(f"| {label} | {count_params(model) / 1e6:.2f} | {total / 1e9:.2f} |")
        token_model = token_model or (model if tokens else None)

    if token_model is None:
        return
    sizes = cross_attention_sizes(token_model, args.image_size)
    print(f"\nCross-attention in `{args.config}`'s unet, forward GFLOPs per image:\n")
    header = " | ".join(f"{n} tokens: GFLOPs (% of model)" for n in args.tokens)
    print(f"| feature map | layers | {header} |\n| --- | ---: |" + " ---: |" * len(args.tokens))
    rows: dict[int, list[float]] = defaultdict(lambda: [0.0] * len(args.tokens))
    totals = []
    for i, n in enumerate(args.tokens):
        counts = flop_counts(token_model, args.image_size, n)
        totals.append(counts["Global"])
        for name, size in sizes.items():
            rows[size][i] += counts[name]
    for size in sorted(rows, reverse=True):
        layers = sum(1 for s in sizes.values() if s == size)
        cells = " | ".join(f"{f / 1e9:.3f} ({100 * f / tot:.1f}%)" for f, tot in zip(rows[size], totals))
        print(f"| {size}x{size} | {layers} | {cells} |")


if __name__ == "__main__":
    main()
