"""ddpdiff.clip: the shipped tiny model is deterministic; embeddings and token states are what they claim."""

import os
import subprocess

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image

from ddpdiff import clip

PROMPTS = ["Photo of person.", "Photo of person arched eyebrows, smiling, wearing hat.", ""]


@pytest.fixture(scope="module")
def tiny():
    return clip.load("tiny", "none")


def test_tiny_weights_do_not_depend_on_global_rng():
    torch.manual_seed(1)
    a = clip.load("tiny", "none").model.state_dict()
    torch.manual_seed(2)
    expected_next = torch.rand(3)
    torch.manual_seed(2)
    b = clip.load("tiny", "none").model.state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # loading left the global RNG alone
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_by_config_path_equals_tiny_by_name(tiny):
    other = clip.load(str(clip.CONFIG_DIR / "tiny.json"), "none")
    np.testing.assert_array_equal(other.encode_texts(PROMPTS), tiny.encode_texts(PROMPTS))


def test_info(tiny):
    assert tiny.info() == {"model": "tiny", "pretrained": "none", "dim": 64, "token_dim": 128,
                           "token_layer": "ln_final", "text_layers": 4, "quick_gelu": False}


# ---- the activation: OpenAI's weights need QuickGELU

@pytest.fixture(scope="module")
def tiny_quick():
    return clip.load("tiny", "none", quick_gelu=True)


def empty(encoder) -> dict:
    return {"clip_text": encoder.encode_texts([""])[0]}


