"""What a checkpoint says about its network, typed: enough to rebuild it without the training data or config.

Stored in checkpoints as plain JSON-able dicts under "meta" (the format the first checkpoints used):
a denoiser's has "clip", "image_size" and "empty_prompt"; the others name their "model".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ..errors import UsageError


class MetaError(UsageError):
    """A checkpoint's meta that is not of the kind asked for, or not readable."""


class _Named:
    """Metadata stored with its kind under "model" (all but the denoiser's, whose format came first)."""
    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.kind, **asdict(self)}


@dataclass(frozen=True)
class DenoiserMeta:
    """The shards a diffusion model was trained on: the CLIP that made its conditions, their image size, and
    the empty prompt's embeddings (the null condition for guidance)."""
    kind: ClassVar[str] = "denoiser"
    name: ClassVar[str] = "a diffusion"
    trainer: ClassVar[str] = "python -m ddpdiff.train"
    clip: dict[str, Any]  # the manifest's "clip": model, pretrained, dim, token_dim, token_layer, text_layers,
    # quick_gelu (absent in older ones)
    image_size: int
    empty_prompt: dict[str, Any]  # {"clip_text": [D floats], "tokens": [[Dt floats]] or None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SRMeta(_Named):
    kind: ClassVar[str] = "srresnet"
    name: ClassVar[str] = "an SRResNet"
    trainer: ClassVar[str] = "python -m ddpdiff.train_sr"
    scale: int
    channels: int
    num_blocks: int


@dataclass(frozen=True)
class ClassifierMeta(_Named):
    kind: ClassVar[str] = "attr_resnet"
    name: ClassVar[str] = "an attribute classifier"
    trainer: ClassVar[str] = "python -m ddpdiff.train_classifier"
    width: int
    blocks: list[int]
    image_size: int
    attributes: list[str]


Meta = DenoiserMeta | SRMeta | ClassifierMeta
KINDS: dict[str, type] = {cls.kind: cls for cls in (DenoiserMeta, SRMeta, ClassifierMeta)}


def kind_of(meta: Any) -> str | None:
    """The kind a stored meta dict describes, or None."""
    if not isinstance(meta, dict):
        return None
    if "model" in meta:
        return meta["model"] if meta["model"] in KINDS else None
    return DenoiserMeta.kind if "clip" in meta else None


def read(meta: Any, cls: type, where: str) -> Any:
    """The stored meta dict of a checkpoint as `cls`, or a MetaError naming what `where` holds instead."""
    found = kind_of(meta)
    if found != cls.kind:
        holds = f"{KINDS[found].name} model" if found else "no model metadata"
        raise MetaError(f"{where}: not {cls.name} checkpoint, it holds {holds} (train one with {cls.trainer})")
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in meta]
    if missing:
        raise MetaError(f"{where}: its meta lacks {', '.join(missing)}")
    return cls(**{n: meta[n] for n in names})
