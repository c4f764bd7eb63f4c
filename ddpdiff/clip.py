"""Loading open_clip models and encoding images, prompts and per-token text states.

Shards, sampling and evaluation all encode through `load(...)`, so the same model name and weights give
the same numbers everywhere (up to the float16 the shards store).

`clip_configs/tiny.json` is the stand-in for tests and the offline demo, always used with random weights.
Its text tower starts its residual branches small (`ls_init_value`: open_clip's LayerScale). Otherwise
random attention would overwrite each word's state with the average of the words before it, and a
denoiser could not tell late attributes apart (docs/benchmarks.md, Demo).

The activation: OpenAI's weights were trained with QuickGELU, but open_clip's plain names (`ViT-B-32`) build
GELU and load those weights into it with at most a warning, so every embedding would be subtly wrong. The
model name decides (`ViT-B-32-quickgelu`, the default, builds QuickGELU), except that a pretrained tag that
open_clip knows was trained with QuickGELU (`openai`) forces it. A local weights file says nothing about
itself: name the QuickGELU model for OpenAI's weights. The "clip" entry records what the model has.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from PIL import Image

from .errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-32-quickgelu", "openai"  # OpenAI's ViT-B/32 with its own activation
RANDOM_WEIGHTS_SEED = 0  # `--clip-pretrained none` always builds the same weights
# Cosine similarity below which an encoder's embedding of "" is not the one a checkpoint stored: float16
# storage and device differences stay far above it, other weights far below.
SAME_WEIGHTS = 0.999
TOKEN_LAYER = "ln_final"  # token states are the text tower's last hidden states after its final layer norm

open_clip.add_model_config(CONFIG_DIR)


class ClipError(UsageError):
    """A model or weights that cannot be loaded; the message is one line that says what to pass instead."""


def _resolve_model(model: str) -> str:
    """A registered name as is; a JSON config file is registered under its stem."""
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ClipError(f"CLIP config file not found: {model}")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ClipError(f"unknown CLIP model {model!r}: pass an open_clip name (e.g. ViT-B-32), 'tiny', "
                        "or a model config .json file")
    return model


def _config_quick_gelu(model: str) -> bool:
    """What open_clip builds for `model` by its config alone (and what it built before the tag rule)."""
    return bool(open_clip.get_model_config(_resolve_model(model)).get("quick_gelu", False))


def builds_quick_gelu(model: str, pretrained: str) -> bool:
    """Whether `load(model, pretrained)` builds QuickGELU: the model config's activation, or QuickGELU where
    open_clip's tag table says the weights were trained with it (a local file or 'none' has no tag)."""
    tag = open_clip.get_pretrained_cfg(_resolve_model(model), pretrained).get("quick_gelu", False)
    return bool(tag) or _config_quick_gelu(model)


def recorded_quick_gelu(info: dict) -> bool:
    """The activation of a "clip" entry; older entries lack it and were built by their model config alone."""
    return info["quick_gelu"] if "quick_gelu" in info else _config_quick_gelu(info["model"])


def _create(name: str, pretrained: str, device: str, quick: bool) -> tuple[torch.nn.Module, object]:
    """The model in eval mode and its evaluation preprocessing; random weights are seeded locally.

    `quick` only ever adds QuickGELU: a config that has it keeps it, and a record that says otherwise is then
    refused by `mismatch`.
    """
    if pretrained == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device,
                                                                         force_quick_gelu=quick)
        return model.eval(), preprocess
    is_path = os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))
    if is_path and not os.path.isfile(pretrained):
        raise ClipError(f"CLIP weights file not found: {pretrained} (pass an existing open_clip checkpoint file)")
    if not is_path and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ClipError(f"{name} has no pretrained tag {pretrained!r}: pass one of "
                        f"{open_clip.list_pretrained_tags_by_model(name) or []}, a local weights file, or 'none'")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                     force_quick_gelu=quick)
    except Exception as e:  # download failures arrive as many exception types
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ClipError(f"could not load {name} weights {pretrained!r} ({first}); offline? download the "
                        f"checkpoint elsewhere and pass it as --clip-pretrained /path/to/weights") from e
    return model.eval(), preprocess


