"""The SAE's matrix products with hand-written gradients, and the selections they serve.

Each function here is a plain JAX function of arrays (no config, no parameters dict), tested
against the obvious form it replaces (tests/test_sae.py): the centred encoder matmul, the
block decode of nested (Matryoshka) losses, the gathers and scatters of the sparse TopK and
BatchTopK paths, exact top-k selections (per row, and across the batch), the k-th largest value
by bisection, and the straight-through step of JumpReLU thresholds.

The sparse paths' gathers, scatters and per-token top-k come in implementations chosen per
backend (`IMPLEMENTATIONS`, `using`): "cpu", forms tuned around XLA-CPU's fusion (gathers
looping over chunks of latent slots, scatters sorted by destination, a two-stage top-k behind a
barrier); "xla", the plain one-shot forms
(one gather of [batch, k, d_in] rows, one flat scatter, one top_k), which XLA's GPU and TPU
compilers fuse themselves; "pallas", hand-written kernels (`jaxsae.pallas_kernels`: Triton on
a GPU, interpreted elsewhere, for tests). "auto" is "cpu" on the CPU and "xla" elsewhere;
`benchmarks/sparse_topk_ops.py` times each on the machine at hand. All compute the same
function (tests/test_kernels.py); only the order of float additions differs, and which of
several latents tied at the k-th largest value a top-k keeps (a tie is rare in float32,
common in bfloat16).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec


@jax.custom_vjp
def centred_matmul(x: jax.Array, b: jax.Array, W: jax.Array) -> jax.Array:
    """(x - b) @ W, with the gradient of b reduced over the batch before its matmul."""
    return (x - b) @ W


def _centred_matmul_fwd(x, b, W):
    centred = x - b
    return centred @ W, (centred, W)


def _centred_matmul_bwd(residuals, g):
    # Autodiff would form g @ W.T [batch, d_in] (a sixth full matmul) and then sum it for b;
    # XLA does not always reorder that, so the sum comes first here: one vector-matrix product.
    # The input's gradient is only built if something uses it (the batch is data: nothing does).
    centred, W = residuals
    d_b = -(jnp.sum(g, axis=0) @ W.T)
    return g @ W.T, d_b, centred.T @ g


centred_matmul.defvjp(_centred_matmul_fwd, _centred_matmul_bwd)


@jax.custom_vjp
def encoder_matmul(x: jax.Array, b_dec: jax.Array, W: jax.Array, b_enc: jax.Array) -> jax.Array:
    """(x - b_dec) @ W + b_enc, the pre-activations; gradients as `centred_matmul`'s.

    On "cpu" the bias rides in the matmul as one more row of W against a column of ones, so
    the matmul's output is the pre-activations themselves: XLA-CPU does not fuse a bias into a
    matrix-matrix product, and otherwise writes the [batch, d_sae] product, reads it back and
    writes the sum (the pre-activations' readers, the top-k's maxima pass, its candidate
    gathers and AuxK, do not fuse it either). Costs a copy of W ([d_in + 1, d_sae]), so only
    batches of at least d_in rows take it (below, the copy outweighs the pass it saves)."""
    centred = x - b_dec
    if _plain() or x.shape[0] < W.shape[0]:
        return centred @ W + b_enc
    ones = jnp.ones((x.shape[0], 1), centred.dtype)
    return jnp.concatenate([centred, ones], axis=1) @ jnp.concatenate(
        [W, b_enc[None].astype(W.dtype)], axis=0)


def _encoder_matmul_fwd(x, b_dec, W, b_enc):
    return encoder_matmul(x, b_dec, W, b_enc), (x - b_dec, W)


def _encoder_matmul_bwd(residuals, g):
    d_x, d_b_dec, d_W = _centred_matmul_bwd(residuals, g)
    return d_x, d_b_dec, d_W, jnp.sum(g, axis=0)


encoder_matmul.defvjp(_encoder_matmul_fwd, _encoder_matmul_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def block_matmuls(acts: jax.Array, W_dec: jax.Array, ends: tuple[int, ...]) -> jax.Array:
    starts = (0, *ends[:-1])
    return jnp.stack([acts[:, a:b] @ W_dec[a:b] for a, b in zip(starts, ends, strict=True)])


def _block_matmuls_fwd(acts, W_dec, ends):
    return block_matmuls(acts, W_dec, ends), (acts, W_dec)


def _block_matmuls_bwd(ends, residuals, d_parts):
    # Written by hand so each gradient is assembled once by concatenation; autodiff of the
    # slices would pad every block's gradient to the full [batch, d_sae] and add them up.
    acts, W_dec = residuals
    starts = (0, *ends[:-1])
    blocks = list(zip(starts, ends, strict=True))
    d_acts = jnp.concatenate([d_parts[g] @ W_dec[a:b].T for g, (a, b) in enumerate(blocks)], 1)
    d_W = jnp.concatenate([acts[:, a:b].T @ d_parts[g] for g, (a, b) in enumerate(blocks)], 0)
    return d_acts, d_W


block_matmuls.defvjp(_block_matmuls_fwd, _block_matmuls_bwd)


# ---------------------------------------------------------------------------------------------
# Which implementation of the sparse gathers, scatters and top-k a trace uses

IMPLEMENTATIONS = ("auto", "cpu", "xla", "pallas")
_implementation: contextvars.ContextVar[str] = contextvars.ContextVar(
    "jaxsae_kernels", default="auto")


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """Functions traced inside take implementation `name` (one of IMPLEMENTATIONS). The choice
    is read while tracing, so it belongs around the traced function's body (as the train step
    puts it), not around a call of an already-compiled function."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"kernel implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    token = _implementation.set(name)
    try:
        yield
    finally:
        _implementation.reset(token)


