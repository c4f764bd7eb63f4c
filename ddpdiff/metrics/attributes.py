"""The attribute classifier that judges samples (python -m ddpdiff.train_classifier): loading it and its verdicts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import data
from ..celeba import ATTRIBUTES
from ..models import ClassifierMeta
from ..pipeline import load_network
from .spec import EvalError


def load_classifier(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, ClassifierMeta]:
    """The EMA attribute classifier of a train_classifier run directory or checkpoint, and its meta."""
    model, meta, _ = load_network(path, ClassifierMeta, device)
    if list(meta.attributes) != list(ATTRIBUTES):
        raise EvalError(f"{path}: the classifier predicts other attributes than the 40 CelebA ones")
    return model, meta


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The classifier's verdict on each image and attribute: bool [N, 40], True = present. Images in [-1, 1],
    or uint8 ones from the shards (converted on the device, `data.to_float`)."""
    device = next(model.parameters()).device
    out = [(model(data.to_float(images[i:i + batch_size], device)).float() > 0).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(ATTRIBUTES), dtype=torch.bool)


def attribute_hits(model: nn.Module, images: torch.Tensor, attrs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Where the classifier agrees with the 0/1 attributes: [N, 40] float, 1.0 = agrees."""
    return (predict(model, images, batch_size) == attrs.bool()).float()
