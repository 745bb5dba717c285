"""How often `jaxsae analyze` calls a latent's kind right, on trained SAEs and data whose
features' kinds are known.

    python benchmarks/experiments/taxonomy_accuracy.py [--tokens N] [--out DIR]

Five data sets, each with its own SAE (ReLU + L1, unit decoder rows, twice as wide as the
features, trained on --tokens tokens): a hierarchy (16 parents, two mutually exclusive
children each), circles (16), features at a set magnitude (std 0.05), features of spread
magnitude (std 0.6), dense features (firing on 25% of tokens each). A latent stands for the
feature its decoder is closest to (|cos| >= 0.8; for circles, its decoder within the circle's
plane: projection norm >= 0.9; for the hierarchy, a latent with a child's component of
|cos| >= 0.5 stands for that child, absorbed parent or not). Reported per kind: the latents
that stand for a feature of that kind, the share of them called that kind, and what the
others were called. Then the `duplicate` kind against the truth of which latents share
their feature with another latent (both closest to the same feature, |cos| >= 0.8; the
circles left out, whose latents tile a plane by design): how many of those analyze calls
duplicate, and how many of the latents it calls duplicate do share their feature. Prints
Markdown (the RESULTS.md section).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from jaxsae.analysis.geometry import analyze
from jaxsae.config import config_from_dict
from jaxsae.data import synthetic
from jaxsae.export import load_sae
from jaxsae.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import experiment_dir

WORLDS = {
    "hierarchy": synthetic.HierarchySpec(n_trees=16, branching=2, depth=2, probs=(0.05, 0.4),
                                         magnitude_std=0.05, d_in=64, tokens=1_048_576),
    "circular": synthetic.CirclesSpec(n_circles=16, d_in=64, prob=0.02, tokens=1_048_576),
    "single": synthetic.SuperpositionSpec(n_features=48, d_in=64, mean_l0=2.0,
                                          zipf_exponent=0.0, magnitude_std=0.05,
                                          tokens=1_048_576),
    "variable": synthetic.SuperpositionSpec(n_features=48, d_in=64, mean_l0=2.0,
                                            zipf_exponent=0.0, magnitude_std=0.6,
                                            tokens=1_048_576),
    "dense": synthetic.SuperpositionSpec(n_features=8, d_in=64, mean_l0=2.0,
                                         zipf_exponent=0.0, magnitude_std=0.05,
                                         tokens=1_048_576),
}


def _stands_for(name: str, W: np.ndarray, truth) -> list[str | None]:
    """The kind of the feature each latent stands for (None: no feature)."""
    D = truth.directions
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    cos = unit @ D.T
    if name == "circular":
        planes = D.reshape(-1, 2, D.shape[1])  # rows 2c, 2c+1 span circle c
        inside = np.linalg.norm(np.einsum("nd,ckd->nck", unit, planes), axis=-1).max(1)
        return ["circular" if v >= 0.9 else None for v in inside]
    if name == "hierarchy":
        child = truth.arrays["parent"] >= 0
        out = []
        for row in np.abs(cos):
            if row[child].max() >= 0.5:
                out.append("child")
            elif row[~child].max() >= 0.8:
                out.append("parent")
            else:
                out.append(None)
        return out
    return [name if v >= 0.8 else None for v in np.abs(cos).max(1)]


def _shares_feature(W: np.ndarray, truth) -> np.ndarray:
    """Per latent: whether another latent stands for the same feature (the closest to both,
    at |cos| >= 0.8)."""
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    cos = np.abs(unit @ truth.directions.T)
    feature = np.where(cos.max(1) >= 0.8, cos.argmax(1), -1)
    counts = np.bincount(feature[feature >= 0], minlength=cos.shape[1])
    return (feature >= 0) & (counts[np.maximum(feature, 0)] > 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per SAE")
    parser.add_argument("--out", type=Path,
                        help="keep the data, SAEs and analyses here (a new directory, or this "
                             "experiment's; without it they go to a temporary one)")
    args = parser.parse_args()
    with experiment_dir(args.out, "taxonomy_accuracy") as root:
        called: dict[str, Counter] = {}
        twins = Counter()  # (shares its feature, called duplicate) -> latents
        for name, spec in WORLDS.items():
            data = root / name / "data"
            if not data.exists():
                synthetic.write(spec, data, progress=False)
            run = root / name / "run"
            if not (run / "sae").exists():
                train(config_from_dict({
                    "name": name, "run_dir": str(run),
                    "data": {"path": str(data), "eval_tokens": 65536, "normalize": "none"},
                    "sae": {"d_sae": 2 * spec.n_features, "activation": "relu",
                            "decoder_norm": "unit", "init_l0": None},
                    "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 0.1}],
                    "optim": {"lr": 1e-3, "batch_size": 1024, "total_tokens": args.tokens},
                    "checkpoint": {"every_steps": 10**6},
                    "log": {"every_steps": 1000, "curves": False}}), progress=False,
                      log=lambda m: None)
            out = root / name / "analysis"
            analyze(str(run / "sae"), str(data), out, tokens=65536, progress=False,
                    overwrite=True)
            with open(out / "latents.csv") as f:
                kinds = [r["kind"] for r in csv.DictReader(f)]
            truth = synthetic.load_truth(data)
            W = load_sae(run / "sae").params["W_dec"]
            for want, got in zip(_stands_for(name, W, truth), kinds, strict=True):
                if want is not None:
                    called.setdefault(want, Counter())[got] += 1
            if name != "circular":
                for shares, got in zip(_shares_feature(W, truth), kinds, strict=True):
                    twins[bool(shares), got == "duplicate"] += 1
        print("| kind of the feature | latents standing for one | called right | called instead |")
        print("| --- | ---: | ---: | --- |")
        for kind in ("parent", "child", "circular", "single", "variable", "dense"):
            c = called.get(kind, Counter())
            total = sum(c.values())
            others = ", ".join(f"{k} {v}" for k, v in c.most_common() if k != kind) or "—"
            share = f"{c[kind] / total:.2f}" if total else "—"
            print(f"| {kind} | {total} | {share} | {others} |")
        shared = twins[True, True] + twins[True, False]
        said = twins[True, True] + twins[False, True]
        print(f"\nLatents sharing their feature with another latent: {shared}; called duplicate: "
              f"{twins[True, True]} ({twins[True, True] / max(shared, 1):.2f}). Latents called "
              f"duplicate: {said}, of which share their feature: {twins[True, True]} "
              f"({twins[True, True] / max(said, 1):.2f}).")
        if args.out is not None:
            print(f"\n(data, SAEs and analyses in {root})")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
