"""Does the text condition work? Attribute accuracy, CLIP score and FID of samples for val-split prompts.

  python -m ddpdiff.eval --checkpoint runs/celeba64 --classifier runs/classifier --num 1000 \\
      [--metrics attr_acc,clip_score,fid] [--attributes Smiling,Eyeglasses] [--inception FILE]

Sample i is generated for the prompt of val image i (cycling when --num exceeds the val split), so each
sample has a known attribute vector. Every metric is reported beside the same metric for the real val
images, the ceiling a perfect model would reach:
  attr_acc    agreement of an attribute classifier (python -m ddpdiff.train_classifier) with the
              attributes each prompt names or leaves out, per attribute and the mean over --attributes;
  clip_score  cosine between the CLIP image embedding of each image (64x64, through CLIP's own
              preprocessing) and its prompt's text embedding, with the CLIP model the checkpoint names;
  fid         Fréchet Inception distance between the samples and the first --num val images; needs local
              Inception weights (--inception or DDPDIFF_INCEPTION_WEIGHTS, see ddpdiff/fid.py).
A metric whose inputs are missing is skipped with a message saying how to provide them. The JSON report
goes to stdout and to RUN/eval/step_S_numN_stepsK_guidanceG.json, the scalars to RUN/tb (TensorBoard).
During training the same evaluation runs every `eval.every_steps` on all ranks (`TrainingEval`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from . import clip, data, dist, fid, sample, synthetic, train, train_classifier
from .atomic import write_text
from .celeba import ATTRIBUTES
from .config import Config
from .diffusion import Diffusion
from .monitor import Monitor
from .sampling import SAMPLERS
from .sampling import sample as run_sampler

METRICS = ("attr_acc", "clip_score", "fid")
TRAIN_CLASSIFIER_HINT = ("attr_acc skipped: no attribute classifier; train one with `torchrun -m "
                         "ddpdiff.train_classifier --config jobs/configs/classifier.yaml` and pass its run "
                         "directory as --classifier (eval.classifier during training)")


class EvalError(ValueError):
    """An argument or input evaluation cannot use; the message is one line naming it."""


def parse_metrics(metrics: str | Iterable[str]) -> list[str]:
    """Metric names from a list or a comma-separated string, checked against METRICS."""
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise EvalError(f"--metrics: unknown or no metrics {unknown or names} (known: {', '.join(METRICS)})")
    return list(dict.fromkeys(names))


def parse_attributes(attributes: str | Iterable[str] | None) -> list[str]:
    """Attribute names from a list or comma-separated string; None means all 40, 'visible' synthetic.VISIBLE."""
    if attributes is None:
        return list(ATTRIBUTES)
    if isinstance(attributes, str):
        attributes = list(synthetic.VISIBLE) if attributes == "visible" else attributes.split(",")
    names = [a.strip() for a in attributes if a.strip()]
    unknown = [a for a in names if a not in ATTRIBUTES]
    if unknown or not names:
        raise EvalError(f"--attributes: unknown or no attribute names {unknown or names} (CelebA names such as "
                        "Smiling,Eyeglasses, or 'visible' for the synthetic data's drawn ones)")
    return list(dict.fromkeys(names))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1] [N,3,H,W] as 8-bit PIL images, quantised as when saved to PNG."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def clip_scores(encoder: clip.Encoder, images: torch.Tensor, text_emb: np.ndarray, batch_size: int = 64,
                progress: bool = False) -> torch.Tensor:
    """Cosine between each image's CLIP embedding and its row of L2-normalised `text_emb`: float64 [N]."""
    chunks = [encoder.encode_images(to_pil(images[i:i + batch_size]))
              for i in tqdm(range(0, len(images), batch_size), desc="clip", disable=not progress)]
    image_emb = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return torch.from_numpy((image_emb.astype(np.float64) * np.asarray(text_emb, np.float64)).sum(1))


def _take(batch: dict, rows: list[int]) -> dict:
    """Rows of a batch from `data.read_samples` (tensors and lists alike)."""
    index = torch.tensor(rows, dtype=torch.long)
    return {k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in batch.items()}


