"""SAE parameters, initialisation, encode / decode and the activation functions.

Parameters are a dict pytree in SAELens orientation, so export is a copy:
  W_enc [d_in, d_sae] (absent when tied: the encoder is W_dec.T), b_enc [d_sae],
  W_dec [d_sae, d_in], b_dec [d_in], threshold [d_sae] (jumprelu, batchtopk).

The input is centred by the decoder bias before encoding (SAELens `apply_b_dec_to_input`):
  pre_acts = (x - b_dec) @ W_enc + b_enc,   x_hat = acts @ W_dec + b_dec.
"""

from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxsae.config import SAEConfig

Params = dict[str, jax.Array]


@flax.struct.dataclass
class ForwardOutput:
    """Everything the forward pass computed, for the loss terms (none re-encodes or re-decodes)."""

    x: jax.Array
    """[batch, d_in] input."""
    pre_acts: jax.Array
    """[batch, d_sae] encoder pre-activations."""
    acts: jax.Array
    """[batch, d_sae] latent activations (sparse codes). On the sparse TopK path they are
    assembled from `top_index` / `top_values` only if something reads them."""
    x_hat: jax.Array
    """[batch, d_in] reconstruction."""
    decoder_norms: jax.Array
    """[d_sae] L2 norm of each decoder row."""
    tokens_since_fired: jax.Array
    """[d_sae] tokens since each latent last fired, before this batch (from the train state)."""
    batch_threshold: jax.Array
    """[] BatchTopK: the smallest activation kept in this batch (0 for other activations)."""
    key: jax.Array
    """This step's random key (fold_in(state.rng, step)), for terms that sample."""
    block_recons: jax.Array
    """[n_blocks, batch, d_in] the decode split by latent blocks [ends[i-1], ends[i]) (no bias);
    their sum plus b_dec is x_hat. Terms build prefix reconstructions from them."""
    top_index: jax.Array | None = None
    """[batch, k] the sparse TopK path's chosen latents (None on the dense paths)."""
    top_values: jax.Array | None = None
    """[batch, k] their activations."""
    prefix_ends: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    """Static ends of the latent blocks, increasing, the last = d_sae."""
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)
    """The device mesh the step runs on (for per-device top-k selections); None: one device."""
    sweep_axis: str | None = flax.struct.field(pytree_node=False, default=None)
    """The vmap axis name when the step trains a sweep (None: one SAE). A term that skips work
    with lax.cond must decide over all SAEs (a per-SAE predicate turns cond into select)."""

    def fired(self) -> jax.Array:
        """[d_sae] bool: which latents fired on some token of the batch."""
        if self.top_index is None:
            return jnp.any(self.acts > 0, axis=0)
        hits = (self.top_values > 0).astype(jnp.int32)
        return jnp.zeros(self.acts.shape[-1], jnp.int32).at[self.top_index].max(hits) > 0

    def l0(self) -> jax.Array:
        """[batch] the number of active latents of each token."""
        if self.top_index is None:
            return jnp.sum(self.acts > 0, axis=-1)
        return jnp.sum(self.top_values > 0, axis=-1)

    def prefix_recons(self, b_dec: jax.Array, selection: jax.Array | None = None) -> jax.Array:
        """[n, batch, d_in]: row j of `selection` [n, n_blocks] (0/1) picks the blocks summed
        into reconstruction j, plus `b_dec`; default: every prefix [0, ends[i])."""
        n_blocks, batch, d_in = self.block_recons.shape
        if selection is None:
            selection = jnp.tril(jnp.ones((n_blocks, n_blocks), self.block_recons.dtype))
        flat = self.block_recons.reshape(n_blocks, batch * d_in)
        return (selection @ flat).reshape(-1, batch, d_in) + b_dec


# ---------------------------------------------------------------------------------------------
# Initialisation


