"""BatchTopK's dense selection under a sweep's vmap, with and without the sweep's axis name.

    python benchmarks/sweep_tie_cut.py [--saes 2] [--batch 4096] [--d-sae 12288] [--k 32]
                                       [--rounds 7]

The tie cut (`kernels.keep_largest`) runs under a `lax.cond` whose predicate is "ties at the
batch threshold overshoot batch·k". Under vmap a per-SAE predicate turns the `cond` into a
select that runs the cut at every step; reduced over the sweep's axis (`sweep_axis`, which
the training step passes) it stays a branch. This times `batchtopk` vmapped over --saes SAEs
both ways, on standard-normal pre-activations drawn (seed after seed) until none of them
overshoots, checks the codes are the same, and prints the medians of --rounds alternating
calls as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

from jaxsae import kernels
from jaxsae.activations.batchtopk import batchtopk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saes", type=int, default=2, help="SAEs vmapped together")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per SAE")
    parser.add_argument("--d-sae", type=int, default=12288, help="latents")
    parser.add_argument("--k", type=int, default=32, help="BatchTopK's k")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each (median)")
    args = parser.parse_args()
    if min(args.saes, args.batch, args.d_sae, args.k, args.rounds) < 1 or \
            args.k > args.d_sae // 4:
        parser.error("sizes must be >= 1 and --k at most --d-sae / 4 (standard-normal "
                     "pre-activations tie-free at the batch threshold are then found)")
    target = args.batch * args.k
    count = jax.jit(kernels.kth_largest_and_count, static_argnums=1)
    members, seeds = [], []
    for seed in range(1000):
        values = jnp.asarray(np.random.default_rng(seed).standard_normal(
            (args.batch, args.d_sae), dtype=np.float32))
        if int(count(jax.nn.relu(values), target)[1]) == target:  # no overshooting tie
            members.append(values)
            seeds.append(seed)
        if len(members) == args.saes:
            break
    stacked = jnp.stack(members)
    calls = {
        "per_sae_predicate": jax.jit(jax.vmap(
            lambda v: batchtopk(v, args.k)[0], axis_name="sweep")),
        "sweep_axis": jax.jit(jax.vmap(
            lambda v: batchtopk(v, args.k, sweep_axis="sweep")[0], axis_name="sweep")),
    }
    outputs = [np.asarray(f(stacked)) for f in calls.values()]
    np.testing.assert_array_equal(*outputs)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, f in calls.items():
            start = time.perf_counter()
            f(stacked).block_until_ready()
            times[name].append(time.perf_counter() - start)
    print(json.dumps({"shape": [args.saes, args.batch, args.d_sae], "k": args.k,
                      "seeds": seeds, "machine": machine(),
                      **{f"{name}_ms": round(1e3 * float(np.median(t)), 1)
                         for name, t in times.items()}}))


if __name__ == "__main__":
    main()
