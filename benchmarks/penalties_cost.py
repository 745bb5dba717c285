"""Step time of each loss-term combination relative to plain mse + l1, in one run.

    python benchmarks/penalties_cost.py [--d-in 768 --d-sae 12288 --batch 4096 --steps 3]

Prints one JSON object per combination and a Markdown table for benchmarks/RESULTS.md.
Targets (issue: pluggable penalties): no term more than doubles the step; matryoshka <= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_shape_args, machine, time_train_step

from jaxsae import hostmem
from jaxsae.config import config_from_dict

L1 = {"term": "l1", "coefficient": 1.0}
MSE = {"term": "mse"}
RELU = {"activation": "relu", "decoder_norm": "free"}


def combinations(d_sae: int) -> dict[str, tuple[dict, list[dict]]]:
    return {
        "mse + l1 (baseline)": (RELU, [MSE, L1]),
        "mse + l1 p=0.5": (RELU, [MSE, {**L1, "p": 0.5}]),
        "mse + l1 tanh": (RELU, [MSE, {**L1, "tanh_scale": 4.0}]),
        "mse + group_l1_l2": (RELU, [MSE, {"term": "group_l1_l2", "group_size": 4}]),
        "mse + group_l1_l2 + intra_group_orthogonality": (RELU, [
            MSE, {"term": "group_l1_l2", "group_size": 4},
            {"term": "intra_group_orthogonality", "group_size": 4}]),
        "matryoshka (4 prefixes) + l1": (RELU, [
            {"term": "matryoshka", "prefixes": [d_sae // 16, d_sae // 4, d_sae // 2, d_sae]}, L1]),
        "matryoshka (sampled, 32 blocks) + l1": (RELU, [
            {"term": "matryoshka", "sample": {"n": 10, "resolution": 32}}, L1]),
        "mse + l1 + decoder_cosine (default: chunks of 1024 as d_sae > batch)": (RELU, [
            MSE, L1, {"term": "decoder_cosine"}]),
        "mse + l1 + decoder_cosine (exact_max: 16384, exact)": (RELU, [
            MSE, L1, {"term": "decoder_cosine", "exact_max": 16384}]),
        "jumprelu: mse + l0 step": ({"activation": "jumprelu"}, [MSE, {"term": "l0"}]),
        "jumprelu: mse + l0 tanh": ({"activation": "jumprelu"}, [MSE, {"term": "l0",
                                                                     "mode": "tanh"}]),
        "topk k=32: mse": ({"activation": "topk", "k": 32}, [MSE]),
        "topk k=32: mse + auxk": ({"activation": "topk", "k": 32}, [MSE, {"term": "auxk"}]),
        # dead_tokens 1: every latent silent in the previous batch is dead, so AuxK always runs
        "topk k=32: mse + auxk, latents dead": ({"activation": "topk", "k": 32}, [
            MSE, {"term": "auxk", "dead_tokens": 1}]),
        "batchtopk k=32: mse": ({"activation": "batchtopk", "k": 32}, [MSE]),
        "batchtopk k=32: mse + auxk": ({"activation": "batchtopk", "k": 32},
                                       [MSE, {"term": "auxk"}]),
        "batchtopk k=32: mse + auxk, latents dead": ({"activation": "batchtopk", "k": 32}, [
            MSE, {"term": "auxk", "dead_tokens": 1}]),
        "batchtopk k=32: matryoshka (4 prefixes)": ({"activation": "batchtopk", "k": 32}, [
            {"term": "matryoshka", "prefixes": [d_sae // 16, d_sae // 4, d_sae // 2, d_sae]}]),
    }


def main() -> None:
    hostmem.restart_with_huge_pages()  # as the jaxsae command does
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default=None, help="substring of the combinations to run")
    args = parser.parse_args()

    info = machine()
    print(json.dumps({"machine": info, "d_in": args.d_in, "d_sae": args.d_sae,
                      "batch": args.batch}), flush=True)
    rows = []
    baseline = None
    for name, (sae, loss) in combinations(args.d_sae).items():
        if args.only and args.only not in name and baseline is not None:
            continue
        cfg = config_from_dict({
            "data": {"path": "unused"}, "sae": {"d_sae": args.d_sae, **sae}, "loss": loss,
            "optim": {"batch_size": args.batch, "total_tokens": args.batch * 100,
                      "warmup_steps": 1}})
        result = time_train_step(cfg, args.d_in, steps=args.steps)
        baseline = baseline or result["step_s"]
        result.update(name=name, relative=result["step_s"] / baseline,
                      tokens_per_s=args.batch / result["step_s"])
        rows.append(result)
        print(json.dumps(result), flush=True)

    print(f"\n{info['date']}, {info['device']} ({info['cpu_cores']}-core {info['cpu']}), "
          f"jax {info['jax']}; "
          f"d_in={args.d_in}, d_sae={args.d_sae}, batch={args.batch}, float32\n")
    print("| loss terms | step (s) | relative to mse + l1 | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['step_s']:.3f} | {r['relative']:.2f}x | "
              f"{r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
