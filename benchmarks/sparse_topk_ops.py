"""The sparse paths' operations in each kernel implementation (`jaxsae.kernels`), timed one by
one on the same inputs.

    python benchmarks/sparse_topk_ops.py [--d-in 768] [--d-sae 12288] [--batch 4096] [--k 32]
        [--impls cpu,xla[,pallas]] [--dtype float32|bfloat16] [--json PATH]

Implementations: "cpu" (forms tuned for XLA-CPU: gathers looping over latent slots,
scatters sorted by destination, a two-stage top-k behind a barrier), "xla" (the plain
one-shot forms: one gather of [batch, k, d_in], one flat scatter, one top_k), "pallas" (the
Pallas kernels: Triton on a GPU; on the CPU they run in the interpreter, far too slow to time
at these shapes, so the default there is cpu,xla). Each operation is checked to agree with
the first implementation before it is timed (jitted, the median of 5 runs after
compilation). Prints a markdown table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_shape_args, machine, median_seconds

from jaxsae import hostmem, kernels
from jaxsae.outputs import atomic_write, json_text, markdown_table


def operations(batch: int, d_in: int, d_sae: int, k: int, dtype) -> list[tuple]:
    """(name, function, inputs, selects) of each operation, on random inputs; `selects`: it
    returns indices into its first input, compared by the values they pick (implementations
    may break ties at the k-th value differently, as bfloat16 inputs have)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (batch, d_in), dtype)
    W_enc = (jax.random.normal(keys[1], (d_in, d_sae)) / np.sqrt(d_in)).astype(dtype)
    W_dec = W_enc.T + jnp.zeros((), dtype)
    pre = x @ W_enc
    index = jax.lax.top_k(pre, k)[1]
    values = jnp.take_along_axis(pre, index, axis=1)
    g = jax.random.normal(keys[2], (batch, d_in), dtype)
    # BatchTopK's flat codes: k entries a token on average, tokens in row order.
    row = jnp.sort(jax.random.randint(keys[3], (batch, k), 0, batch).reshape(-1)).reshape(
        batch, k)
    return [
        ("top-k selection [B, d_sae] -> [B, k]", lambda p: kernels.top_k_indices(p, k),
         (pre,), True),
        ("decode Σ_j v·W_dec[i_j]", kernels.gathered_sum, (values, W_dec, index), False),
        ("its value gradient g·W_dec[i_j]", kernels.dot_rows, (g, W_dec, index), False),
        ("decoder gradient (scatter-add)",
         lambda v, g, i: kernels.scatter_rows(d_sae, i, v, g), (values, g, index), False),
        ("flat-code decode (BatchTopK)",
         lambda v, W, i, r: kernels.scatter_rows(batch, r, v, W, i), (values, W_dec, index, row),
         False),
    ]


def run(batch: int, d_in: int, d_sae: int, k: int, dtype: str, impls: list[str]) -> list[dict]:
    """One row per operation: milliseconds of each implementation."""
    rows = []
    for name, fn, inputs, as_sets in operations(batch, d_in, d_sae, k, jnp.dtype(dtype)):
        row: dict = {"operation": name}
        reference = None
        for impl in impls:
            def traced(*args, impl=impl, fn=fn):
                with kernels.using(impl):
                    return fn(*args)
            jitted = jax.jit(traced)
            got = np.asarray(jitted(*inputs))
            if as_sets:
                got = np.sort(np.take_along_axis(np.asarray(inputs[0], np.float32), got,
                                                 axis=1), axis=1)
            got = got.astype(np.float32)
            if reference is None:
                reference = got
            else:
                tol = 1e-3 if dtype == "float32" else 5e-2
                np.testing.assert_allclose(got, reference, rtol=tol, atol=tol * 10,
                                           err_msg=f"{impl}: {name}")
            row[impl] = median_seconds(jitted, *inputs) * 1e3
        rows.append(row)
    return rows


def main() -> None:
    hostmem.restart_with_huge_pages()  # as the jaxsae command does
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    parser.add_argument("--k", type=int, default=32, help="TopK's k")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the matmuls")
    parser.add_argument("--impls", default=None,
                        help="comma-separated, from cpu,xla,pallas (default: cpu,xla on the "
                             "CPU, all three elsewhere)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not 1 <= args.k <= args.d_sae or min(args.batch, args.d_in) < 1:
        parser.error(f"--k must be in 1..--d-sae ({args.d_sae}), sizes >= 1")
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        parser.error(f"--json {args.json}: a directory, or in one that does not exist")
    if args.impls is not None and not args.impls.strip(","):
        parser.error("--impls: empty (choose from cpu, xla, pallas)")
    impls = (args.impls.split(",") if args.impls else
             ["cpu", "xla"] if jax.default_backend() == "cpu" else ["cpu", "xla", "pallas"])
    unknown = sorted(set(impls) - {"cpu", "xla", "pallas"})
    if unknown:
        parser.error(f"--impls: unknown {', '.join(unknown)} (choose from cpu, xla, pallas)")
    rows = run(args.batch, args.d_in, args.d_sae, args.k, args.dtype, impls)
    shape = {"batch": args.batch, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k,
             "dtype": args.dtype}
    print(machine())
    print(", ".join(f"{key} {value}" for key, value in shape.items()))
    table = [{"operation": r["operation"], **{f"{i} ms": f"{r[i]:.2f}" for i in impls}}
             for r in rows]
    print("\n".join(markdown_table(table, ["operation", *(f"{i} ms" for i in impls)])))
    if args.json:
        atomic_write(args.json, json_text({"machine": machine(), "shape": shape, "ms": rows}))


if __name__ == "__main__":
    main()
