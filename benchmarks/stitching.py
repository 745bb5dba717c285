"""The stitching findings on ground-truth data (issue: offline analysis of dictionaries).

    python benchmarks/stitching.py [--out runs/stitching] [--quick]

Trains ReLU + L1 SAEs of widths N, 2N and 4N on one superposition data set (the same recipe,
data and seed), then:

1. `jaxsae stitch compare` of N against 4N: novel latents (max cos <= 0.7) should mostly lower
   the small SAE's MSE when inserted, reconstruction latents mostly raise it;
2. `jaxsae stitch frankenstein` of the family (decoder retrained), and a ReLU SAE trained from
   scratch at the Frankenstein's width: the Frankenstein SAE should reach a lower MSE (at a
   higher L0).

Prints JSON and a markdown summary (the figures in benchmarks/RESULTS.md come from here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import machine  # noqa: E402
from jaxsae import evaluate  # noqa: E402
from jaxsae.analysis import stitch  # noqa: E402
from jaxsae.config import DataConfig, config_from_dict  # noqa: E402
from jaxsae.data import open_source  # noqa: E402
from jaxsae.data.source import iter_blocks  # noqa: E402
from jaxsae.export import load_sae  # noqa: E402
from jaxsae.train import train  # noqa: E402


def _to_stderr(message: str) -> None:
    """Training's log lines (stdout is the JSON and the tables)."""
    print(message, file=sys.stderr)


def recipe(out: Path, data: Path, width: int, tokens: int, quick: bool) -> dict:
    return {
        "name": f"relu-{width}", "run_dir": str(out / f"relu-{width}"),
        "data": {"path": str(data), "eval_tokens": 65536, "shuffle_buffer": 131072,
                 "generate": {"kind": "superposition", "n_features": 128 if quick else 512,
                              "d_in": 32 if quick else 64, "tokens": 262144 if quick else 1048576,
                              "mean_l0": 4.0, "seed": 0}},
        "sae": {"d_sae": width, "activation": "relu", "decoder_norm": "free"},
        "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 0.3, "warmup_steps": 50}],
        "optim": {"lr": 3e-3, "batch_size": 2048, "total_tokens": tokens, "warmup_steps": 50,
                  "decay_fraction": 0.2},
        "checkpoint": {"every_steps": 1000, "keep": 1},
        "log": {"every_steps": 100, "dead_window_tokens": 1_000_000},
    }


def held_out_metrics(sae_dir: Path, data: Path) -> dict:
    loaded = load_sae(sae_dir)
    source = open_source(DataConfig(path=str(data)))
    m = evaluate.reconstruction_metrics(
        loaded.params, loaded.sae, iter_blocks(source, 4096, start=source.n_tokens - 65536))
    return {"d_sae": loaded.sae.d_sae, "l0": m["l0"], "mse": m["mse"],
            "explained_variance": m["explained_variance"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/stitching")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    n = 32 if args.quick else 128
    tokens = 500_000 if args.quick else 4_000_000
    start = time.perf_counter()

    family = {}
    for width in (n, 2 * n, 4 * n):
        result = train(config_from_dict(recipe(out, data, width, tokens, args.quick)),
                       progress=False, log=_to_stderr)
        family[width] = result.sae_dir
    compare = stitch.compare(str(family[n]), str(family[4 * n]), str(data), out / "compare",
                             progress=False)
    with contextlib.redirect_stdout(sys.stderr):  # (its decoder's retraining logs)
        rows = stitch.frankenstein([str(p) for p in family.values()], str(data),
                                   out / "frankenstein", retrain_decoder_tokens=tokens // 2,
                                   progress=False)
    width = rows[-1]["d_sae"]
    same = train(config_from_dict(recipe(out, data, width, tokens, args.quick)), progress=False,
                 log=_to_stderr)
    trained = held_out_metrics(same.sae_dir, data)
    result = {"compare": compare, "frankenstein": rows,
              "trained_at_frankenstein_width": trained,
              "seconds": time.perf_counter() - start, "machine": machine()}
    print(json.dumps(result, indent=1))

    print("\n" + (out / "compare" / "summary.md").read_text())
    frank = rows[-1]
    print("| SAE | width | L0 | MSE | explained variance |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {Path(r['sae']).parent.name if '/' in r['sae'] else r['sae']} | {r['d_sae']} "
              f"| {r['l0']:.2f} | {r['mse']:.4f} | {r['explained_variance']:.4f} |")
    print(f"| trained from scratch | {trained['d_sae']} | {trained['l0']:.2f} "
          f"| {trained['mse']:.4f} | {trained['explained_variance']:.4f} |")
    print(f"\nFrankenstein MSE {frank['mse']:.4f} vs trained at equal width {trained['mse']:.4f}: "
          + ("lower" if frank["mse"] < trained["mse"] else "NOT lower"))


if __name__ == "__main__":
    main()