def implementation() -> str:
    """The implementation in use, "auto" resolved for the default backend."""
    name = _implementation.get()
    if name == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return name


def _pallas(width: int):
    """The Pallas kernels, where chosen and rows of this width fit them (else None: the "xla"
    forms stand in)."""
    if implementation() != "pallas":
        return None
    from jaxsae import pallas_kernels  # imported only where chosen: it loads Pallas

    return pallas_kernels if pallas_kernels.supported(width) else None


def _plain() -> bool:
    """Whether the one-shot "xla" forms are used (also where Pallas does not fit)."""
    return implementation() != "cpu"


# On "cpu", the gathers below go one chosen latent (or one chunk of d_in) at a time, so XLA
# fuses each into a pass over [batch, d_in], and the scatters add their entries sorted by
# destination in chunks of 128 (`_sorted_scatter`); the one-shot forms ("xla": `W[index]`
# as a [batch, k, d_in] tensor, einsum, one flat scatter) build that tensor first (100M
# elements at d_in 768, k 32, batch 4096) and measured 1.3-5.5x slower on the CPU
# (benchmarks/sparse_topk_ops.py).
_UNROLL = 8


def sum_over(n: int, term) -> jax.Array:
    """term(0) + ... + term(n-1): a loop over chunks of _UNROLL terms, each chunk unrolled. The
    loop also makes the sum a separate computation, so XLA cannot fuse (and so recompute) it
    into each of its consumers."""
    def chunk(start, size):
        return sum(term(start + i) for i in range(size))

    full, rest = divmod(n, _UNROLL)
    if not full:
        return chunk(0, rest)
    # The remainder rides with the first chunk; the loop adds the other full chunks.
    return jax.lax.fori_loop(1, full, lambda c, acc: acc + chunk(rest + c * _UNROLL, _UNROLL),
                             chunk(0, rest + _UNROLL))


def rows_of(W: jax.Array, index: jax.Array) -> jax.Array:
    return W.at[index].get(mode="promise_in_bounds")


def gathered_sum(coef: jax.Array, src: jax.Array, src_row: jax.Array) -> jax.Array:
    """[n, d] in coef's dtype: row i is Σ_j coef[i, j] · src[src_row[i, j]] (coef, src_row:
    [n, k]; src [m, d])."""
    if (fast := _pallas(src.shape[1])) is not None:
        return fast.gathered_sum(coef, src, src_row)
    if _plain():
        return jnp.einsum("nk,nkd->nd", coef, rows_of(src, src_row))
    return sum_over(src_row.shape[1], lambda j: coef[:, j, None] * rows_of(src, src_row[:, j]))