def init_params(key: jax.Array, d_in: int, cfg: SAEConfig) -> Params:
    """Decoder rows are random directions of fixed norm; the encoder starts as W_dec.T."""
    directions = jax.random.normal(key, (cfg.d_sae, d_in), jnp.float32)
    directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
    norm = 1.0 if cfg.decoder_norm == "unit" else cfg.init_decoder_norm
    W_dec = directions * norm
    params = {
        "b_enc": jnp.zeros((cfg.d_sae,), jnp.float32),
        "W_dec": W_dec,
        "b_dec": jnp.zeros((d_in,), jnp.float32),
    }
    if not cfg.tied:
        params["W_enc"] = W_dec.T
    if cfg.activation == "jumprelu":
        params["threshold"] = jnp.full((cfg.d_sae,), cfg.jumprelu_init_threshold, jnp.float32)
    elif cfg.activation == "batchtopk":
        params["threshold"] = jnp.zeros((cfg.d_sae,), jnp.float32)
    return params


def param_names(cfg: SAEConfig) -> list[str]:
    """The parameters an SAE with this config has."""
    names = ["b_enc", "W_dec", "b_dec"] + ([] if cfg.tied else ["W_enc"])
    return names + (["threshold"] if cfg.activation in ("jumprelu", "batchtopk") else [])


def is_trainable(name: str, cfg: SAEConfig) -> bool:
    """Whether the optimiser updates a parameter (the BatchTopK threshold is an EMA instead)."""
    return not (name == "threshold" and cfg.activation == "batchtopk")


# ---------------------------------------------------------------------------------------------
# Encode / decode


def encoder_weight(params: Params) -> jax.Array:
    """[d_in, d_sae] the encoder matrix (W_dec.T for tied SAEs)."""
    return params["W_enc"] if "W_enc" in params else params["W_dec"].T


def pre_activations(params: Params, x: jax.Array) -> jax.Array:
    """[batch, d_sae] = (x - b_dec) @ W_enc + b_enc."""
    return _centred_matmul(x, params["b_dec"], encoder_weight(params)) + params["b_enc"]


@jax.custom_vjp
def _centred_matmul(x: jax.Array, b: jax.Array, W: jax.Array) -> jax.Array:
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


_centred_matmul.defvjp(_centred_matmul_fwd, _centred_matmul_bwd)


