"""clip_cosine: the cosine between the CLIP image embedding of each image (through CLIP's own preprocessing) and
its prompt's text embedding, with the CLIP the checkpoint names. Formerly `clip_score`, which it is not: no
x100, no clipping at 0 (the name is still accepted, metrics.ALIASES)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .. import clip
from ..images import to_pil
from .base import Batch, Metric, MetricReport, Setup, Sums


def clip_cosines(encoder: clip.Encoder, images: torch.Tensor, text_emb: np.ndarray, batch_size: int = 64,
                 progress: bool = False) -> torch.Tensor:
    """Cosine between each image's CLIP embedding and its row of L2-normalised `text_emb`: float64 [N]."""
    chunks = [encoder.encode_images(to_pil(images[i:i + batch_size]))
              for i in tqdm(range(0, len(images), batch_size), desc="clip", disable=not progress)]
    image_emb = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return torch.from_numpy((image_emb.astype(np.float64) * np.asarray(text_emb, np.float64)).sum(1))


@dataclass(frozen=True)
class ClipCosineReport(MetricReport):
    samples: float  # the mean cosine
    real: float
    num: int
    num_real: int

    def scalars(self) -> tuple[dict[str, float], dict[str, float]]:
        return {"eval/clip_cosine": self.samples, "eval/clip_cosine_real": self.real}, {}

    def lines(self) -> list[str]:
        return [f"CLIP cosine: {self.samples:.4f} (real val images: {self.real:.4f})"]


class ClipCosine(Metric):
    name = "clip_cosine"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        meta = setup.meta
        self.encoder = clip.load_matching(meta.clip, meta.empty_prompt, str(setup.device), setup.clip_pretrained)
        self.texts = [(batch, self.encoder.encode_texts(batch["prompt"])) for batch in (self.samples, self.real)]

    def sums(self, images: torch.Tensor | None, batch: Batch | None) -> Sums:
        text_emb = next(emb for known, emb in self.texts if known is batch)  # encoded once per setup
        spec = self.setup.spec
        cosines = clip_cosines(self.encoder, images, text_emb, spec.batch_size, self.setup.progress)
        return (torch.stack([cosines.sum(), torch.tensor(float(len(cosines)), dtype=torch.float64)]),)

    def report(self, samples: Sums, real: Sums | None) -> ClipCosineReport:
        (gs, gn), (rs, rn) = samples[0].tolist(), real[0].tolist()
        return ClipCosineReport(samples=gs / gn, real=rs / rn, num=int(gn), num_real=int(rn))