def scatter_rows(n_out: int, dst: jax.Array, coef: jax.Array, src: jax.Array,
                 src_row: jax.Array | None = None) -> jax.Array:
    """[n_out, d] float32: coef[i, j] · src[src_row[i, j]] added at row dst[i, j], over every
    entry (dst, coef, src_row: [n, k]; src [m, d]; src_row None: src[i], src has n rows)."""
    if (fast := _pallas(src.shape[1])) is not None:
        return fast.scatter_rows(n_out, dst, coef, src, src_row)
    if _plain():
        rows = src[:, None] if src_row is None else rows_of(src, src_row)
        terms = (coef[:, :, None] * rows).astype(jnp.float32).reshape(-1, src.shape[1])
        return jnp.zeros((n_out, src.shape[1]), jnp.float32).at[dst.reshape(-1)].add(
            terms, mode="promise_in_bounds")
    return _sorted_scatter(n_out, dst, coef, src, src_row)


_SCATTER_CHUNK = 128


def _sorted_order(flat: jax.Array, n_out: int) -> tuple[jax.Array, jax.Array]:
    """(flat sorted, each sorted entry's position in flat), ties in position order. One sort
    of packed keys (index << bits | position) where both fit in 32 bits (unsigned): 4-5x
    faster than a sort of (key, position) pairs on the CPU (6 against 26-32 ms for 131,072
    entries; BatchTopK's 135,168 slots into d_sae 12,288 need all 32 bits)."""
    n = flat.shape[0]
    bits = max(1, (n - 1).bit_length())
    position = jnp.arange(n, dtype=jnp.int32)
    if max(1, (n_out - 1).bit_length()) + bits <= 32:
        packed = jnp.sort((flat.astype(jnp.uint32) << bits) | position.astype(jnp.uint32))
        return ((packed >> bits).astype(jnp.int32),
                (packed & ((1 << bits) - 1)).astype(jnp.int32))
    return jax.lax.sort_key_val(flat.astype(jnp.int32), position)


def _sorted_scatter(n_out: int, dst: jax.Array, coef: jax.Array, src: jax.Array,
                    src_row: jax.Array | None) -> jax.Array:
    """`scatter_rows` on "cpu": the entries sorted by destination row, then added in chunks of
    _SCATTER_CHUNK (each chunk's terms built in cache, the rows they add to visited in order).
    Measured 2.4-3x faster than adding one latent slot at a time (the scatter of a TopK step's
    decoder gradient, batch 4096, k 32, d_sae 12288: ~50 against 120-160 ms, sort included;
    benchmarks/sparse_topk_ops.py), and every row's terms are added in the same order on every
    run (destination, then entry)."""
    d, k = src.shape[1], dst.shape[1]
    sorted_dst, position = _sorted_order(dst.reshape(-1), n_out)
    rows = position // k if src_row is None else src_row.reshape(-1)[position]
    coefs = coef.reshape(-1)[position]

    def add(acc, lo, size):
        def part(a):
            return jax.lax.dynamic_slice_in_dim(a, lo, size)

        terms = (part(coefs)[:, None] * rows_of(src, part(rows))).astype(jnp.float32)
        return acc.at[part(sorted_dst)].add(terms, indices_are_sorted=True,
                                            mode="promise_in_bounds")

    n = sorted_dst.shape[0]
    size = min(_SCATTER_CHUNK, n)
    full = n // size
    # The first chunk outside the loop: the carry then has the type of the terms (inside
    # shard_map, values that vary across devices, which fresh zeros do not).
    acc = add(jnp.zeros((n_out, d), jnp.float32), 0, size)
    acc = jax.lax.fori_loop(1, full, lambda i, acc: add(acc, i * size, size), acc)
    if n % size:
        acc = add(acc, full * size, n % size)
    return acc


