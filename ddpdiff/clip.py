"""Loading open_clip models and encoding images, prompts and per-token text states.

Shards, sampling and evaluation all encode through `load(...)`, so the same model name and weights give
the same numbers everywhere (up to the float16 the shards store).

`clip_configs/tiny.json` is the stand-in for tests and the offline demo, always used with random weights.
Its text tower starts its residual branches small (`ls_init_value`: open_clip's LayerScale). Otherwise
random attention would overwrite each word's state with the average of the words before it, and a
denoiser could not tell late attributes apart (docs/benchmarks.md, Demo).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
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


def _create(name: str, pretrained: str, device: str) -> tuple[torch.nn.Module, object]:
    """The model in eval mode and its evaluation preprocessing; random weights are seeded locally."""
    if pretrained == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
        return model.eval(), preprocess
    is_path = os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))
    if is_path and not os.path.isfile(pretrained):
        raise ClipError(f"CLIP weights file not found: {pretrained} (pass an existing open_clip checkpoint file)")
    if not is_path and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ClipError(f"{name} has no pretrained tag {pretrained!r}: pass one of "
                        f"{open_clip.list_pretrained_tags_by_model(name) or []}, a local weights file, or 'none'")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except Exception as e:  # download failures arrive as many exception types
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ClipError(f"could not load {name} weights {pretrained!r} ({first}); offline? download the "
                        f"checkpoint elsewhere and pass it as --clip-pretrained /path/to/weights") from e
    return model.eval(), preprocess


class Encoder:
    """An open_clip model with its tokenizer and preprocessing, returning numpy float32 arrays."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "openai", device: str = "cpu"):
        # A config file is recorded by absolute path so the manifest reloads it from any directory.
        self.model_name = str(Path(model).resolve()) if model.endswith(".json") else model
        self.pretrained, self.device = pretrained, device
        name = _resolve_model(model)
        self.model, self.preprocess = _create(name, pretrained, device)
        self.tokenizer = open_clip.get_tokenizer(name)
        text = getattr(self.model, "text", self.model)  # CustomTextCLIP keeps its text tower in .text
        if getattr(text, "cls_emb", None) is not None or not hasattr(text, "ln_final"):
            raise ClipError(f"{model}: token states need a text tower whose ln_final sees every token")
        self._ln_final = text.ln_final
        self._text_layers = len(text.transformer.resblocks)
        self.dim = int(self.encode_texts([""]).shape[1])
        self.token_dim = int(self._ln_final.normalized_shape[0])

    def info(self) -> dict:
        """The manifest's "clip" entry: enough to reload this encoder with `load(model, pretrained)`."""
        return {"model": self.model_name, "pretrained": self.pretrained, "dim": self.dim,
                "token_dim": self.token_dim, "token_layer": TOKEN_LAYER, "text_layers": self._text_layers}

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


def load(model: str = "ViT-B-32", pretrained: str = "openai", device: str = "cpu") -> Encoder:
    """An encoder for `model` (open_clip name, 'tiny', or config .json) with `pretrained` (tag, file, 'none')."""
    return Encoder(model, pretrained, device)


def mismatch(want: dict, want_empty: dict, got: dict, got_empty: dict) -> str | None:
    """Why embeddings made by the encoder `got` ("clip" entry, empty prompt's embeddings) are not those of
    `want`: other widths, token layer or model, or other weights (the empty prompt embedded differently)."""
    fields = [k for k in ("model", "dim", "token_dim", "token_layer", "text_layers") if k in want and k in got]
    if any(got[k] != want[k] for k in fields):
        return f"trained with {_fmt(want, fields)}, but {got['model']} {got.get('pretrained')!r} is {_fmt(got, fields)}"
    a, b = (np.asarray(e["clip_text"], np.float32) for e in (want_empty, got_empty))
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    if cosine < SAME_WEIGHTS:
        return (f"trained with {want['model']} weights {want.get('pretrained')!r}, but {got.get('pretrained')!r} "
                f"embeds the empty prompt differently (cosine {cosine:.3f})")
    return None


def load_matching(info: dict, empty_prompt: dict, device: str = "cpu", pretrained: str | None = None,
                  where: str = "checkpoint") -> Encoder:
    """The encoder that made a checkpoint's embeddings, `info` being its "clip" entry and `empty_prompt` its
    stored embeddings of ""; `pretrained` relocates the weights (a local file on an offline node).

    Raises ClipError when the encoder differs from the one recorded (`mismatch`).
    """
    enc = load(info["model"], pretrained or info["pretrained"], device)
    problem = mismatch(info, empty_prompt, enc.info(), {"clip_text": enc.encode_texts([""])[0]})
    if problem:
        raise ClipError(f"CLIP mismatch: {where} was {problem}: pass the same weights with --clip-pretrained")
    return enc


def _fmt(info: dict, fields: list[str]) -> str:
    return "{" + ", ".join(f"{k}={info[k]}" for k in fields) + "}"
