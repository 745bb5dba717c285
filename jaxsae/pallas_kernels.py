"""Pallas kernels for the sparse paths' gathers and scatters (`jaxsae.kernels`, implementation
"pallas"): the operations sparsify and OpenAI's TopK code write in Triton.

- `gathered_sum`: row i of the output is Σ_j coef[i, j] · src[src_row[i, j]] (the sparse
  decode, and the input's gradient of the encoder's chosen columns). A program owns a block
  of output rows and columns and accumulates in float32 registers: no atomics.
- `dot_rows`: g[i] · W[index[i, j]] (the gradient of a decode's values). A program owns a
  block of rows and one latent slot j, and runs over d_in.
- `scatter_rows`: coef[e] · src[src_row[e]] added at row dst[e] of a float32 output (the
  decoder's gradient, the encoder's gradient on the chosen columns, the BatchTopK decode). A
  program takes a block of entries and of columns and atomically adds each entry's row
  slice, so entries of one latent from many tokens need no sort. Float atomics make the order
  of additions, and so the last bits, vary from run to run (as XLA's GPU scatter does).

On a GPU the kernels go through Pallas's Triton backend; on other backends they run in
Pallas's interpreter (how tests/test_kernels.py checks them on the CPU: slow, for tests only).
Block shapes are powers of two; a d_in that is not a multiple of 16 is refused (the caller
keeps the "xla" form then, see `supported`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

ROWS = 32
"""Output rows (gathered_sum, dot_rows) or entries (scatter_rows) a program takes."""
COLUMNS = 128
"""The widest block of d_in a program takes (narrower when d_in needs it)."""


def supported(d: int) -> bool:
    """Whether rows of width d fit the kernels' blocks."""
    return d % 16 == 0


def _columns(d: int) -> int:
    if not supported(d):
        raise ValueError(f"the Pallas kernels need a row width divisible by 16, got {d}")
    return next(w for w in (COLUMNS, 64, 32, 16) if d % w == 0)


TRITON: bool | None = None
"""Lower through Triton (True) or the interpreter (False); None: Triton on a GPU backend. (Tests
set True to check, on the CPU, that the kernels lower to Triton for CUDA, by jax.export.)"""


def _call(kernel, **kwargs):
    if TRITON or (TRITON is None and jax.default_backend() == "gpu"):
        return pl.pallas_call(kernel, compiler_params=pltriton.CompilerParams(
            num_warps=4, num_stages=2), **kwargs)
    return pl.pallas_call(kernel, interpret=True, **kwargs)


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
    extra = -a.shape[0] % multiple
    return a if not extra else jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))