def dot_rows(g: jax.Array, W: jax.Array, index: jax.Array,
             row: jax.Array | None = None) -> jax.Array:
    """[n, k]: g[i] · W[index[i, j]] (with `row` [n, k]: g[row[i, j]] · W[index[i, j]]).

    On "cpu", a sum over chunks of d_in (16 wide where d_in allows) of gathered [.., k, 16]
    products: elementwise work XLA fuses, where a reduction over d_in of the gathered rows
    built them first (3.6x slower on the CPU)."""
    if (fast := _pallas(W.shape[1])) is not None:
        return fast.dot_rows(g, W, index, row)
    if _plain():
        mine = g[:, None] if row is None else rows_of(g, row)
        return jnp.einsum("nkd,nkd->nk", mine, rows_of(W, index))
    d = g.shape[-1]
    width = next(w for w in (16, 8, 4, 2, 1) if d % w == 0)
    g3 = g.reshape(g.shape[0], d // width, width)
    W3 = W.reshape(W.shape[0], d // width, width)

    def g_chunk(c):
        return g3[:, None, c] if row is None else rows_of(g3[:, c], row)

    return sum_over(d // width, lambda c: g_chunk(c) * rows_of(W3[:, c], index)).sum(-1)


@jax.custom_vjp
def take_pre_acts(x, b_dec, W_enc, b_enc, pre_acts, index, row=None):
    """[batch, k] pre_acts[b, index[b, j]] (with `row` [n, m]: pre_acts[row, index]),
    differentiated as (x - b_dec) · W_enc[:, index] + b_enc[index]. `pre_acts` must carry no
    gradient."""
    if row is None:
        return jnp.take_along_axis(pre_acts, index, axis=1)
    return pre_acts.at[row, index].get(mode="promise_in_bounds")


def _take_pre_acts_fwd(x, b_dec, W_enc, b_enc, pre_acts, index, row=None):
    return (take_pre_acts(x, b_dec, W_enc, b_enc, pre_acts, index, row),
            (x, b_dec, W_enc, pre_acts, index, row))


def _take_pre_acts_bwd(residuals, g):
    x, b_dec, W_enc, pre_acts, index, row = residuals
    d_sae = W_enc.shape[1]
    per_latent = jnp.zeros(d_sae, jnp.float32).at[index].add(g.astype(jnp.float32))
    centred = x - b_dec
    # Rows of W_enc.T are scattered (contiguous), then transposed once.
    d_W_enc = scatter_rows(d_sae, index, g, centred, row).T
    # The input's gradient (unused in training, so dropped by XLA there).
    if row is None:
        d_x = gathered_sum(g, W_enc.T, index)
    else:
        d_x = scatter_rows(x.shape[0], row, g, W_enc.T, index)
    d_b_dec = -(W_enc @ per_latent.astype(W_enc.dtype))
    return (d_x.astype(x.dtype), d_b_dec.astype(b_dec.dtype), d_W_enc.astype(W_enc.dtype),
            per_latent.astype(pre_acts.dtype), jnp.zeros_like(pre_acts), None, None)


take_pre_acts.defvjp(_take_pre_acts_fwd, _take_pre_acts_bwd)


@jax.custom_vjp
def take_columns(x, b_dec, W_enc, b_enc, pre_acts, cols):
    """[batch, m] pre_acts[:, cols], differentiated as (x - b_dec) @ W_enc[:, cols] +
    b_enc[cols]: the pre-activations of a few latents (AuxK's dead ones) with their gradients,
    without a dense encoder gradient. `pre_acts` must carry no gradient; `cols` may repeat
    (the repeats' gradients add)."""
    return jnp.take(pre_acts, cols, axis=1)


def _take_columns_fwd(x, b_dec, W_enc, b_enc, pre_acts, cols):
    return take_columns(x, b_dec, W_enc, b_enc, pre_acts, cols), (x, b_dec, W_enc, b_enc,
                                                                    pre_acts, cols)


def _take_columns_bwd(residuals, g):
    x, b_dec, W_enc, b_enc, pre_acts, cols = residuals
    d_sae = W_enc.shape[1]
    columns = jnp.take(W_enc, cols, axis=1)  # [d_in, m]
    g_sum = jnp.sum(g, axis=0, dtype=jnp.float32)
    # As in take_pre_acts: rows of W_enc.T are added (contiguous), then transposed once.
    d_W_enc = jnp.zeros((d_sae, W_enc.shape[0]), jnp.float32).at[cols].add(
        (g.T @ (x - b_dec)).astype(jnp.float32)).T
    d_b_enc = jnp.zeros(d_sae, jnp.float32).at[cols].add(g_sum)
    return ((g @ columns.T).astype(x.dtype), (-(columns @ g_sum.astype(W_enc.dtype))).astype(
        b_dec.dtype), d_W_enc.astype(W_enc.dtype), d_b_enc.astype(b_enc.dtype),
        jnp.zeros_like(pre_acts), None)


take_columns.defvjp(_take_columns_fwd, _take_columns_bwd)


@jax.custom_vjp
def gather_decode(values: jax.Array, W_dec: jax.Array, index: jax.Array) -> jax.Array:
    """[batch, d_in] Σ_j values[b, j] · W_dec[index[b, j]]."""
    return gathered_sum(values, W_dec, index)


def _gather_decode_fwd(values, W_dec, index):
    return gather_decode(values, W_dec, index), (values, W_dec, index)


def _gather_decode_bwd(residuals, g):
    values, W_dec, index = residuals
    return (*_decode_grads(values, W_dec, index, None, g), None)


def _decode_grads(values, W_dec, index, row, g):
    """The gradients of values and W_dec of a sparse decode (row None: row-aligned)."""
    d_values = dot_rows(g, W_dec, index, row)
    d_W = scatter_rows(W_dec.shape[0], index, values, g, row)
    return d_values.astype(values.dtype), d_W.astype(W_dec.dtype)


gather_decode.defvjp(_gather_decode_fwd, _gather_decode_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def scatter_decode(values: jax.Array, W_dec: jax.Array, index: jax.Array, row: jax.Array,
                   n_rows: int) -> jax.Array:
    """[n_rows, d_in] float32: Σ over entries e of values[e] · W_dec[index[e]] added at row
    row[e] (`values`, `index`, `row`: [n, m]). The decode of codes whose rows hold different
    numbers of latents (BatchTopK), or of several blocks at once (row = block · batch + b)."""
    return scatter_rows(n_rows, row, values, W_dec, index)


def _scatter_decode_fwd(values, W_dec, index, row, n_rows):
    return scatter_decode(values, W_dec, index, row, n_rows), (values, W_dec, index, row)


def _scatter_decode_bwd(n_rows, residuals, g):
    values, W_dec, index, row = residuals
    return (*_decode_grads(values, W_dec, index, row, g), None, None)


scatter_decode.defvjp(_scatter_decode_fwd, _scatter_decode_bwd)


def topk_indices(pre_acts: jax.Array, k: int, mesh: Mesh | None) -> jax.Array:
    """[batch, k] indices of each row's k largest entries, computed where the rows live."""
    if mesh is None or mesh.size == 1:
        return top_k_indices(pre_acts, k)
    spec = PartitionSpec("data", None)
    return jax.shard_map(partial(top_k_indices, k=k), mesh=mesh, in_specs=spec,
                         out_specs=spec)(pre_acts)


_TOPK_CHUNK = 16


def top_k_indices(values: jax.Array, k: int) -> jax.Array:
    """[rows, k] the indices of each row's k largest entries, largest first; the same set as
    jax.lax.top_k (up to ties at the k-th value), in two stages.

    The row is cut into n = width / 16 chunks of 16 entries; the k chunks with the largest
    maxima hold every one of the row's k largest entries (an entry outside them is below k
    chunk maxima), so a top-k over those k·16 candidates is exact. Measured 1.5x faster than
    one top_k over the row on the CPU (d_sae 12288, k 32), where the first stage is a fused
    max pass and the top_ks are small. Rows too short for it (fewer than 2k chunks) take one
    top_k. Other implementations than "cpu" take one plain top_k (XLA's GPU and TPU top-k
    kernels).

    Chunk j is the strided set {j, j + n, ..., j + 15n}, so its maxima are the elementwise
    maximum of 16 contiguous slices of the row, which XLA fuses into one vectorised pass over
    the pre-activations. (Contiguous chunks needed 16 strided slices, a pass XLA-CPU cannot
    vectorise: 61 ms against 8.8 for the maxima of [4096, 12288] on a 2-core Xeon, the whole
    selection 117 → 68 ms, 2026-12-04. A max-reduction over a [rows, n, 16] reshape was handed
    to a separate library kernel, and XLA wrote a second [batch, d_sae] copy of the
    pre-activations for it: 62-94 ms of a ~1.1 s TopK step, 2026-12-03.)
    """
    rows, width = values.shape
    n = width // _TOPK_CHUNK
    if _plain():
        return jax.lax.top_k(values, k)[1]
    if width % _TOPK_CHUNK or n < 2 * k:
        return _top_k_positions(values, k)
    maxima = functools.reduce(jnp.maximum, [values[:, i * n:(i + 1) * n]
                                            for i in range(_TOPK_CHUNK)])
    best = _top_k_positions(maxima, k)  # [rows, k] chunk numbers
    offsets = (best[:, :, None] + n * jnp.arange(_TOPK_CHUNK)).reshape(rows, -1)
    candidates = jnp.take_along_axis(values, offsets, axis=1)
    position = _top_k_positions(candidates, k)  # [rows, k] into the k·16 candidates
    chunk = jnp.take_along_axis(best, position // _TOPK_CHUNK, axis=1)
    return chunk + n * (position % _TOPK_CHUNK)


def _top_k_positions(values: jax.Array, k: int) -> jax.Array:
    # (The "cpu" implementation's top_k.) The barrier keeps XLA from folding the consumers'
    # slices into the top_k's sort, which stops it recognising a top-k and leaves a full sort
    # of every row (50x slower). (On the indices alone: a barrier over the (values, indices)
    # tuple crashes XLA's partitioner.)
    return jax.lax.optimization_barrier(jax.lax.top_k(values, k)[1])


def kth_largest_nonnegative(values: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry of a non-negative float32 array (0 if fewer than k are positive).

    The array is flattened first: XLA-CPU's counts over a 2-D array ran 2-2.5x slower than
    over the same entries in 1-D ([135168, 16], BatchTopK's candidates: 27 against 11 ms for
    the 32 passes; 2-core AMD EPYC VM, 2026-12-05)."""
    return kth_largest_and_count(values, k)[0]


def kth_largest_and_count(values: jax.Array, k: int, *, across: tuple[str, ...] = ()
                          ) -> tuple[jax.Array, jax.Array]:
    """`kth_largest_nonnegative`, and how many entries are at least that value (more than k
    when values tie at it), which the bisection has counted already. `across`: in a
    shard_map, the mesh axes `values` is one block of (the counts are summed over them)."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32).reshape(-1), jnp.int32)

    def body(_, state):
        lo, hi, at_lo = state  # invariant: count(bits >= lo) = at_lo >= k > count(bits >= hi)
        mid = lo + (hi - lo) // 2
        count = jnp.sum(bits >= mid, dtype=jnp.int32)
        count = jax.lax.psum(count, across) if across else count
        enough = count >= k
        return (jnp.where(enough, mid, lo), jnp.where(enough, hi, mid),
                jnp.where(enough, count, at_lo))

    size = jax.lax.psum(bits.shape[0], across) if across else bits.shape[0]
    start = (jnp.int32(0), jnp.int32(0x7F800001), jnp.int32(size))  # 0 .. above +inf
    lo, _, at_lo = jax.lax.fori_loop(0, 32, body, start)
    return jax.lax.bitcast_convert_type(lo, jnp.float32), at_lo


@jax.custom_vjp
def step_ste(pre_acts: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """Heaviside H(z - θ) with a straight-through gradient for θ: -(1/ε)·K((z - θ)/ε)."""
    return (pre_acts > threshold).astype(pre_acts.dtype)


def _step_fwd(pre_acts, threshold, bandwidth):
    return step_ste(pre_acts, threshold, bandwidth), (pre_acts, threshold, bandwidth)


def _step_bwd(res, g):
    pre_acts, threshold, bandwidth = res
    d_threshold = -(1.0 / bandwidth) * rectangle((pre_acts - threshold) / bandwidth) * g
    return jnp.zeros_like(pre_acts), jnp.sum(d_threshold, axis=0), None


step_ste.defvjp(_step_fwd, _step_bwd)


def rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def first_true(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """(positions of the first `size` True entries of the 1-D `mask` in order, padded with 0;
    how many are True): `jnp.nonzero(mask, size=size, fill_value=0)` and its count.

    The j-th True entry is the first position whose prefix count reaches j, found by a binary
    search of the prefix counts. `jnp.nonzero` takes the same prefix counts and then a
    scatter-add over every entry, which XLA-CPU runs one element at a time; and the prefix
    counts here are an associative scan (log n vectorised passes) rather than XLA's cumsum.
    A mask of 3.1M entries (BatchTopK's chunk maxima at batch 4096, d_sae 12,288), 2-core
    AMD EPYC VM, 2026-12-05: the scan 7 ms against 20 for `jnp.cumsum`, the search 5 ms,
    `jnp.nonzero` 33 ms. The search costs `size`·log n gathers, so it pays where few entries
    are wanted from many: SynthSAEBench's compactions, which keep a large share of short
    lists, ran 17% slower with it (same day and VM) and keep `jnp.nonzero`.
    """
    n = mask.shape[0]
    ranks = jax.lax.associative_scan(jnp.add, mask.astype(jnp.int32))
    position = jnp.searchsorted(ranks, jnp.arange(1, size + 1, dtype=jnp.int32),
                                side="left", method="scan_unrolled").astype(jnp.int32)
    return jnp.where(position < n, position, 0), ranks[-1]


def any_member(predicate: jax.Array, sweep_axis: str | None) -> jax.Array:
    """`predicate` for a `lax.cond` that skips work: under a sweep's vmap (axis `sweep_axis`)
    True when it holds for some SAE of the sweep, one value for all, so that the `cond` stays
    a branch (a per-SAE predicate turns it into a select that runs both branches)."""
    if sweep_axis is None:
        return predicate
    return jax.lax.psum(predicate.astype(jnp.int32), sweep_axis) > 0


def keep_largest(values: jax.Array, threshold: jax.Array, n: int | jax.Array,
                 reaching: jax.Array, *, sweep_axis: str | None = None) -> jax.Array:
    """`values >= threshold`, cut to n entries when more than n reach the threshold (their
    number, `reaching`, as `kth_largest_and_count` gives it): every entry above it, then the
    entries equal to it in row-major order. With `threshold` the n-th largest value this is
    exactly n entries, as a top-n over the flattened array keeps (SAELens's BatchTopK: `topk`
    of the flattened batch). Ties past n are rare in real activations (copies of a token in
    one batch, equal latents), so the cut runs only then (a `cond`; under a sweep's vmap,
    axis `sweep_axis`, when some SAE of the sweep needs it: `_cut_ties` is exact either
    way)."""
    keep = values >= threshold
    return jax.lax.cond(any_member(reaching > n, sweep_axis),
                        lambda: _cut_ties(values, threshold, n, reaching), lambda: keep)


def _cut_ties(values: jax.Array, threshold: jax.Array, n: int | jax.Array,
              reaching: jax.Array | None = None) -> jax.Array:
    """Every entry above `threshold` and the first ties in row-major order, n in all (as
    many as there are, if fewer), without a prefix count over every entry: the rows' tie
    counts and their running sum say which rows keep all their ties and in which one the cut
    falls; that row alone is ranked. `reaching`: how many entries are at least `threshold`,
    if known. Reductions and fused passes, which XLA partitions like any other."""
    shape = values.shape
    v = jax.lax.stop_gradient(values)
    v = v.reshape(1, -1) if v.ndim == 1 else v.reshape(shape[0], -1)
    tie = v == threshold
    per_row = jnp.sum(tie, axis=1, dtype=jnp.int32)
    above = (jnp.sum(v > threshold, dtype=jnp.int32) if reaching is None
             else reaching - jnp.sum(per_row))
    room = n - above  # ties to keep
    through = jnp.cumsum(per_row)  # ties up to each row's end
    whole = through <= room  # rows that keep every tie
    cut = jnp.argmax(~whole)  # the first row that does not (if any)
    partial = (jnp.arange(v.shape[0]) == cut) & ~whole
    ranked = jnp.cumsum(jnp.sum(tie & partial[:, None], axis=0, dtype=jnp.int32))
    allowed = room - (through - per_row)[cut]
    kept = tie & (whole[:, None] | (partial[:, None] & (ranked[None, :] <= allowed)))
    return ((v > threshold) | kept).reshape(shape)


def batch_top_k_entries(values: jax.Array, k: int | jax.Array, *, slots: int,
                        sweep_axis: str | None = None
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The batch's batch·k largest positive entries of `values` [batch, width] (BatchTopK's
    codes) as a flat list, in row order: (row [slots], column [slots], valid [slots] bool,
    threshold []), padded with invalid entries (row 0, column 0); `slots` must be at least
    batch·k. `threshold` is the smallest kept value (0 when fewer than batch·k are positive,
    and then every positive entry is kept). Exactly batch·k entries are kept otherwise: every
    entry above the threshold, then entries equal to it in row-major order (`keep_largest`),
    as `jaxsae.activations.batchtopk.batchtopk` keeps them, while no more than `batch` values
    beyond batch·k tie at the threshold (or at the chunk stage's: below). `sweep_axis`: the
    vmap axis of a sweep's SAEs, if any (see `any_member`).

    The chunk-maxima idea of `top_k_indices`, across the batch: each row is cut into chunks
    of 16, and the batch·k chunks with the largest maxima hold every one of the batch·k
    largest entries (an entry outside them is below batch·k chunk maxima). The threshold is
    then the batch·k-th largest of those chunks' entries. Both k-th largest values are found
    by bisection (`kth_largest_nonnegative`) over arrays 16x and ~24x smaller than the batch's
    (d_sae 12288, k 32), and no step sorts or passes over everything more than once.
    """
    rows, width = values.shape
    target = rows * k
    size = next(w for w in (_TOPK_CHUNK, 8, 4, 2, 1) if width % w == 0)
    per_row = width // size
    tiny = jnp.finfo(jnp.float32).tiny
    chunks = values.reshape(rows * per_row, size)
    # relu after the max (they commute): relu first made XLA write the relu'd batch, 7x slower
    maxima = jax.nn.relu(values.reshape(rows, per_row, size).max(axis=2).reshape(-1)
                         ).astype(jnp.float32)
    chunk_floor = jnp.maximum(kth_largest_nonnegative(maxima, target), tiny)
    # The lists hold one spare entry a token, for values tied at a k-th largest: they tie
    # often enough (of random float32 normals' 3.1M chunk maxima, 131,079 reached the
    # 131,072nd largest) that cutting them from the whole array (a prefix count over it, in
    # a first version) cost ~40% of the selection (2-core Xeon, 2026-12-06), and a `cond` or
    # `while_loop` around it ran whenever one SAE of a sweep needed it. They are cut from the
    # list.
    # More ties than that (a batch of mostly equal values) keep the first in row order.
    wide = slots + rows
    # At most batch·k chunks reach the batch·k-th largest maximum, ties aside; padding
    # repeats chunk 0, and its entries are masked out below.
    n_chunks = min(wide, maxima.shape[0])
    chosen, n_chosen = first_true(maxima >= chunk_floor, n_chunks)
    real = jnp.arange(chosen.shape[0]) < n_chosen
    candidates = jnp.where(real[:, None], jax.nn.relu(chunks[chosen].astype(jnp.float32)),
                           0.0).reshape(-1)  # [n_chunks · size]
    threshold = kth_largest_nonnegative(candidates, target)
    floor = jnp.maximum(threshold, tiny)
    position, n_kept = first_true(candidates >= floor, wide)

    def cut_listed():  # the ties past batch·k: cut from the list
        value = candidates[position]
        listed = jnp.arange(wide) < n_kept
        keep = _cut_ties(jnp.where(listed, value, 0.0), floor, target)
        kept, _ = first_true(keep, wide)
        return position[kept], jnp.minimum(n_kept, target)

    position, n_kept = jax.lax.cond(any_member(n_kept > target, sweep_axis), cut_listed,
                                    lambda: (position, n_kept))
    position = position[:slots]
    chunk = chosen[position // size]
    row, column = chunk // per_row, (chunk % per_row) * size + position % size
    valid = jnp.arange(slots) < n_kept
    return row.astype(jnp.int32), column.astype(jnp.int32), valid, threshold