class Evaluator:
    """One evaluation setup, loaded once and run at many steps: this rank's share of the val prompts and
    real images, the classifier, CLIP and Inception, and the real-image ceilings (computed on first use).

    Sample i (of `num`) has the prompt and attributes of val image i mod len(val); rank r makes samples
    r, r + world_size, …; sums over ranks give the results, so every rank returns the same report.

    Args:
        meta: the diffusion checkpoint's `meta` (which CLIP made its conditions, image size).
        classifier: train_classifier run directory or checkpoint; None skips attr_acc with a message.
        inception: Inception weights file (None: DDPDIFF_INCEPTION_WEIGHTS or skip fid), or a ready
            feature network [B,3,H,W] in [-1,1] -> [B,D].
        log: where skip messages go (the CLI keeps stdout for the JSON report).
    """

    def __init__(self, shards: str | Path, meta: dict, metrics: Iterable[str], num: int, *,
                 classifier: str | Path | None = None, attributes: Iterable[str] | str | None = None,
                 inception: str | Path | nn.Module | None = None, device: str | torch.device | None = None,
                 batch_size: int = 64, clip_pretrained: str | None = None, rank: int = 0, world_size: int = 1,
                 progress: bool = False, log: Callable[[str], None] = lambda msg: None):
        self.metrics, self.attributes = parse_metrics(metrics), parse_attributes(attributes)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size, self.progress, self.num, self.skipped = batch_size, progress, num, {}
        n_val = data.load_manifest(shards)["splits"].get("val", {}).get("count", 0)
        if not world_size <= num or not world_size <= n_val:
            raise EvalError(f"--num {num} and the val split of {shards} ({n_val} images) must both be at least "
                            f"the number of ranks ({world_size})")
        val = data.read_samples(shards, split="val", n=min(num, n_val))
        self.samples = _take(val, [i % n_val for i in range(rank, num, world_size)])
        self.real = _take(val, list(range(rank, min(num, n_val), world_size)))

        if "attr_acc" in self.metrics and classifier is None:
            self._skip("attr_acc", TRAIN_CLASSIFIER_HINT, log)
        elif "attr_acc" in self.metrics:
            self.classifier, cmeta = train_classifier.load(classifier, self.device)
            if cmeta["image_size"] != meta["image_size"]:
                raise EvalError(f"--classifier {classifier}: trained on {cmeta['image_size']}px images, but the "
                                f"checkpoint makes {meta['image_size']}px samples")
        if "clip_score" in self.metrics:
            self.encoder = sample.load_encoder(meta, self.device, clip_pretrained)
            self.samples["text_emb"] = self.encoder.encode_texts(self.samples["prompt"])
            self.real["text_emb"] = self.encoder.encode_texts(self.real["prompt"])
        if "fid" in self.metrics:
            if isinstance(inception, nn.Module):
                self.inception = inception.to(self.device).eval()
            elif (path := fid.weights_path(inception)) is None:
                self._skip("fid", fid.SKIP_MESSAGE, log)
            else:
                self.inception = fid.load(path, device=self.device)
        self._real_sums: dict[str, torch.Tensor] | None = None

    def _skip(self, metric: str, message: str, log: Callable[[str], None]) -> None:
        self.metrics.remove(metric)
        self.skipped[metric] = message
        log(message)

    def _sums(self, images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-metric sums over this rank's images, reduced over all ranks (same order on every rank)."""
        sums = {}
        if "attr_acc" in self.metrics:
            agree = train_classifier.hits(self.classifier, images, batch["attrs"], self.batch_size)
            sums["attr_acc"] = torch.cat([agree.sum(0).double(), torch.tensor([float(len(agree))], dtype=torch.float64)])
        if "clip_score" in self.metrics:
            scores = clip_scores(self.encoder, images, batch["text_emb"], self.batch_size, self.progress)
            sums["clip_score"] = torch.stack([scores.sum(), torch.tensor(float(len(scores)), dtype=torch.float64)])
        if "fid" in self.metrics:
            sums["fid"] = fid.moments(fid.features(self.inception, images, self.batch_size, self.progress))
        return {k: dist.all_sum(v) for k, v in sums.items()}

    @torch.no_grad()
    def run(self, generate: Callable[[dict], torch.Tensor]) -> dict:
        """The report for images `generate(batch)` makes for this rank's prompts: [len(batch), 3, H, W] in [-1, 1].

        `batch` holds `prompt`, `attrs`, `clip_text` (and `tokens`, `token_mask` when the shards have them).
        """
        images = generate(self.samples).float().cpu()
        if len(images) != len(self.samples["prompt"]):
            raise EvalError(f"generate returned {len(images)} images for {len(self.samples['prompt'])} prompts")
        images = ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # 8-bit, as saved and as the real ones
        gen = self._sums(images, self.samples)
        if self._real_sums is None:
            self._real_sums = self._sums(self.real["image"], self.real)
        return self._report(gen, self._real_sums)

    def _report(self, gen: dict, real: dict) -> dict:
        out: dict = {"metrics": list(self.metrics), "skipped": dict(self.skipped), "num": self.num}
        if "attr_acc" in gen:
            g, r = (s[:-1] / s[-1] for s in (gen["attr_acc"], real["attr_acc"]))
            chosen = [ATTRIBUTES.index(a) for a in self.attributes]
            out["attr_acc"] = {
                "mean": g[chosen].mean().item(), "real_mean": r[chosen].mean().item(),
                "attributes": self.attributes, "num": int(gen["attr_acc"][-1]), "num_real": int(real["attr_acc"][-1]),
                "per_attribute": {name: {"samples": g[i].item(), "real": r[i].item()}
                                  for i, name in enumerate(ATTRIBUTES)}}
        if "clip_score" in gen:
            (gs, gn), (rs, rn) = gen["clip_score"].tolist(), real["clip_score"].tolist()
            out["clip_score"] = {"samples": gs / gn, "real": rs / rn, "num": int(gn), "num_real": int(rn)}
        if "fid" in gen:
            out["fid"] = {"value": fid.fid_from_moments(gen["fid"], real["fid"]), "num": int(gen["fid"][0]),
                          "num_real": int(real["fid"][0])}
        return out


def scalars(report: dict) -> tuple[dict[str, float], dict[str, float]]:
    """TensorBoard scalars of a report: the headline ones, and the per-attribute accuracies."""
    head, detail = {}, {}
    if "attr_acc" in report:
        a = report["attr_acc"]
        head.update({"eval/attr_acc": a["mean"], "eval/attr_acc_real": a["real_mean"]})
        detail.update({f"eval/attr_acc/{name}": v["samples"] for name, v in a["per_attribute"].items()})
    if "clip_score" in report:
        head.update({"eval/clip_score": report["clip_score"]["samples"],
                     "eval/clip_score_real": report["clip_score"]["real"]})
    if "fid" in report:
        head["eval/fid"] = report["fid"]["value"]
    return head, detail


def summary(report: dict) -> str:
    """Human-readable lines of a report (the demo prints them)."""
    lines = []
    if "attr_acc" in report:
        a = report["attr_acc"]
        lines.append(f"attribute accuracy over {len(a['attributes'])} attributes, {a['num']} samples: "
                     f"{a['mean']:.3f} (classifier on {a['num_real']} real val images: {a['real_mean']:.3f})")
        lines += [f"  {name:<20} {a['per_attribute'][name]['samples']:.3f} (real {a['per_attribute'][name]['real']:.3f})"
                  for name in a["attributes"]]
    if "clip_score" in report:
        c = report["clip_score"]
        lines.append(f"CLIP score: {c['samples']:.4f} (real val images: {c['real']:.4f})")
    if "fid" in report:
        f = report["fid"]
        lines.append(f"FID: {f['value']:.2f} ({f['num']} samples vs {f['num_real']} val images)")
    lines += list(report["skipped"].values())
    return "\n".join(lines)


def evaluate(checkpoint: str | Path, shards: str | Path | None = None, metrics: Iterable[str] | str = METRICS,
             num: int = 64, steps: int = 50, guidance: float = 3.0, classifier: str | Path | None = None,
             attributes: Iterable[str] | str | None = None, inception: str | Path | nn.Module | None = None,
             sampler: str = "ddim", seed: int = 0, batch_size: int = 64, device: str | torch.device | None = None,
             clip_pretrained: str | None = None, progress: bool = True,
             log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Generate `num` samples for val prompts with a diffusion checkpoint and report the metrics (one process).

    `shards` defaults to the checkpoint's own data.shards; sampling is `ddpdiff.sample.generate` with
    prompt index = sample index, so a seed gives the same report again.
    """
    state, path = sample.read_denoiser(checkpoint)
    cfg = state["config"]
    # The sampling arguments are checked before the slow loading (the prompts come later, from val).
    sample.check_args(["val prompts"], num, sampler, steps, 0.0, batch_size, cfg["diffusion"]["timesteps"])
    shards = shards or cfg["data"]["shards"]
    evaluator = Evaluator(shards, state["meta"], metrics, num, classifier=classifier, attributes=attributes,
                          inception=inception, device=device, batch_size=batch_size,
                          clip_pretrained=clip_pretrained, progress=progress, log=log)
    report = evaluator.run(lambda batch: sample.generate(
        path, batch["prompt"], sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
        device=device, progress=progress, clip_pretrained=clip_pretrained))
    settings = {"checkpoint": str(path), "step": state["step"], "shards": str(shards), "sampler": sampler,
                "steps": steps, "guidance": guidance, "seed": seed, "classifier": str(classifier) if classifier else None}
    return {**settings, **report}


def problems(cfg: Config, world_size: int) -> list[str]:
    """What is wrong with the `eval` section for in-training evaluation (nothing when it is off)."""
    e, out = cfg.eval, []
    if e.every_steps < 0:
        out.append(f"eval.every_steps must be >= 0, got {e.every_steps}")
    if e.every_steps <= 0:
        return out
    try:
        parse_metrics(e.metrics)
    except EvalError as err:
        out.append(str(err).replace("--metrics", "eval.metrics"))
    if e.num < world_size:
        out.append(f"eval.num {e.num} is less than the world size {world_size} (every rank makes samples)")
    if not 1 <= e.steps <= cfg.diffusion.timesteps:
        out.append(f"eval.steps {e.steps} is outside 1..{cfg.diffusion.timesteps} (diffusion.timesteps)")
    manifest = data.load_manifest(cfg.data.shards)
    val = manifest["splits"].get("val", {}).get("count", 0)
    if val < world_size:
        out.append(f"the val split of {cfg.data.shards} has {val} images, fewer than the {world_size} ranks")
    if e.classifier:
        try:
            _, cmeta = train_classifier.load(e.classifier)
            if cmeta["image_size"] != manifest["image_size"]:
                out.append(f"eval.classifier {e.classifier}: trained on {cmeta['image_size']}px images, but "
                           f"the shards hold {manifest['image_size']}px ones")
        except (FileNotFoundError, train_classifier.ClassifierError) as err:
            out.append(f"eval.classifier: {err}")
    try:
        fid.weights_path(e.inception)
    except fid.FIDError as err:
        out.append(str(err).replace("--inception", "eval.inception"))
    return out


class TrainingEval:
    """Evaluation inside diffusion training, every `eval.every_steps`; call it on every rank at every
    evaluation step (`Task.evaluate`).

    Each rank samples its share of `eval.num` prompts with the EMA model, conditioned on the shards' stored
    CLIP embeddings as in training, scores them, and one all-reduce per metric gathers the sums; rank 0 logs
    `eval/...` scalars. No rank waits for another beyond the sampling of one image, so none reaches the
    collective timeout. Resources (classifier, CLIP, Inception, val images) load at the first evaluation.
    """

    def __init__(self, cfg: Config, meta: dict, env: dist.Env):
        self.cfg, self.meta, self.env = cfg, meta, env
        self.evaluator: Evaluator | None = None
        self.diffusion = Diffusion(cfg.diffusion)

    def __call__(self, step: int, model: nn.Module, monitor: Monitor) -> dict | None:
        """The report at an evaluation step (None at other steps)."""
        e, env = self.cfg.eval, self.env
        if e.every_steps <= 0 or step % e.every_steps:
            return None
        batch_size = self.cfg.train.micro_batch or self.cfg.train.global_batch // env.world_size
        if self.evaluator is None:
            self.evaluator = Evaluator(
                self.cfg.data.shards, self.meta, e.metrics, e.num, classifier=e.classifier or None,
                inception=e.inception or None, device=env.device, batch_size=batch_size, rank=env.rank,
                world_size=env.world_size, log=lambda msg: dist.print0(msg, file=sys.stderr))
        generator = torch.Generator(env.device).manual_seed(self.cfg.train.seed * env.world_size + env.rank)
        report = self.evaluator.run(lambda batch: self._generate(model, batch, batch_size, generator))
        head, detail = scalars(report)
        monitor.scalars(step, head)
        monitor.scalars(step, detail, console=False)
        return report

    def _generate(self, model: nn.Module, batch: dict, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Samples for a batch of val prompts, conditioned on their text embeddings whatever data.condition is."""
        cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, condition="text"))
        e, size, out = self.cfg.eval, self.meta["image_size"], []
        for i in range(0, len(batch["prompt"]), batch_size):
            part = _take(batch, list(range(i, min(i + batch_size, len(batch["prompt"])))))
            cond = train.condition(part, cfg, self.env.device)
            out.append(run_sampler(model, cond, (len(part["prompt"]), 3, size, size), self.diffusion,
                                   sampler=self.cfg.sample.sampler, steps=e.steps, eta=self.cfg.sample.eta,
                                   guidance=e.guidance, generator=generator).cpu())
        return torch.cat(out)


