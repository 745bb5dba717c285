"""Cost of a vmapped sweep of K SAEs against K single runs of the same SAEs, in one run.

    python benchmarks/sweep.py [--arch relu|topk] [--d-in 768 --d-sae 12288 --batch 4096 --k 8]
                               [--chunk C]

The sweep varies the sparsity coefficient (relu: mse + l1) or the seed (topk k=32: mse + auxk)
and the learning rate; the singles are the same SAEs one config each. Both are timed as `train()`
compiles them (sharded, state donated), on the same batch. Prints JSON.
Target (issue: throughput): a K=8 sweep costs <= 1.1x the time of the 8 single steps.
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

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--arch", choices=["relu", "topk"], default="relu")
add_shape_args(parser)
parser.add_argument("--k", type=int, default=8, help="SAEs in the sweep")
parser.add_argument("--chunk", type=int, default=None,
                    help="sweep_chunk: SAEs stepped together (default: all)")
parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
parser.add_argument("--device", default=None, help="a note on the hardware")
args = parser.parse_args()
if args.k < 1 or args.steps < 1 or (args.chunk is not None and (
        args.chunk < 1 or args.k % args.chunk)):
    parser.error("--k and --steps must be >= 1, and --chunk divide --k")
hostmem.restart_with_huge_pages()  # as the jaxsae command does


def sweep_points(n: int) -> list[dict]:
    lrs = [1e-4, 3e-4, 1e-3, 3e-3]
    if args.arch == "relu":
        return [{"loss.1.coefficient": 0.5 * 2 ** (i // 2), "optim.lr": lrs[i % 4]}
                for i in range(n)]
    return [{"seed": i // 4, "optim.lr": lrs[i % 4]} for i in range(n)]


def base_tree() -> dict:
    if args.arch == "relu":
        sae = {"d_sae": args.d_sae, "activation": "relu", "decoder_norm": "free"}
        loss = [{"term": "mse"}, {"term": "l1", "coefficient": 1.0}]
    else:
        sae = {"d_sae": args.d_sae, "activation": "topk", "k": 32}
        loss = [{"term": "mse"}, {"term": "auxk", "coefficient": 1 / 32}]
    return {"data": {"path": "unused"}, "sae": sae, "loss": loss,
            "optim": {"batch_size": args.batch, "total_tokens": args.batch * 1000,
                      "warmup_steps": 1}}


points = sweep_points(args.k)
sweep_cfg = config_from_dict({**base_tree(), "sweep": points, "sweep_chunk": args.chunk})
sweep = time_train_step(sweep_cfg, args.d_in, steps=args.steps)
singles = [time_train_step(member, args.d_in, steps=args.steps)
           for member in sweep_cfg.sweep_configs()]
singles_s = sum(s["step_s"] for s in singles)
print(json.dumps({
    "arch": args.arch, "d_in": args.d_in, "d_sae": args.d_sae, "batch": args.batch,
    "n_saes": args.k, "sweep_chunk": args.chunk, "sweep": points,
    "sweep_step_s": round(sweep["step_s"], 4),
    "single_step_s": [round(s["step_s"], 4) for s in singles],
    "singles_total_s": round(singles_s, 4),
    "sweep_over_singles": round(sweep["step_s"] / singles_s, 3),
    "sweep_compile_s": round(sweep["compile_s"], 1),
    "machine": machine(), **({"note": args.device} if args.device else {}),
}, indent=1))
