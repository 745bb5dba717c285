"""What `jaxsae analyze --optimality` costs at scale: a TopK SAE of d_sae 2^16 on d_in 768.

    python benchmarks/optimality_cost.py [--d-sae 65536] [--d-in 768] [--k 64]
        [--tokens 65536] [--pairs 20000]

The data: superposition tokens (8192 features in d_in, L0 32). The SAE: TopK k, encoder
columns = decoder rows, each row a true feature's direction plus noise (about d_sae / 8192
latents per feature, so latents co-fire as a trained wide SAE's split latents do): codes as
sparse as a trained TopK SAE's and many co-firing pairs, which is what the pair sums cost.
Times `analyze` without and with --optimality on the same tokens, each after an untimed call
on one batch (which compiles what it runs: at small shapes the compiles would otherwise be
most of the first call's time): the difference is what the conditions add.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

from jaxsae import export
from jaxsae.analysis.geometry import analyze
from jaxsae.config import SAEConfig
from jaxsae.data import synthetic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-sae", type=int, default=65536, help="latents of the TopK SAE")
    parser.add_argument("--d-in", type=int, default=768, help="input width")
    parser.add_argument("--k", type=int, default=64, help="TopK's k")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens analysed")
    parser.add_argument("--pairs", type=int, default=20000,
                        help="co-firing pairs the conditions test (--optimality-pairs)")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per analysis batch")
    args = parser.parse_args()
    if min(args.d_sae, args.d_in, args.k, args.tokens, args.pairs, args.batch) < 1 or \
            args.k > args.d_sae or args.batch > args.tokens:
        parser.error("sizes must be >= 1, --k <= --d-sae and --batch <= --tokens")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = synthetic.SuperpositionSpec(n_features=8192, d_in=args.d_in, mean_l0=32,
                                           tokens=args.tokens, seed=0)
        data = synthetic.write(spec, Path(tmp) / "data", progress=False)
        truth = synthetic.load_truth(data).directions
        W = truth[rng.integers(len(truth), size=args.d_sae)] + 0.3 * rng.standard_normal(
            (args.d_sae, args.d_in)) / np.sqrt(args.d_in)
        W = (W / np.linalg.norm(W, axis=1, keepdims=True)).astype(np.float32)
        export.export_sae({"W_dec": W, "W_enc": W.T.copy(),
                           "b_enc": np.zeros(args.d_sae, np.float32),
                           "b_dec": np.zeros(args.d_in, np.float32)},
                          SAEConfig(d_sae=args.d_sae, activation="topk", k=args.k),
                          Path(tmp) / "sae")
        times = {}
        for optimality in (False, True):
            analyze(str(Path(tmp) / "sae"), str(data), Path(tmp) / f"warm{optimality}",
                    tokens=args.batch, batch_size=args.batch, optimality=optimality,
                    optimality_pairs=args.pairs, progress=False)  # (compiles, untimed)
            t0 = time.perf_counter()
            summary = analyze(str(Path(tmp) / "sae"), str(data), Path(tmp) / f"out{optimality}",
                              tokens=args.tokens, batch_size=args.batch, optimality=optimality,
                              optimality_pairs=args.pairs, progress=False)
            times[optimality] = time.perf_counter() - t0
    m = machine()
    print(f"{m['date']}, {m['cpu_cores']}-core {m['cpu']}, jax {m['jax']}: TopK k {args.k}, "
          f"d_sae {args.d_sae}, d_in {args.d_in}, {args.tokens} tokens, "
          f"{summary['pairs_tested']} pairs tested")
    print(f"analyze: {times[False]:.1f} s; with --optimality: {times[True]:.1f} s "
          f"(the conditions: {times[True] - times[False]:+.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
