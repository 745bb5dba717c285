"""A dictionary set exactly at the true features of hierarchy data is no local optimum: the
optimality conditions flag its parent-child pairs (and not its exclusive siblings), and
training started from it (`init_from`) drifts to absorption, which `jaxsae repair` undoes.

    python benchmarks/experiments/optimality_drift.py [--tokens N] [--out DIR]

Data: trees of a parent and two mutually exclusive children (P(parent) 0.3, P(child | parent)
0.4 each), orthonormal in 40 dims. Start: a ReLU SAE whose encoder and decoder are the true
directions, with encoder bias -λ/2 (the L1 problem's optimal codes for orthonormal features);
trained with mse + λ L1 (λ 0.2), unit decoder rows, as wide as the number of features. Prints
Markdown (the RESULTS.md section): the conditions and the ground-truth metrics at the start,
after training and after repair, and where each latent's decoder went.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

from jaxsae import evaluate, export
from jaxsae.analysis.geometry import analyze
from jaxsae.analysis.repair import repair
from jaxsae.config import DataConfig, SAEConfig, config_from_dict
from jaxsae.data import open_source, synthetic
from jaxsae.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import experiment_dir

LAMBDA = 0.2


def _pairs(out: Path, parent: np.ndarray) -> dict[str, tuple[int, int]]:
    """(unstable, tested) per kind of pair in optimality.csv, latents taken as the features
    they started as."""
    counts = {"parent-child": [0, 0], "siblings": [0, 0], "other": [0, 0]}
    with open(out / "optimality.csv") as f:
        for row in csv.DictReader(f):
            a, b = int(row["latent_a"]), int(row["latent_b"])
            kind = ("parent-child" if parent[a] == b or parent[b] == a
                    else "siblings" if parent[a] == parent[b] != -1 else "other")
            counts[kind][0] += row["stable"] == "0"
            counts[kind][1] += 1
    return {k: tuple(v) for k, v in counts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    parser.add_argument("--out", type=Path,
                        help="keep the data, SAEs and analyses here (a new directory, or this "
                             "experiment's; without it they go to a temporary one)")
    args = parser.parse_args()
    with experiment_dir(args.out, "optimality_drift") as root:
        spec = synthetic.HierarchySpec(n_trees=8, branching=2, depth=2, probs=(0.3, 0.4),
                                       magnitudes=(1.0, 1.0), d_in=40, tokens=1_048_576, seed=0)
        data = root / "data"
        if not data.exists():
            synthetic.write(spec, data, progress=False)
        truth = synthetic.load_truth(data)
        D, parent = truth.directions, truth.arrays["parent"]
        n = len(D)
        start = root / "true_features"
        export.export_sae({"W_dec": D, "W_enc": D.T.copy(),
                           "b_enc": np.full(n, -LAMBDA / 2, np.float32),
                           "b_dec": np.zeros(spec.d_in, np.float32)},
                          SAEConfig(d_sae=n, activation="relu", decoder_norm="unit",
                                    init_l0=None), start,
                          overwrite=True)
        run = root / "run"
        shutil.rmtree(run, ignore_errors=True)
        cfg = config_from_dict({
            "name": "drift", "run_dir": str(run), "init_from": str(start),
            "data": {"path": str(data), "eval_tokens": 65536, "normalize": "none"},
            "sae": {"d_sae": n, "activation": "relu", "decoder_norm": "unit", "init_l0": None},
            "loss": [{"term": "mse"}, {"term": "l1", "coefficient": LAMBDA}],
            "optim": {"lr": 1e-3, "batch_size": 1024, "total_tokens": args.tokens},
            "checkpoint": {"every_steps": 10**6}, "log": {"every_steps": 500, "curves": False}})
        train(cfg, progress=False, log=lambda m: None)

        fixed = repair(str(run / "sae"), str(data), root / "repaired", tokens=65536,
                       truth=str(data), progress=False, overwrite=True)

        source = open_source(DataConfig(path=str(data)))
        lo = source.n_tokens - 65536
        rows = []
        for label, sae_dir in (("start: the true features", start),
                               ("trained from it", run / "sae"),
                               ("trained, then `jaxsae repair`", root / "repaired" / "sae")):
            loaded = export.load_sae(sae_dir)
            metrics = evaluate.truth_report(loaded.params, loaded.sae, source, truth, start=lo)
            out = root / f"analysis-{sae_dir.name}"
            summary = analyze(str(sae_dir), str(data), out, tokens=65536, optimality=True,
                              progress=False, overwrite=True)
            pairs = _pairs(out, parent)
            W = loaded.params["W_dec"] / np.linalg.norm(loaded.params["W_dec"], axis=1,
                                                        keepdims=True)
            children = np.flatnonzero(parent >= 0)
            child_parent_cos = float(np.mean([W[c] @ D[parent[c]] for c in children]))
            rows.append((label, metrics, summary, pairs, child_parent_cos))

        print("| dictionary | unstable parent-child pairs | unstable sibling pairs | unstable "
              "other pairs | λ implied | child latents: cos with their parent's direction | "
              "absorption | parent recall with a child | mcc |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, m, s, p, cp in rows:
            print(f"| {label} | {p['parent-child'][0]} / {p['parent-child'][1]} | "
                  f"{p['siblings'][0]} / {p['siblings'][1]} | {p['other'][0]} / {p['other'][1]} | "
                  f"{s['optimality_lambda']:.3f} | {cp:.3f} | {m['absorption']:.3f} | "
                  f"{m['parent_recall_with_child']:.3f} | {m['mcc']:.3f} |")
        b, a = fixed["before"], fixed["after"]
        print(f"\nRepair: {len(fixed['pairs'])} child / parent pairs; explained variance "
              f"{b['explained_variance']:.3f} -> {a['explained_variance']:.3f}, "
              f"L0 {b['l0']:.2f} -> {a['l0']:.2f}.")
        if args.out is not None:
            print(f"\n(data, SAEs and analyses in {root})")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
