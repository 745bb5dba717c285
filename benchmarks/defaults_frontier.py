"""The L1 recipe's L0 / explained-variance frontier on real activations: jaxsae 0.2.0's
defaults (free decoder rows, inputs normalised to E|x|^2 = d_in, the L1 ramped over 5 % of the
steps) against those before (unit rows, raw inputs, the L1 from the first step) and since
0.3.0 (`init_l0`: unit rows started where ~d_in latents fire), each a sweep of the L1
coefficient and of the learning rate trained by `jaxsae train`.

    scripts/real_activations.sh /tmp/lm 400000      # SmolLM2-135M layer 15 (~10 min)
    python benchmarks/defaults_frontier.py --data /tmp/lm/acts-l15 --out /tmp/frontier
    python benchmarks/defaults_frontier.py ... --recipes unit,raw   # one change each
    python benchmarks/defaults_frontier.py ... --recipes unit,init_l0   # unit rows' start

A recipe whose sweep.csv is already in OUT is not trained again (delete OUT/runs/<recipe> to
retrain it). Prints a markdown table and the machine, and draws OUT/frontier.png (explained
variance against L0, one line per recipe and learning rate).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import experiment_dir, machine  # noqa: E402
from jaxsae.outputs import plain_text, save_figure, subplots  # noqa: E402

# recipe -> (config keys besides data and length, the L1 coefficients, the learning rates
# swept). On raw activations a coefficient weighs ~1/scale^2 less (7.3x on SmolLM2 layer 15),
# so those recipes' coefficients are larger to reach the same L0s. `unit` and `raw` change one
# thing each of 0.2.0's defaults (which of them moves the frontier); `init_l0` is `unit` with the
# encoder bias started where ~d_in latents fire (sae.init_l0: auto).
RECIPES = {
    "0.2.0": ({"sae": {"decoder_norm": "free", "init_l0": None}}, [1.25, 2.5, 5.0, 10.0],
              [3.0e-4, 1.0e-3]),
    "before": ({"data": {"normalize": "none"}, "sae": {"decoder_norm": "unit", "init_l0": None},
                "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 5.0}]},
               [5.0, 10.0, 20.0, 40.0], [3.0e-4, 1.0e-3]),
    "unit": ({"sae": {"decoder_norm": "unit", "init_l0": None}}, [1.25, 2.5, 5.0, 10.0],
             [1.0e-3]),
    "raw": ({"data": {"normalize": "none"}, "sae": {"decoder_norm": "free", "init_l0": None}},
            [5.0, 10.0, 20.0, 40.0], [1.0e-3]),
    "init_l0": ({"sae": {"decoder_norm": "unit", "init_l0": "auto"}}, [1.25, 2.5, 5.0, 10.0],
                [1.0e-3]),
}


def config(recipe: str, data: str, out: Path, tokens: int, drop: float) -> dict:
    keys, coefficients, lrs = RECIPES[recipe]
    return {
        "name": f"frontier-{recipe}", "run_dir": str(out / "runs" / recipe),
        "data": {"path": data, "drop_norm_above": drop, **keys.get("data", {})},
        **({"sae": keys["sae"]} if "sae" in keys else {}),
        **({"loss": keys["loss"]} if "loss" in keys else {}),
        "optim": {"total_tokens": tokens},
        "sweep_chunk": 2,
        "sweep": {"loss.1.coefficient": coefficients, "optim.lr": lrs},
    }


def train(recipe: str, args) -> float | None:
    """Trains the recipe's sweep unless its sweep.csv exists; its wall seconds (None: kept)."""
    run = args.out / "runs" / recipe
    if (run / "sweep.csv").exists():
        return None
    path = args.out / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(config(recipe, args.data, args.out, args.tokens,
                                          args.drop_norm_above), sort_keys=False))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jaxsae", "train", str(path), "--no-progress"],
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    if done.returncode != 0:  # (jaxsae said why, above)
        print(f"defaults_frontier.py: error: training the {recipe} recipe failed; its config "
              f"is {path}", file=sys.stderr)
        raise SystemExit(done.returncode)
    return time.perf_counter() - start


def rows(recipe: str, out: Path) -> list[dict]:
    with open(out / "runs" / recipe / "sweep.csv") as f:
        return [{"recipe": recipe, "coefficient": float(r["loss.1.coefficient"]),
                 # (a sweep of one rate may set it outside the sweep: no column)
                 "lr": float(r.get("optim.lr") or RECIPES[recipe][2][0]), "l0": float(r["l0"]),
                 "explained_variance": float(r["explained_variance"]),
                 "dead": float(r["dead_fraction"])} for r in csv.DictReader(f)]


def draw(table: list[dict], path: Path, title: str, recipes: list[str]) -> None:
    fig, ax = subplots(figsize=(6, 4.2), dpi=120)
    for recipe in recipes:
        for lr in RECIPES[recipe][2]:
            style = "o-" if lr < 1e-3 else "s--"
            line = sorted((r for r in table if r["recipe"] == recipe and r["lr"] == lr),
                          key=lambda r: r["l0"])
            ax.plot([r["l0"] for r in line], [r["explained_variance"] for r in line], style,
                    label=f"{recipe} defaults, lr {lr:g}")
            for r in line:
                ax.annotate(f"{r['coefficient']:g}", (r["l0"], r["explained_variance"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (held-out tokens)")
    ax.set_ylabel("explained variance")
    ax.set_title(plain_text(f"L1 coefficient sweeps (labels), {title}"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="cached activations (a shard directory)")
    parser.add_argument("--out", type=Path, required=True,
                        help="where the runs and plot go (a new directory, or this script's)")
    parser.add_argument("--tokens", type=int, default=1_600_000, help="optim.total_tokens")
    parser.add_argument("--drop-norm-above", type=float, default=10.0,
                        help="data.drop_norm_above (SmolLM2's attention sinks)")
    parser.add_argument("--recipes", default="0.2.0,before",
                        help=f"comma-separated, from {','.join(RECIPES)}")
    parser.add_argument("--title", default=None,
                        help="what the data is, for the plot (default: --data's path)")
    args = parser.parse_args()
    if args.tokens < 1:
        parser.error("--tokens must be >= 1")
    recipes = args.recipes.split(",")
    if not recipes or set(recipes) - set(RECIPES):
        parser.error(f"--recipes: choose from {', '.join(RECIPES)}; got {args.recipes!r}")
    with experiment_dir(args.out, "defaults_frontier"):  # (a directory of its own: it
        # writes OUT/<recipe>.yaml and frontier.png over what is there)
        seconds = {recipe: train(recipe, args) for recipe in recipes}
    table = [r for recipe in recipes for r in rows(recipe, args.out)]
    draw(table, args.out / "frontier.png", args.title or args.data, recipes)
    print(json.dumps({"machine": machine(), "train_seconds": seconds}))
    print("| defaults | lr | L1 coefficient | L0 | explained variance | dead |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(table, key=lambda r: (recipes.index(r["recipe"]), r["lr"],
                                          r["coefficient"])):
        print(f"| {r['recipe']} | {r['lr']:g} | {r['coefficient']:g} | {r['l0']:.1f} | "
              f"{r['explained_variance']:.3f} | {r['dead']:.3f} |")


if __name__ == "__main__":
    main()