class Encoder:
    """An open_clip model with its tokenizer and preprocessing, returning numpy float32 arrays."""

    def __init__(self, model: str = DEFAULT_MODEL, pretrained: str = DEFAULT_PRETRAINED, device: str = "cpu",
                 quick_gelu: bool | None = None):
        # A config file is recorded by absolute path so the manifest reloads it from any directory.
        self.model_name = str(Path(model).resolve()) if model.endswith(".json") else model
        self.pretrained, self.device = pretrained, device
        name = _resolve_model(model)
        quick = builds_quick_gelu(model, pretrained) if quick_gelu is None else quick_gelu
        self.model, self.preprocess = _create(name, pretrained, device, quick)
        self.tokenizer = open_clip.get_tokenizer(name)
        text = getattr(self.model, "text", self.model)  # CustomTextCLIP keeps its text tower in .text
        if getattr(text, "cls_emb", None) is not None or not hasattr(text, "ln_final"):
            raise ClipError(f"{model}: token states need a text tower whose ln_final sees every token")
        self._ln_final = text.ln_final
        self._text_layers = len(text.transformer.resblocks)
        self.dim = int(self.encode_texts([""]).shape[1])
        self.token_dim = int(self._ln_final.normalized_shape[0])

    def to(self, device: str | torch.device) -> Encoder:
        """Move the CLIP model to `device`; returns self."""
        self.model.to(device)
        self.device = str(device)
        return self

    def info(self) -> dict:
        """The manifest's "clip" entry: enough to reload this encoder (`load_matching`); "quick_gelu" is what
        the built model has, not what was asked for."""
        return {"model": self.model_name, "pretrained": self.pretrained, "dim": self.dim,
                "token_dim": self.token_dim, "token_layer": TOKEN_LAYER, "text_layers": self._text_layers,
                "quick_gelu": any(isinstance(m, QuickGELU) for m in self.model.modules())}

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """L2-normalised image embeddings of already preprocessed images [N, 3, S, S]."""
        x = self.model.encode_image(pixels.to(self.device))
        return F.normalize(x.float(), dim=-1).cpu().numpy()

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings [N, D], through open_clip's own preprocessing."""
        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))

    @torch.no_grad()
    def encode_prompts(self, texts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled L2-normalised embeddings [N, D] and per-token states [L_i, Dt] from one text forward."""
        tokens = self.tokenizer(texts).to(self.device)
        states = []
        hook = self._ln_final.register_forward_hook(lambda _m, _i, out: states.append(out))
        try:
            pooled = self.model.encode_text(tokens)
        finally:
            hook.remove()
        hidden = states[0].float().cpu().numpy()
        ends = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=1).cpu().numpy()  # first end-of-text
        per_token = [hidden[i, : ends[i] + 1] for i in range(len(texts))]
        return F.normalize(pooled.float(), dim=-1).cpu().numpy(), per_token

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised pooled text embeddings [N, D]."""
        return self.encode_prompts(texts)[0]

    def encode_tokens(self, texts: list[str]) -> list[np.ndarray]:
        """Final hidden states [L_i, Dt] after ln_final, before the projection, up to and including EOT."""
        return self.encode_prompts(texts)[1]


def load(model: str = DEFAULT_MODEL, pretrained: str = DEFAULT_PRETRAINED, device: str = "cpu",
         quick_gelu: bool | None = None) -> Encoder:
    """An encoder for `model` (open_clip name, 'tiny', or config .json) with `pretrained` (tag, file, 'none');
    `quick_gelu` True forces QuickGELU, False leaves the model config's, None follows `builds_quick_gelu`."""
    return Encoder(model, pretrained, device, quick_gelu)


def cosine(a, b) -> float:
    """Cosine similarity of two embeddings (or stacks of them, flattened)."""
    a, b = (np.asarray(e, np.float32).ravel() for e in (a, b))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def mismatch(want: dict, want_empty: dict, got: dict, got_empty: dict) -> str | None:
    """Why embeddings made by the encoder `got` ("clip" entry, empty prompt's embeddings) are not those of
    `want`: other widths, token layer, activation or model, or other weights (the empty prompt embedded
    differently; an activation alone barely changes it, hence its own field)."""
    if "quick_gelu" in want or "quick_gelu" in got:
        want, got = ({**e, "quick_gelu": recorded_quick_gelu(e)} for e in (want, got))
    fields = [k for k in ("model", "dim", "token_dim", "token_layer", "text_layers", "quick_gelu")
              if k in want and k in got]
    if any(got[k] != want[k] for k in fields):
        return f"trained with {_fmt(want, fields)}, but {got['model']} {got.get('pretrained')!r} is {_fmt(got, fields)}"
    cos = cosine(want_empty["clip_text"], got_empty["clip_text"])
    if cos < SAME_WEIGHTS:
        return (f"trained with {want['model']} weights {want.get('pretrained')!r}, but {got.get('pretrained')!r} "
                f"embeds the empty prompt differently (cosine {cos:.3f})")
    return None


def load_matching(info: dict, empty_prompt: dict, device: str = "cpu", pretrained: str | None = None,
                  where: str = "checkpoint") -> Encoder:
    """The encoder that made a checkpoint's embeddings, `info` being its "clip" entry and `empty_prompt` its
    stored embeddings of ""; `pretrained` relocates the weights (a local file on an offline node). It has the
    recorded activation, whatever the tag rule says today: a checkpoint trained on GELU embeddings of
    OpenAI's weights (before the rule) gets them again.

    Raises ClipError when the encoder differs from the one recorded (`mismatch`).
    """
    enc = load(info["model"], pretrained or info["pretrained"], device, recorded_quick_gelu(info))
    problem = mismatch(info, empty_prompt, enc.info(), {"clip_text": enc.encode_texts([""])[0]})
    if problem:
        raise ClipError(f"CLIP mismatch: {where} was {problem}: pass the same weights with --clip-pretrained")
    return enc


def _fmt(info: dict, fields: list[str]) -> str:
    return "{" + ", ".join(f"{k}={info[k]}" for k in fields) + "}"