def activations(encoder) -> set[type]:
    return {type(m) for m in encoder.model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


def test_quick_gelu_is_built_and_recorded(tiny, tiny_quick):
    assert activations(tiny) == {torch.nn.GELU} and tiny.info()["quick_gelu"] is False
    assert activations(tiny_quick) == {QuickGELU} and tiny_quick.info()["quick_gelu"] is True
    assert tiny_quick.info() | {"quick_gelu": False} == tiny.info()


@pytest.mark.parametrize("model, pretrained, quick", [
    ("ViT-B-32", "openai", True),  # open_clip's plain name would load OpenAI's weights into GELU
    ("ViT-B-32", "laion2b_s34b_b79k", False),  # trained with GELU
    ("ViT-B-32", "/weights/ViT-B-32.bin", False),  # a local file: the model name decides
    ("ViT-B-32-quickgelu", "/weights/ViT-B-32.bin", True),
    ("tiny", "none", False),
])
def test_openai_tags_force_quick_gelu_and_local_files_follow_the_name(model, pretrained, quick):
    assert clip.builds_quick_gelu(model, pretrained) is quick


def test_default_model_has_quick_gelu_and_openais_weights():
    """Random weights: the architecture the default `openai` weights are loaded into."""
    assert clip.DEFAULT_PRETRAINED in open_clip.list_pretrained_tags_by_model(clip.DEFAULT_MODEL)
    encoder = clip.load(clip.DEFAULT_MODEL, "none")
    assert activations(encoder) == {QuickGELU} and encoder.info()["quick_gelu"] is True


def test_mismatch_names_the_activation(tiny, tiny_quick):
    """The activation alone barely moves the empty prompt, so the weights check would not catch it."""
    assert clip.cosine(empty(tiny)["clip_text"], empty(tiny_quick)["clip_text"]) >= clip.SAME_WEIGHTS
    problem = clip.mismatch(tiny.info(), empty(tiny), tiny_quick.info(), empty(tiny_quick))
    assert "quick_gelu=False}, but tiny 'none' is {" in problem and problem.endswith("quick_gelu=True}")


def test_an_entry_without_activation_has_its_model_configs(tiny, tiny_quick, tiny_quick_gelu):
    """Older manifests and checkpoints: built by the model config alone, so ViT-B-32 with 'openai' was GELU."""
    older = {k: v for k, v in tiny.info().items() if k != "quick_gelu"}
    assert clip.mismatch(older, empty(tiny), tiny.info(), empty(tiny)) is None
    assert "quick_gelu=True" in clip.mismatch(older, empty(tiny), tiny_quick.info(), empty(tiny_quick))
    assert clip.recorded_quick_gelu({"model": "ViT-B-32", "pretrained": "openai"}) is False
    assert clip.recorded_quick_gelu({"model": str(tiny_quick_gelu), "pretrained": "none"}) is True


def test_load_matching_rebuilds_the_recorded_activation(tiny, tiny_quick):
    assert clip.load_matching(tiny_quick.info(), empty(tiny_quick)).info()["quick_gelu"] is True
    older = {k: v for k, v in tiny.info().items() if k != "quick_gelu"}
    assert clip.load_matching(older, empty(tiny)).info()["quick_gelu"] is False


def test_load_matching_refuses_a_model_without_the_recorded_activation(tiny_quick_gelu):
    """A config that now builds QuickGELU, for a checkpoint whose embeddings came from GELU."""
    encoder = clip.load(str(tiny_quick_gelu), "none")
    with pytest.raises(clip.ClipError, match=r"^CLIP mismatch: checkpoint was trained with \{.*quick_gelu=False\}, "
                                             r"but .* is \{.*quick_gelu=True\}: [^\n]*$"):
        clip.load_matching(encoder.info() | {"quick_gelu": False}, empty(encoder))


def test_image_embeddings_are_normalised(tiny):
    images = [Image.new("RGB", (178, 218), (200, 30, 30)), Image.new("L", (64, 64), 90).convert("RGB")]
    emb = tiny.encode_images(images)
    assert emb.shape == (2, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_token_states_end_at_end_of_text(tiny):
    states = tiny.encode_tokens(PROMPTS)
    lengths = [len(tiny.tokenizer.encode(p)) + 2 for p in PROMPTS]  # + start and end of text
    assert [s.shape for s in states] == [(n, 128) for n in lengths]
    assert all(s.dtype == np.float32 for s in states)


def test_token_states_are_ln_final_outputs_the_pooled_embedding_projects(tiny):
    """The pooled embedding is the end-of-text state through text_projection: same layer, right position."""
    pooled = tiny.encode_texts(PROMPTS)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1, rtol=1e-5)
    projection = tiny.model.text_projection.detach().numpy()
    for state, emb in zip(tiny.encode_tokens(PROMPTS), pooled):
        projected = state[-1] @ projection
        np.testing.assert_allclose(projected / np.linalg.norm(projected), emb, atol=1e-5)


def test_tiny_token_states_identify_their_word_whatever_comes_before(tiny):
    """A late word's state must still say which word it is, as a trained CLIP's does: otherwise the demo
    measures how badly random attention scrambles the prompt, not whether the denoiser follows it.

    Without the text tower's small LayerScale (ls_init_value in tiny.json) each state is mostly the average
    of the words before it, and this fails.
    """
    prefixes = ["", "arched eyebrows, big nose, black hair, eyeglasses, ",
                ("bags under eyes, bald, blurry, chubby, double chin, goatee, heavy makeup, male, narrow eyes, "
                 "oval face, pale skin, ")]
    words = ["smiling", "mustache", "young", "bangs"]
    pairs = [(w, p) for w in words for p in prefixes]
    encoded = tiny.encode_tokens([f"Photo of person {p}{w}." for w, p in pairs])
    unit = {pair: s[-3] / np.linalg.norm(s[-3]) for pair, s in zip(pairs, encoded)}  # the word, before "." <eot>
    for (word, prefix), state in unit.items():
        nearest = max((other for other in unit if other[1] != prefix), key=lambda other: float(state @ unit[other]))
        assert nearest[0] == word, f"{word!r} after {prefix!r} is nearest to {nearest[0]!r}"


def test_batching_does_not_change_results(tiny):
    together = tiny.encode_tokens(PROMPTS)
    alone = [tiny.encode_tokens([p])[0] for p in PROMPTS]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("model, pretrained, message", [
    ("tiny", "/no/such/weights.bin", "CLIP weights file not found: /no/such/weights.bin"),
    ("tiny", "laion2b", "tiny has no pretrained tag 'laion2b'"),
    ("ViT-Z-99", "none", "unknown CLIP model 'ViT-Z-99'"),
    ("/no/such/config.json", "none", "CLIP config file not found: /no/such/config.json"),
])
def test_load_errors_say_what_to_pass(model, pretrained, message):
    with pytest.raises(clip.ClipError, match=message):
        clip.load(model, pretrained)


@pytest.mark.slow
def test_offline_hub_error_says_how_to_pass_a_local_file(repo, python):
    """Run where no weights are cached and the hub is unreachable (HF_HUB_OFFLINE)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME="/nonexistent-cache")
    code = "from ddpdiff import clip\ntry:\n clip.load()\nexcept clip.ClipError as e:\n print(e)"
    out = subprocess.run([python, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert "--clip-pretrained /path/to/weights" in out.stdout and out.stdout.count("\n") == 1
