"""Every metric by the name `metrics` (the `--metrics` flag, `eval.metrics`) gives it: a new metric is its own
module and one line here. The order is the report's and the summary's."""

from __future__ import annotations

from typing import Iterable

from .attr_acc import AttrAcc
from .base import Metric
from .clip_cosine import ClipCosine
from .diversity import Diversity
from .fid import FID
from .held_out import HeldOut
from .spec import EvalError, Setting, names

METRICS: dict[str, type[Metric]] = {
    "attr_acc": AttrAcc,
    "clip_cosine": ClipCosine,
    "fid": FID,
    "held_out": HeldOut,
    "diversity": Diversity,
}
ALIASES = {"clip_score": "clip_cosine"}  # the former name, so existing configs and commands keep working


def named() -> tuple[str, ...]:
    """The metrics `metrics` may name (the others are turned on by settings of their own)."""
    return tuple(name for name, metric in METRICS.items() if metric.named)


def parse_metrics(metrics: str | Iterable[str]) -> tuple[str, ...]:
    """Metric names from a list or a comma-separated string, aliases resolved, checked against `named()`."""
    found, known = [ALIASES.get(m, m) for m in names(metrics)], named()
    unknown = [m for m in found if m not in known]
    if unknown or not found:
        raise EvalError(Setting("metrics"), f": unknown or no metrics {unknown or found} (known: {', '.join(known)})")
    return tuple(dict.fromkeys(found))