def run_dir_of(path: Path) -> Path:
    """The run directory of a checkpoint file (RUN/checkpoints/step_X.pt -> RUN)."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpdiff.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|FILE",
                   help="diffusion checkpoint, or a run directory meaning its newest complete checkpoint")
    p.add_argument("--data", metavar="SHARDS", help="shard directory whose val split gives prompts and real "
                   "images (default: the checkpoint's data.shards)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated, any of {', '.join(METRICS)} "
                   "(default all)")
    p.add_argument("--num", type=int, default=64, help="samples to generate, one per val prompt (default 64; "
                   "FID wants thousands)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps, at most diffusion.timesteps (default 50)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim", help="sampler (default ddim)")
    p.add_argument("--classifier", metavar="RUN_DIR|FILE",
                   help="attribute classifier from python -m ddpdiff.train_classifier (needed for attr_acc)")
    p.add_argument("--attributes", metavar="NAMES", help="comma-separated attributes averaged into the attr_acc "
                   "mean, or 'visible' for the synthetic data's drawn ones (default all 40)")
    p.add_argument("--inception", metavar="FILE", help=f"Inception-v3 weights for fid (default: ${fid.ENV})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed gives the same report")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler and metric batch (default 64)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--clip-pretrained", metavar="TAG|FILE",
                   help="where the checkpoint's CLIP weights are on an offline node (default: as recorded)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = evaluate(args.checkpoint, args.data, parse_metrics(args.metrics), args.num, args.steps,
                          args.guidance, args.classifier, parse_attributes(args.attributes), args.inception,
                          sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, device=args.device,
                          clip_pretrained=args.clip_pretrained, progress=not args.no_progress)
    except (EvalError, sample.SampleError, train_classifier.ClassifierError, fid.FIDError, clip.ClipError,
            data.DataError, FileNotFoundError) as e:
        print(f"ddpdiff.eval: error: {e}", file=sys.stderr, flush=True)
        return 2
    run_dir = run_dir_of(Path(report["checkpoint"]))
    out = run_dir / "eval" / (f"step_{report['step']:08d}_num{args.num}_steps{args.steps}_"
                              f"guidance{args.guidance:g}.json")
    text = json.dumps(report, indent=1)
    write_text(out, text + "\n")
    monitor = Monitor(run_dir, enabled=True)
    head, detail = scalars(report)
    monitor.scalars(report["step"], {**head, **detail}, console=False)
    monitor.close()
    print(summary(report), file=sys.stderr, flush=True)
    print(f"report: {out}", file=sys.stderr, flush=True)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
