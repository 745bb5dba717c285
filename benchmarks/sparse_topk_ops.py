"""The sparse TopK path's operations against their one-shot forms, timed one by one.

    python benchmarks/sparse_topk_ops.py [--d-in 768] [--d-sae 12288] [--batch 4096] [--k 32]

Each row times the form jaxsae uses (jaxsae/sae.py) and the plain form it replaced, on the
same inputs, jitted, median of 5 runs after compilation; the two are checked to agree first.
Prints a markdown table (the throughput section of RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_shape_args, machine

from jaxsae import hostmem, kernels
from jaxsae.outputs import markdown_table


def median_ms(fn, *args, reps: int = 5) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    hostmem.restart_with_huge_pages()  # as the jaxsae command does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    B, d, n, k = args.batch, args.d_in, args.d_sae, args.k

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (B, d))
    W_enc = jax.random.normal(keys[1], (d, n)) / np.sqrt(d)
    W_dec = W_enc.T + 0.0
    pre = x @ W_enc
    index = jax.lax.top_k(pre, k)[1]
    values = jnp.take_along_axis(pre, index, axis=1)
    g = jax.random.normal(keys[2], (B, d))

    cases = [
        ("top-k selection", "jax.lax.top_k over d_sae", lambda p: jax.lax.top_k(p, k)[1],
         "two-stage (chunk maxima)", lambda p: kernels.top_k_indices(p, k), (pre,)),
        ("decode Σ_j v·W_dec[i_j]", "einsum over gathered [B, k, d_in]",
         lambda v, W, i: jnp.einsum("bk,bkd->bd", v, W[i]),
         "per-latent fused sum", kernels.gather_decode, (values, W_dec, index)),
        ("its value gradient g·W_dec[i_j]", "einsum over gathered [B, k, d_in]",
         lambda g, W, i: jnp.einsum("bd,bkd->bk", g, W[i]),
         "d_in chunks, fused", kernels.dot_rows, (g, W_dec, index)),
        ("decoder gradient (scatter-add)", "one scatter of [B·k, d_in] rows",
         lambda v, g, i: jnp.zeros((n, d)).at[i.reshape(-1)].add(
             (v[:, :, None] * g[:, None, :]).reshape(-1, d)),
         "one latent slot at a time",
         lambda v, g, i: kernels.scatter_rows((n, d), i, lambda j: v[:, j, None] * g),
         (values, g, index)),
    ]
    rows = []
    for name, plain_name, plain, ours_name, ours, inputs in cases:
        want, got = jax.jit(plain)(*inputs), jax.jit(ours)(*inputs)
        if name.startswith("top-k"):
            want, got = np.sort(np.asarray(want), 1), np.sort(np.asarray(got), 1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)
        t_plain, t_ours = median_ms(plain, *inputs), median_ms(ours, *inputs)
        rows.append({"operation": name, "plain form": plain_name, "plain ms": f"{t_plain:.1f}",
                     "jaxsae form": ours_name, "jaxsae ms": f"{t_ours:.1f}",
                     "speed-up": f"{t_plain / t_ours:.1f}x"})
    print(machine())
    print(f"batch {B}, d_in {d}, d_sae {n}, k {k}, float32")
    columns = ["operation", "plain form", "plain ms", "jaxsae form", "jaxsae ms", "speed-up"]
    print("\n".join(markdown_table(rows, columns)))


if __name__ == "__main__":
    main()