def activate(
    params: Params, pre_acts: jax.Array, cfg: SAEConfig, *, train: bool, mesh: Mesh | None = None,
    k: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sparse codes [batch, d_sae] from pre-activations, and the BatchTopK batch threshold.
    `mesh`: the device mesh the step runs on (TopK selects per device). `k`: a traced number
    of active latents (a sweep over sae.k, whose largest value is cfg.k); None: cfg.k."""
    zero = jnp.zeros((), pre_acts.dtype)
    if cfg.activation == "relu":
        return jax.nn.relu(pre_acts), zero
    if cfg.activation == "topk":
        return topk(pre_acts, cfg.k, mesh, live=k), zero
    if cfg.activation == "jumprelu":
        return jumprelu(pre_acts, params["threshold"], cfg.jumprelu_bandwidth), zero
    if cfg.activation == "batchtopk":
        if train:
            return batchtopk(pre_acts, cfg.k if k is None else k)
        # Inference: a fixed per-latent threshold, i.e. a JumpReLU (how BatchTopK exports).
        return jax.nn.relu(pre_acts) * (pre_acts > params["threshold"]), zero
    raise ValueError(f"unknown activation {cfg.activation!r}")


def decode(params: Params, acts: jax.Array) -> jax.Array:
    """[batch, d_in] = acts @ W_dec + b_dec."""
    return acts @ params["W_dec"] + params["b_dec"]


def decode_blocks(params: Params, acts: jax.Array, ends: tuple[int, ...]) -> jax.Array:
    """[len(ends), batch, d_in]: the partial decodes of latent blocks [ends[i-1], ends[i]),
    together one decode's FLOPs. `ends` must finish at d_sae (`forward` ensures it)."""
    if ends[-1] != acts.shape[-1]:
        raise ValueError(f"block ends {ends} must finish at d_sae ({acts.shape[-1]})")
    if len(ends) == 1:
        return (acts @ params["W_dec"])[None]
    return _block_matmuls(acts, params["W_dec"], ends)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _block_matmuls(acts: jax.Array, W_dec: jax.Array, ends: tuple[int, ...]) -> jax.Array:
    starts = (0, *ends[:-1])
    return jnp.stack([acts[:, a:b] @ W_dec[a:b] for a, b in zip(starts, ends, strict=True)])


def _block_matmuls_fwd(acts, W_dec, ends):
    return _block_matmuls(acts, W_dec, ends), (acts, W_dec)


def _block_matmuls_bwd(ends, residuals, d_parts):
    # Written by hand so each gradient is assembled once by concatenation; autodiff of the
    # slices would pad every block's gradient to the full [batch, d_sae] and add them up.
    acts, W_dec = residuals
    starts = (0, *ends[:-1])
    blocks = list(zip(starts, ends, strict=True))
    d_acts = jnp.concatenate([d_parts[g] @ W_dec[a:b].T for g, (a, b) in enumerate(blocks)], 1)
    d_W = jnp.concatenate([acts[:, a:b].T @ d_parts[g] for g, (a, b) in enumerate(blocks)], 0)
    return d_acts, d_W


_block_matmuls.defvjp(_block_matmuls_fwd, _block_matmuls_bwd)


def encode(params: Params, x: jax.Array, cfg: SAEConfig, *, train: bool = False) -> jax.Array:
    """[batch, d_sae] sparse codes of raw inputs."""
    return activate(params, pre_activations(params, x), cfg, train=train)[0]


def forward(
    params: Params,
    x: jax.Array,
    cfg: SAEConfig,
    *,
    train: bool,
    tokens_since_fired: jax.Array | None = None,
    key: jax.Array | None = None,
    prefix_ends: tuple[int, ...] = (),
    mesh: Mesh | None = None,
    k: jax.Array | None = None,
) -> ForwardOutput:
    """Encode and decode once; `prefix_ends` asks for reconstructions of dictionary prefixes;
    `mesh` is the device mesh the step runs on (None: one device); `k` as in `activate`."""
    pre_acts = pre_activations(params, x)
    ends = tuple(sorted({*prefix_ends, cfg.d_sae}))
    top_index = top_values = None
    if uses_sparse_topk(cfg, ends, mesh):
        top_index, top_values = _sparse_topk(params, x, pre_acts, cfg.k, mesh, live=k)
        rows = jnp.arange(x.shape[0])[:, None]
        acts = jnp.zeros_like(pre_acts).at[rows, top_index].set(top_values, unique_indices=True)
        block_recons = _gather_decode(top_values, params["W_dec"], top_index)[None]
        batch_threshold = jnp.zeros((), pre_acts.dtype)
    else:
        acts, batch_threshold = activate(params, pre_acts, cfg, train=train, mesh=mesh, k=k)
        block_recons = decode_blocks(params, acts, ends)
    if tokens_since_fired is None:
        tokens_since_fired = jnp.zeros((cfg.d_sae,), jnp.int32)
    return ForwardOutput(
        x=x,
        pre_acts=pre_acts,
        acts=acts,
        x_hat=jnp.sum(block_recons, axis=0) + params["b_dec"],
        decoder_norms=jnp.linalg.norm(params["W_dec"], axis=1),
        tokens_since_fired=tokens_since_fired,
        batch_threshold=batch_threshold,
        key=jax.random.PRNGKey(0) if key is None else key,
        block_recons=block_recons,
        top_index=top_index,
        top_values=top_values,
        prefix_ends=ends,
        mesh=mesh,
    )


def uses_sparse_topk(cfg: SAEConfig, ends: tuple[int, ...], mesh: Mesh | None) -> bool:
    """TopK with one decode block on an unsharded dictionary takes the sparse path."""
    unsharded = mesh is None or mesh.shape["model"] == 1
    return cfg.activation == "topk" and len(ends) == 1 and unsharded


def _sparse_topk(params: Params, x: jax.Array, pre_acts: jax.Array, k: int,
                 mesh: Mesh | None, live: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The TopK selection of the sparse path: [batch, k] indices (largest first) and values.

    The selection and the values come from the dense pre-activations; the values' gradient
    reaches only the chosen encoder columns (scatter-adds), and `_gather_decode` decodes from
    the chosen decoder rows, so a step costs one dense encoder matmul plus O(batch·k·d_in)
    instead of five dense matmuls. Equal to the dense path (see tests). `live`: keep only the
    first `live` (traced) of the k.
    """
    index = _topk_indices(jax.lax.stop_gradient(pre_acts), k, mesh)  # [batch, k], descending
    values = jax.nn.relu(_take_pre_acts(x, params["b_dec"], encoder_weight(params),
                                        params["b_enc"], jax.lax.stop_gradient(pre_acts), index))
    if live is not None:
        values = values * (jnp.arange(k) < live)
    return index, values


# The gathers and scatters below go one chosen latent (or one chunk of d_in) at a time, so XLA
# fuses each into a pass over [batch, d_in]; the one-shot forms (`W[index]` as a [batch, k,
# d_in] tensor, einsum, one flat scatter) build that tensor first (100M elements at d_in 768,
# k 32, batch 4096) and measured 1.3-5.5x slower on the CPU (benchmarks/sparse_topk_ops.py).
_UNROLL = 8


def _sum_over(n: int, term) -> jax.Array:
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


def _rows_of(W: jax.Array, index: jax.Array) -> jax.Array:
    return W.at[index].get(mode="promise_in_bounds")


def _scatter_rows(shape: tuple[int, int], index: jax.Array, rows) -> jax.Array:
    """[n, d] float32: Σ over j of rows(j) [batch, d] added at rows index[:, j]."""
    def add(j, acc):
        return acc.at[index[:, j]].add(rows(j).astype(jnp.float32), mode="promise_in_bounds")
    return jax.lax.fori_loop(0, index.shape[1], add, jnp.zeros(shape, jnp.float32))


def _dot_rows(g: jax.Array, W: jax.Array, index: jax.Array) -> jax.Array:
    """[batch, k]: g[b] · W[index[b, j]], as a sum over chunks of d_in (16 wide where d_in
    allows) of gathered [batch, k, 16] products: elementwise work XLA fuses, where a reduction
    over d_in of the gathered rows built them first (3.6x slower on the CPU)."""
    d = g.shape[-1]
    width = next(w for w in (16, 8, 4, 2, 1) if d % w == 0)
    g3 = g.reshape(g.shape[0], 1, d // width, width)
    W3 = W.reshape(W.shape[0], d // width, width)
    return _sum_over(d // width, lambda c: g3[:, :, c] * _rows_of(W3[:, c], index)).sum(-1)


@jax.custom_vjp
def _take_pre_acts(x, b_dec, W_enc, b_enc, pre_acts, index):
    """[batch, k] pre_acts[b, index[b, j]], differentiated as
    (x - b_dec) · W_enc[:, index] + b_enc[index]. `pre_acts` must carry no gradient."""
    return jnp.take_along_axis(pre_acts, index, axis=1)


def _take_pre_acts_fwd(x, b_dec, W_enc, b_enc, pre_acts, index):
    return (_take_pre_acts(x, b_dec, W_enc, b_enc, pre_acts, index),
            (x, b_dec, W_enc, pre_acts, index))


def _take_pre_acts_bwd(residuals, g):
    x, b_dec, W_enc, pre_acts, index = residuals
    d_in, d_sae = W_enc.shape
    per_latent = jnp.zeros(d_sae, jnp.float32).at[index].add(g.astype(jnp.float32))
    centred = x - b_dec
    # Rows of W_enc.T are scattered (contiguous), then transposed once.
    d_W_enc = _scatter_rows((d_sae, d_in), index, lambda j: g[:, j, None] * centred).T
    # The input's gradient (unused in training, so dropped by XLA there).
    d_x = _sum_over(index.shape[1], lambda j: g[:, j, None] * _rows_of(W_enc.T, index[:, j]))
    d_b_dec = -(W_enc @ per_latent.astype(W_enc.dtype))
    return (d_x, d_b_dec.astype(b_dec.dtype), d_W_enc.astype(W_enc.dtype),
            per_latent.astype(pre_acts.dtype), jnp.zeros_like(pre_acts), None)


_take_pre_acts.defvjp(_take_pre_acts_fwd, _take_pre_acts_bwd)


@jax.custom_vjp
def _gather_decode(values: jax.Array, W_dec: jax.Array, index: jax.Array) -> jax.Array:
    """[batch, d_in] Σ_j values[b, j] · W_dec[index[b, j]]."""
    return _sum_over(index.shape[1], lambda j: values[:, j, None] * _rows_of(W_dec, index[:, j]))


def _gather_decode_fwd(values, W_dec, index):
    return _gather_decode(values, W_dec, index), (values, W_dec, index)


def _gather_decode_bwd(residuals, g):
    values, W_dec, index = residuals
    d_values = _dot_rows(g, W_dec, index)
    d_W = _scatter_rows(W_dec.shape, index, lambda j: values[:, j, None] * g)
    return d_values.astype(values.dtype), d_W.astype(W_dec.dtype), None


_gather_decode.defvjp(_gather_decode_fwd, _gather_decode_bwd)


def _topk_indices(pre_acts: jax.Array, k: int, mesh: Mesh | None) -> jax.Array:
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

    The row is cut into chunks of 16; the k chunks with the largest maxima hold every one of
    the row's k largest entries (an entry outside them is below k chunk maxima), so a top-k
    over those k·16 candidates is exact. Measured 1.5x faster than one top_k over the row on
    the CPU (d_sae 12288, k 32), where the first stage is a fused max pass and the top_ks are
    small. Rows too short for it (fewer than 2k chunks) take one top_k.
    """
    rows, width = values.shape
    chunks = width // _TOPK_CHUNK
    if width % _TOPK_CHUNK or chunks < 2 * k:
        return _top_k_positions(values, k)
    blocks = values.reshape(rows, chunks, _TOPK_CHUNK)
    best = _top_k_positions(blocks.max(axis=-1), k)  # [rows, k] chunk numbers
    candidates = jnp.take_along_axis(blocks, best[:, :, None], axis=1).reshape(rows, -1)
    position = _top_k_positions(candidates, k)  # [rows, k] into the k·16 candidates
    chunk = jnp.take_along_axis(best, position // _TOPK_CHUNK, axis=1)
    return chunk * _TOPK_CHUNK + position % _TOPK_CHUNK


def _top_k_positions(values: jax.Array, k: int) -> jax.Array:
    # The barrier keeps XLA from folding the consumers' slices into the top_k's sort, which
    # stops it recognising a top-k and leaves a full sort of every row (50x slower). (On the
    # indices alone: a barrier over the (values, indices) tuple crashes XLA's partitioner.)
    return jax.lax.optimization_barrier(jax.lax.top_k(values, k)[1])


# ---------------------------------------------------------------------------------------------
# Activation functions


def topk(pre_acts: jax.Array, k: int, mesh: Mesh | None = None,
         live: jax.Array | None = None) -> jax.Array:
    """Keeps the k largest pre-activations of each row (then ReLU); zeros elsewhere. `live`
    (traced, <= k) keeps that many instead, for sweeps over k.

    On a mesh, each device takes the top k of its own [batch/data, d_sae/model] block; the row's
    threshold is the k-th largest of the model·k candidates gathered along `model`. Exact (a
    global top-k entry is in its block's top k), and no device holds a full row or the whole
    batch (XLA's partitioner would gather the entire operand of a top_k).
    """
    if mesh is None or mesh.size == 1:
        return _topk_block(pre_acts, live, k=k, axis=None)
    spec = PartitionSpec("data", "model")
    if live is None:
        return jax.shard_map(partial(_topk_block, live=None, k=k, axis="model"), mesh=mesh,
                             in_specs=spec, out_specs=spec)(pre_acts)
    return jax.shard_map(partial(_topk_block, k=k, axis="model"), mesh=mesh,
                         in_specs=(spec, PartitionSpec()), out_specs=spec)(pre_acts, live)


def _topk_block(pre_acts: jax.Array, live: jax.Array | None, *, k: int,
                axis: str | None) -> jax.Array:
    candidates = jax.lax.top_k(pre_acts, min(k, pre_acts.shape[-1]))[0]
    if axis is not None:
        candidates = jax.lax.all_gather(candidates, axis, axis=1, tiled=True)
    largest = jax.lax.top_k(candidates, k)[0]
    kth = largest[:, -1:] if live is None else jnp.take(largest, live - 1, axis=1)[:, None]
    return jax.nn.relu(pre_acts) * (pre_acts >= kth)


def batchtopk(pre_acts: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Keeps the batch*k largest positive activations of the whole batch.

    Returns the codes and the threshold (smallest kept value). The threshold is found exactly by
    bisection on the float bits (non-negative floats order like their int32 bit patterns), which
    needs only element-wise compares and global counts: no sort, and it works unchanged when
    the batch or the dictionary is sharded across devices.
    """
    values = jax.nn.relu(pre_acts)
    target = pre_acts.shape[0] * k
    threshold = kth_largest_nonnegative(values, target)
    # Keep strictly positive values at or above the threshold (ties may keep a few more).
    kept = values * (values >= jnp.maximum(threshold, jnp.finfo(values.dtype).tiny))
    return kept, threshold


def kth_largest_nonnegative(values: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry of a non-negative float32 array (0 if fewer than k are positive)."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)

    def body(_, bounds):
        lo, hi = bounds  # invariant: count(bits >= lo) >= k, count(bits >= hi) < k
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, hi = jnp.int32(0), jnp.int32(0x7F800001)  # 0.0 .. just above +inf
    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


@jax.custom_vjp
def jumprelu(pre_acts: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """relu(z) * (z > threshold); the threshold gets a straight-through gradient.

    d/dθ = -(θ / ε) · K((z - θ) / ε) with K the unit rectangle (Rajamanoharan et al., 2024).
    """
    return jax.nn.relu(pre_acts) * (pre_acts > threshold)


def _jumprelu_fwd(pre_acts, threshold, bandwidth):
    return jumprelu(pre_acts, threshold, bandwidth), (pre_acts, threshold, bandwidth)


def _jumprelu_bwd(res, g):
    pre_acts, threshold, bandwidth = res
    passes = (pre_acts > threshold) & (pre_acts > 0)
    d_pre = g * passes
    d_threshold = -(threshold / bandwidth) * _rectangle((pre_acts - threshold) / bandwidth) * g
    return d_pre, jnp.sum(d_threshold, axis=0), None


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step_ste(pre_acts: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """Heaviside H(z - θ) with a straight-through gradient for θ: -(1/ε)·K((z - θ)/ε)."""
    return (pre_acts > threshold).astype(pre_acts.dtype)


def _step_fwd(pre_acts, threshold, bandwidth):
    return step_ste(pre_acts, threshold, bandwidth), (pre_acts, threshold, bandwidth)


def _step_bwd(res, g):
    pre_acts, threshold, bandwidth = res
    d_threshold = -(1.0 / bandwidth) * _rectangle((pre_acts - threshold) / bandwidth) * g
    return jnp.zeros_like(pre_acts), jnp.sum(d_threshold, axis=0), None


step_ste.defvjp(_step_fwd, _step_bwd)


def _rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


# ---------------------------------------------------------------------------------------------
# Constraints applied around the optimiser update


def project_decoder_grad(params: Params, grads: Params, cfg: SAEConfig) -> Params:
    """With unit decoder rows, removes the gradient component parallel to each row."""
    if cfg.decoder_norm != "unit":
        return grads
    W, g = params["W_dec"], grads["W_dec"]
    parallel = jnp.sum(g * W, axis=1, keepdims=True) / jnp.sum(W * W, axis=1, keepdims=True)
    return {**grads, "W_dec": g - parallel * W}


def after_update(params: Params, out: ForwardOutput, step: jax.Array, cfg: SAEConfig) -> Params:
    """Renormalises unit decoder rows and moves the BatchTopK inference threshold."""
    params = dict(params)
    if cfg.decoder_norm == "unit":
        W = params["W_dec"]
        params["W_dec"] = W / jnp.linalg.norm(W, axis=1, keepdims=True)
    if cfg.activation == "batchtopk":
        # Averages the first 1/momentum batches exactly, then becomes an EMA.
        rate = jnp.maximum(cfg.batchtopk_threshold_momentum, 1.0 / (step + 1.0))
        old = params["threshold"]
        params["threshold"] = (1.0 - rate) * old + rate * out.batch_threshold
    return params


def fold_input_scale(params: Params, scale: float) -> Params:
    """Parameters that take raw x for an SAE trained on scale·x: same codes, x̂ in raw units.

    (s·x − b_dec)·W_enc = (x − b_dec/s)·(s·W_enc), and x̂ = (f·W_dec + b_dec)/s, so
    W_enc → s·W_enc, W_dec → W_dec/s, b_dec → b_dec/s (b_enc and thresholds unchanged).
    The result always has W_enc (a tied SAE stops being tied once scaled).
    """
    if scale == 1.0:
        return params
    folded = dict(params)
    folded["W_enc"] = encoder_weight(params) * scale
    folded["W_dec"] = params["W_dec"] / scale
    folded["b_dec"] = params["b_dec"] / scale
    return folded