def gathered_sum(coef: jax.Array, src: jax.Array, src_row: jax.Array) -> jax.Array:
    """[n, d] in coef's dtype: Σ_j coef[i, j] · src[src_row[i, j]]."""
    n, k = src_row.shape
    m, d = src.shape
    columns = _columns(d)

    def kernel(coef_ref, row_ref, src_ref, out_ref):
        first = pl.program_id(1) * columns

        def add(j, acc):
            rows = src_ref[row_ref[:, j], pl.ds(first, columns)]
            return acc + coef_ref[:, j][:, None].astype(jnp.float32) * rows.astype(jnp.float32)

        acc = jax.lax.fori_loop(0, k, add, jnp.zeros((ROWS, columns), jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)

    # Padding entries have coefficient 0 and read row 0.
    coef_p, row_p = _pad_rows(coef, ROWS), _pad_rows(src_row.astype(jnp.int32), ROWS)
    entries = pl.BlockSpec((ROWS, k), lambda i, c: (i, 0))
    out = _call(kernel, grid=(coef_p.shape[0] // ROWS, d // columns),
                in_specs=[entries, entries, pl.BlockSpec((m, d), lambda i, c: (0, 0))],
                out_specs=pl.BlockSpec((ROWS, columns), lambda i, c: (i, c)),
                out_shape=jax.ShapeDtypeStruct((coef_p.shape[0], d), coef.dtype),
                )(coef_p, row_p, src)
    return out[:n]


def dot_rows(g: jax.Array, W: jax.Array, index: jax.Array,
             row: jax.Array | None = None) -> jax.Array:
    """[n, k]: g[i] · W[index[i, j]] (with `row`: g[row[i, j]] · W[index[i, j]]), in g's
    dtype, accumulated in float32."""
    n, k = index.shape
    d = W.shape[1]
    columns = _columns(d)
    chunks = d // columns

    def kernel(index_ref, row_ref, g_ref, W_ref, out_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        latents = index_ref[:, j]
        tokens = (i * ROWS + jax.lax.iota(jnp.int32, ROWS)) if row is None else row_ref[:, j]

        def add(c, acc):
            cols = pl.ds(c * columns, columns)
            product = (g_ref[tokens, cols].astype(jnp.float32)
                       * W_ref[latents, cols].astype(jnp.float32))
            return acc + jnp.sum(product, axis=1)

        out_ref[:, j] = jax.lax.fori_loop(0, chunks, add, jnp.zeros((ROWS,), jnp.float32)
                                          ).astype(out_ref.dtype)

    index_p = _pad_rows(index.astype(jnp.int32), ROWS)
    rows = index_p.shape[0]
    if row is None:  # the kernel reads g's rows of its own block: pad g to the blocks
        g = _pad_rows(g, ROWS)
        row_p = index_p  # unread
    else:
        row_p = _pad_rows(row.astype(jnp.int32), ROWS)
    entries = pl.BlockSpec((ROWS, k), lambda i, j: (i, 0))
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0, 0))  # noqa: E731
    out = _call(kernel, grid=(rows // ROWS, k), in_specs=[entries, entries, whole(g), whole(W)],
                out_specs=entries, out_shape=jax.ShapeDtypeStruct((rows, k), g.dtype),
                )(index_p, row_p, g, W)
    return out[:n]


def scatter_rows(n_out: int, dst: jax.Array, coef: jax.Array, src: jax.Array,
                 src_row: jax.Array | None = None) -> jax.Array:
    """[n_out, d] float32: coef[i, j] · src[src_row[i, j]] (src[i] when src_row is None) added
    at row dst[i, j]."""
    n, k = dst.shape
    d = src.shape[1]
    columns = _columns(d)
    if src_row is None:
        src_row = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, k))
    # One flat list of entries; padding adds 0 to row 0.
    dst_f = _pad_rows(dst.reshape(-1).astype(jnp.int32), ROWS)
    coef_f = _pad_rows(coef.reshape(-1), ROWS)
    row_f = _pad_rows(src_row.reshape(-1).astype(jnp.int32), ROWS)

    def kernel(dst_ref, coef_ref, row_ref, src_ref, zeros_ref, out_ref):
        del zeros_ref  # the output's initial value (aliased)
        cols = pl.ds(pl.program_id(1) * columns, columns)

        def add(e, carry):
            value = (coef_ref[e].astype(jnp.float32)
                     * src_ref[row_ref[e], cols].astype(jnp.float32))
            pltriton.atomic_add(out_ref, (dst_ref[e], cols), value)
            return carry

        jax.lax.fori_loop(0, ROWS, add, 0)

    entries = pl.BlockSpec((ROWS,), lambda i, c: (i,))
    whole = lambda shape: pl.BlockSpec(shape, lambda i, c: (0, 0))  # noqa: E731
    return _call(kernel, grid=(dst_f.shape[0] // ROWS, d // columns),
                 in_specs=[entries, entries, entries, whole(src.shape), whole((n_out, d))],
                 out_specs=whole((n_out, d)),
                 out_shape=jax.ShapeDtypeStruct((n_out, d), jnp.float32),
                 input_output_aliases={4: 0},
                 )(dst_f, coef_f, row_f, src, jnp.zeros((n_out, d), jnp.float32))
