"""The denoiser's condition (`Cond`): from a batch of the shards' stored CLIP embeddings, or from prompts
encoded by CLIP the way the shards were made. Training, previews, evaluation and the sampling CLI all build
their conditions here, so a prompt means the same numbers everywhere."""

from __future__ import annotations

from typing import Literal, Sequence, TypedDict

import numpy as np
import torch
import torch.nn.functional as F

from .clip import Encoder
from .data.batch import pad, to_float, to_torch

Source = Literal["text", "image", "mix"]
# Token states are padded (masked) to a multiple of this on the device: a batch of CLIP's at most 77 tokens
# takes one of 5 shapes, so torch.compile does not recompile per longest prompt, at little extra attention.
TOKEN_BUCKET = 16


class Cond(TypedDict, total=False):
    """What `model(x_t, t, cond, drop)` reads (docs/architecture.md, Models)."""
    pooled: torch.Tensor  # [B, D] L2-normalised CLIP embedding
    tokens: torch.Tensor  # [B, L, Dt] text token states (token-conditioned models only)
    mask: torch.Tensor  # [B, L] bool, True = real token


def from_batch(batch: dict, tokens: bool, device: torch.device | str, source: Source = "text",
               generator: torch.Generator | None = None) -> Cond:
    """The condition of a training batch: its text or image embedding, or per example either (`mix`, drawn
    from `generator`), plus the token states when the model reads them."""
    pooled = to_float(batch["clip_text"], device)
    if source == "image":
        pooled = to_float(batch["clip_image"], device)
    elif source == "mix":
        use_image = torch.rand(pooled.shape[0], 1, generator=generator, device=device) < 0.5
        pooled = torch.where(use_image, to_float(batch["clip_image"], device), pooled)
    cond = Cond(pooled=pooled)
    if tokens:
        states, mask = to_float(batch["tokens"], device), batch["token_mask"].to(device, non_blocking=True)
        extra = -states.shape[1] % TOKEN_BUCKET
        cond["tokens"], cond["mask"] = F.pad(states, (0, 0, 0, extra)), F.pad(mask, (0, extra))
    return cond


def from_prompts(encoder: Encoder, prompts: Sequence[str], tokens: bool, device: torch.device | str) -> Cond:
    """The condition of each prompt, [P, ...], built as the data pipeline builds a batch.

    Embeddings pass through float16 as in the shards, so the model sees numbers of the kind it was trained on.
    """
    pooled, states = encoder.encode_prompts(list(prompts))
    batch = {"clip_text": pooled.astype(np.float16)}
    if tokens:
        batch["tokens"], batch["token_len"] = pad([t.astype(np.float16) for t in states])
    return from_batch(to_torch(batch), tokens, device)


def take(cond: Cond, rows: torch.Tensor | slice) -> Cond:
    """The condition of some examples (rows of every entry)."""
    return Cond(**{k: v[rows] for k, v in cond.items()})
