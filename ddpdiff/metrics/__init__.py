"""Does the text condition work? Metrics of generated images, each beside the same figure for real val images
(the ceiling a perfect model would reach), summed over ranks.

Sample i (of `num`) has the prompt, stored embeddings and attributes of val image i mod len(val). One module
per metric (attr_acc, clip_cosine, fid, held_out, diversity: each says what it measures) behind the interface
of `base.py`, looked up by name in `registry.METRICS`; `EvalSpec` says what to measure, the `Evaluator` splits
the work over ranks, holds the real-image ceilings and adds the sums. A metric whose inputs are missing is
skipped with a message saying how to provide them.
"""

from .attributes import attribute_hits, load_classifier, predict
from .base import Batch, Metric, MetricReport, Setup, Skip, Sums, Versus
from .evaluator import Evaluator, Generate, Report, problems, sampler
from .registry import ALIASES, METRICS, named, parse_metrics
from .spec import EvalError, EvalSpec, Setting, parse_attributes, parse_held_out

__all__ = ["ALIASES", "METRICS", "Batch", "EvalError", "EvalSpec", "Evaluator", "Generate", "Metric",
           "MetricReport", "Report", "Setting", "Setup", "Skip", "Sums", "Versus", "attribute_hits",
           "load_classifier", "named", "parse_attributes", "parse_held_out", "parse_metrics", "predict", "problems",
           "sampler"]
