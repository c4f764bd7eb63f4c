"""The CelebA format: its 40 attribute names, split codes and the prompt rule."""

from __future__ import annotations

from typing import Mapping

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
assert len(ATTRIBUTES) == 40

SPLITS = ("train", "val", "test")  # list_eval_partition.txt codes 0, 1, 2

PROMPT_RULE = "'Photo of person ' + positive attribute names (lower-cased, '_' -> ' ') joined by ', ' + '.'"


def prompt(attrs: Mapping[str, int]) -> str:
    """The original design's prompt: 'Photo of person arched eyebrows, smiling, wearing hat.'"""
    words = [name.lower().replace("_", " ") for name in ATTRIBUTES if attrs.get(name, 0) > 0]
    return "Photo of person " + ", ".join(words) + "." if words else "Photo of person."
