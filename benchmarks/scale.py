"""Feature-parallel scale: is a wide dictionary really split across devices?

    python benchmarks/scale.py [--devices 8] [--model -1] [--d-in 2304] [--d-sae 1048576]
                               [--run-d-sae 131072]

On `--devices` CPU devices (added to XLA_FLAGS; one that forces another count is refused) and
a mesh with
`--model` devices along `model` (the dictionary's split; -1, the default: all of them) and the
rest along `data`: compiles the real train step for d_in x d_sae without materialising anything
and prints its per-device memory analysis next to the total parameter + optimiser size (the
per-device share should be about 1/model); then runs one real step at `--run-d-sae`, a width
whose state fits in this machine's memory, and times it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--devices", type=int, default=8, help="CPU devices to simulate")
parser.add_argument("--model", type=int, default=-1,
                    help="devices along mesh.model (-1: all); the others along mesh.data")
parser.add_argument("--d-in", type=int, default=2304, help="input width")
parser.add_argument("--d-sae", type=int, default=1 << 20,
                    help="dictionary width whose step is compiled, not run")
parser.add_argument("--batch", type=int, default=4096, help="tokens per step compiled")
parser.add_argument("--run-d-sae", type=int, default=1 << 17,
                    help="dictionary width of the step that is run and timed")
parser.add_argument("--run-batch", type=int, default=1024, help="tokens per step run")
args = parser.parse_args()
if args.devices < 1 or not (args.model == -1 or 1 <= args.model <= args.devices) or (
        args.model > 0 and args.devices % args.model):
    parser.error(f"--model must be -1 or divide --devices ({args.devices}); got {args.model}")
# (fault testing: with XLA_FLAGS set for anything else, --devices was ignored, silently)
_count = f"--xla_force_host_platform_device_count={args.devices}"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" in _flags and _count not in _flags.split():
    parser.error(f"XLA_FLAGS ({_flags}) forces another device count than --devices")
os.environ["XLA_FLAGS"] = f"{_flags} {_count}".strip() if _count not in _flags.split() \
    else _flags

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from jaxsae.build import build  # noqa: E402
from jaxsae.checkpoint import abstract_with_shardings  # noqa: E402
from jaxsae.config import config_from_dict  # noqa: E402


def config(d_sae: int, batch: int):
    return config_from_dict({
        "data": {"path": "unused"}, "sae": {"d_sae": d_sae, "decoder_norm": "free"},
        "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 1.0}],
        "optim": {"batch_size": batch, "total_tokens": batch * 100, "warmup_steps": 1},
        "mesh": {"data": 1 if args.model == -1 else -1, "model": args.model}})


def analyse(d_sae: int, batch: int) -> dict:
    built = build(config(d_sae, batch), args.d_in)
    state = abstract_with_shardings(built.abstract, built.state_sharding)
    batch_spec = jax.ShapeDtypeStruct((batch, args.d_in), np.float32,
                                      sharding=built.batch_sharding)
    t0 = time.perf_counter()
    compiled = built.step.lower(state, batch_spec).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    total_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(built.abstract))
    per_device_state = sum(
        int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
        for x, s in zip(jax.tree.leaves(built.abstract), jax.tree.leaves(built.state_sharding),
                        strict=True))
    return {
        "d_in": args.d_in, "d_sae": d_sae, "batch": batch, "devices": len(jax.devices()),
        "mesh": dict(built.mesh.shape), "compile_s": round(compile_s, 1),
        "state_total_gb": total_state / 1e9,
        "state_per_device_gb": per_device_state / 1e9,
        "state_per_device_fraction": per_device_state / total_state,
        "compiled_argument_gb_per_device": mem.argument_size_in_bytes / 1e9,
        "compiled_output_gb_per_device": mem.output_size_in_bytes / 1e9,
        "compiled_temp_gb_per_device": mem.temp_size_in_bytes / 1e9,
    }


def run_one_step(d_sae: int, batch: int) -> dict:
    built = build(config(d_sae, batch), args.d_in)
    state = built.init()
    x = np.abs(np.random.default_rng(0).standard_normal((batch, args.d_in), np.float32))
    x = jax.device_put(x, built.batch_sharding)
    state, metrics = built.step(state, x)  # compile + first step
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state, metrics = built.step(state, x)
    jax.block_until_ready((state, metrics))
    w_dec = state.params["W_dec"]
    return {"d_sae": d_sae, "batch": batch, "step_s": time.perf_counter() - t0,
            "finite": bool(metrics["finite"]), "loss": float(metrics["loss"]),
            "W_dec_shard_shape": list(w_dec.addressable_shards[0].data.shape),
            "W_dec_devices": len(w_dec.sharding.device_set)}


print(json.dumps({"machine": machine(),
                  "full_width_compile": analyse(args.d_sae, args.batch),
                  "one_step": run_one_step(args.run_d_sae, args.run_batch)}, indent=1))
