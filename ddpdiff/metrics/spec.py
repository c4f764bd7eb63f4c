"""`EvalSpec`, what one evaluation measures and how its samples are made, and `EvalError`, whose messages name
its settings so that each front end words them its own way (the CLI as flags, training as `eval.` keys)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .. import synthetic
from ..celeba import ATTRIBUTES
from ..errors import UsageError
from ..sampling import DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INTERVAL, DEFAULT_SAMPLER, DEFAULT_STEPS

Pair = synthetic.Pair


@dataclass(frozen=True)
class Setting:
    """An `EvalSpec` field named in an error message."""

    name: str


class EvalError(UsageError):
    """A setting or input evaluation cannot use; one line. `str()` names settings as `EvalSpec` fields,
    `worded(word)` as a front end calls them, so no front end rewrites another's message."""

    def __init__(self, *parts: str | Setting):
        self.parts = parts
        super().__init__(self.worded(lambda name: name))

    def worded(self, word: Callable[[str], str]) -> str:
        return "".join(p if isinstance(p, str) else word(p.name) for p in self.parts)

    @classmethod
    def joined(cls, problems: Sequence[EvalError]) -> EvalError:
        """One error listing several problems, separated by '; '."""
        parts: list[str | Setting] = []
        for i, problem in enumerate(problems):
            parts += ["; "] * bool(i) + list(problem.parts)
        return cls(*parts)


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation: `python -m ddpdiff.eval` makes it from its flags, training from `eval.*`;
    `metrics.problems` checks it against the shards and ranks before anything loads."""

    metrics: tuple[str, ...] = ("attr_acc", "clip_cosine")  # names in metrics.METRICS (or their aliases)
    num: int = 64  # samples, sample i for val prompt i mod len(val)
    attributes: tuple[str, ...] = tuple(ATTRIBUTES)  # averaged into attr_acc; diversity's groups share them
    classifier: str | Path | None = None  # attribute classifier run or checkpoint: attr_acc, held_out
    inception: str | Path | None = None  # Inception weights file for fid (None: DDPDIFF_INCEPTION_WEIGHTS)
    fid_split: str = "train"  # FID's reference split
    fid_count: int | None = None  # FID's reference: the split's first N images (None: all)
    held_out: tuple[Pair, ...] = ()  # attribute pairs to test for composition and binding
    held_out_num: int = 32  # samples per held-out pair, numbered after the `num` ordinary ones
    diversity_prompts: int = 8  # diversity's P val prompts
    diversity_samples: int = 8  # diversity's K samples per prompt (and real images per group)
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    guidance_interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL  # guidance only for t/T in it
    eta: float = 0.0  # DDIM eta
    seed: int = 0  # sample i's seed is image_seed(seed, i), as `python -m ddpdiff.sample --seed` gives it
    batch_size: int = 64  # images per sampler and metric batch


def names(values: str | Iterable[str]) -> list[str]:
    """Names from a list or a comma-separated string, stripped, empty ones dropped."""
    return [v.strip() for v in (values.split(",") if isinstance(values, str) else values) if v.strip()]


def parse_attributes(attributes: str | Iterable[str] | None) -> tuple[str, ...]:
    """Attribute names from a list or comma-separated string; None means all 40, 'visible' synthetic.VISIBLE."""
    if attributes is None:
        return tuple(ATTRIBUTES)
    found = names(synthetic.VISIBLE if attributes == "visible" else attributes)
    unknown = [a for a in found if a not in ATTRIBUTES]
    if unknown or not found:
        raise EvalError(Setting("attributes"), f": unknown or no attribute names {unknown or found} (CelebA names "
                        "such as Smiling,Eyeglasses, or 'visible' for the synthetic data's drawn ones)")
    return tuple(dict.fromkeys(found))


def parse_held_out(pairs: str | Iterable[Sequence[str]]) -> tuple[Pair, ...]:
    """Attribute pairs from "A+B,C+D" or a list of pairs (as `synthetic.parse_pairs` reads them)."""
    text = pairs if isinstance(pairs, str) else ",".join("+".join(pair) for pair in pairs)
    try:
        return tuple(dict.fromkeys(synthetic.parse_pairs(text)))
    except ValueError as e:
        raise EvalError(Setting("held_out"), f": {e}") from None
