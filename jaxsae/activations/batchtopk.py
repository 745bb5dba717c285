"""BatchTopK (Bussmann et al., 2024): in training the batch·k largest activations of the whole
batch; at inference relu(z) · 1[z > θ] with θ a running average of the smallest kept value,
i.e. a JumpReLU, which is how it exports.

Training takes a sparse path: the kept activations are found with one pass over the batch
(chunk maxima, in `kernels.batch_top_k_entries`), and, as on TopK's path, only their encoder
columns and decoder rows are touched (`kernels.take_pre_acts`, `kernels.scatter_decode` in
`jaxsae.sae.forward`). A token's number of latents varies, so the codes are a flat list of
(token, latent, value) entries rather than k per token. On a dictionary split over `model`
the batch threshold is a bisection in which each device counts its own block, and each device
lists its own kept entries (`_sparse_split`): their values, gradients and decode stay on it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsae import kernels
from jaxsae.activations import Activation, Codes, encoder_weight, register


def batchtopk(pre_acts: jax.Array, k: int | jax.Array, *, sweep_axis: str | None = None,
              mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """Keeps the batch*k largest positive activations of the whole batch (all positive ones
    when fewer are; exactly batch*k otherwise, ties at the threshold taken in row-major order).
    `sweep_axis`: the vmap axis of a sweep's SAEs, if any (the tie cut runs when one needs it).
    `mesh`: the array is split over its devices ("data", "model"), each of which counts its
    own block (flattening the whole array moved it between them).

    Returns the codes and the threshold (the smallest kept value; 0 when nothing is kept). The
    batch·k-th largest value is found exactly by
    bisection on the float bits (non-negative floats order like their int32 bit patterns), which
    needs only element-wise compares and global counts: no sort, and it works unchanged when
    the batch or the dictionary is sharded across devices.
    """
    values = jax.nn.relu(pre_acts)
    target = pre_acts.shape[0] * k
    if mesh is None:
        threshold, reaching = kernels.kth_largest_and_count(values, target)
    else:
        split = PartitionSpec("data", "model")
        threshold, reaching = jax.shard_map(
            partial(kernels.kth_largest_and_count, across=("data", "model")), mesh=mesh,
            in_specs=(split, PartitionSpec()), out_specs=(PartitionSpec(), PartitionSpec()),
            check_vma=False)(values, jnp.asarray(target, jnp.int32))
    # Strictly positive values at or above the threshold, exactly batch·k of them (ties at
    # the threshold are kept in row-major order until there are); all of them when fewer
    # than batch·k are positive (threshold 0: then `reaching` counts the zeros too).
    tiny = jnp.finfo(jnp.float32).tiny
    floor = jnp.maximum(threshold, tiny).astype(values.dtype)
    reaching = jnp.where(threshold >= tiny, reaching, 0)
    kept = values * kernels.keep_largest(values, floor, target, reaching,
                                         sweep_axis=sweep_axis)
    return kept, smallest_kept(threshold, kept)


def smallest_kept(threshold: jax.Array, kept: jax.Array) -> jax.Array:
    """The smallest kept value of a batch: `threshold`, the batch·k-th largest value, when it
    is positive (batch·k were kept); else, fewer being positive, the smallest positive value
    of `kept` (every kept value, zeros elsewhere), 0 when there is none. (Fault testing: the
    0 of such a batch went into the inference threshold's average as if a latent had been kept
    at 0, SAELens and Bussmann et al. averaging the smallest kept value only.)"""
    positive = jnp.min(jnp.where(kept > 0, kept, jnp.inf))
    fewer = jnp.where(jnp.isfinite(positive), positive, 0).astype(threshold.dtype)
    return jnp.where(threshold > 0, threshold, fewer)


@register
class BatchTopK(Activation):
    name = "batchtopk"
    architecture = "jumprelu"
    reads = False
    has_k = True
    has_threshold = True
    per_latent = False

    def own_params(self, cfg, d_in):
        return {**super().own_params(cfg, d_in),
                "threshold": jnp.zeros((cfg.d_sae,), jnp.float32)}

    def activate(self, params, x, pre_acts, cfg, *, train, mesh=None, k=None, sparse=False,
                 sweep_axis=None):
        if not train:
            # Inference: a fixed per-latent threshold, i.e. a JumpReLU (how BatchTopK exports).
            acts = jax.nn.relu(pre_acts) * (pre_acts > params["threshold"])
            return Codes(acts=acts, batch_threshold=jnp.zeros((), pre_acts.dtype))
        live = cfg.k if k is None else k
        if not sparse:
            acts, threshold = batchtopk(pre_acts, live, sweep_axis=sweep_axis)
            return Codes(acts=acts, batch_threshold=threshold)
        if mesh is not None and mesh.shape["model"] > 1:
            index, values, row, threshold = _sparse_split(params, x, pre_acts, cfg.k, live,
                                                          mesh, sweep_axis=sweep_axis)
        else:
            index, values, row, threshold = sparse_batchtopk(params, x, pre_acts, cfg.k, live,
                                                             sweep_axis=sweep_axis)
        acts = jnp.zeros_like(pre_acts).at[row, index].add(values)  # padding adds 0
        return Codes(acts=acts, batch_threshold=threshold.astype(pre_acts.dtype),
                     top_index=index, top_values=values, top_rows=row)

    def saelens_loss(self, saelens):
        return [{"term": "mse"}, {"term": "auxk", "coefficient": 1 / 32}]  # as TopK's

    def after_update(self, params, codes, step, cfg):
        # The inference threshold averages the first 1/momentum batches exactly, then becomes
        # an EMA of the smallest kept activation; a batch that kept nothing (no positive
        # pre-activation) has none and leaves it as it was.
        rate = jnp.maximum(cfg.batchtopk_threshold_momentum, 1.0 / (step + 1.0))
        # (a θ still at its start, 0, has averaged no batch yet: the first that keeps
        # something sets it, also after batches that kept nothing; review)
        rate = jnp.where(jnp.all(params["threshold"] == 0), 1.0, rate)
        threshold = (1.0 - rate) * params["threshold"] + rate * codes.batch_threshold
        threshold = jnp.where(codes.batch_threshold > 0, threshold, params["threshold"])
        return {**params, "threshold": threshold}


def sparse_batchtopk(params: dict[str, jax.Array], x: jax.Array, pre_acts: jax.Array, k: int,
                     live: int | jax.Array, *, sweep_axis: str | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """BatchTopK's codes on the sparse path: (latent, value, row) [batch, k] entries, the
    batch's batch·live largest activations (padding, when live < k or fewer are positive, has
    value 0), and the threshold. Entry (i, j) is number
    j·batch + i of the row-ordered list, so each column is a run of consecutive tokens."""
    batch = pre_acts.shape[0]
    row, index, valid, threshold = kernels.batch_top_k_entries(
        jax.lax.stop_gradient(pre_acts), live, slots=batch * k, sweep_axis=sweep_axis)
    row, index, valid = (a.reshape(k, batch).T for a in (row, index, valid))
    values = jax.nn.relu(kernels.take_pre_acts(
        x, params["b_dec"], encoder_weight(params), params["b_enc"],
        jax.lax.stop_gradient(pre_acts), index, row))
    # (the kept pre-activations as the dense path sees them: the same threshold to the bit)
    kept = jax.nn.relu(jax.lax.stop_gradient(pre_acts)[row, index]) * valid
    return index, values * valid, row, smallest_kept(threshold, kept)


def _sparse_split(params: dict[str, jax.Array], x: jax.Array, pre_acts: jax.Array, k: int,
                  live: int | jax.Array, mesh: Mesh, *, sweep_axis: str | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """BatchTopK's sparse codes on a dictionary split over `model`: the kept entries are
    the dense path's (`batchtopk` on the mesh: a bisection in which each device counts its own
    block, then the tie cut, partitioned by XLA; no device gathers a row or the batch), then
    each device
    lists its own in row-major order, as many as its block can hold of the batch's batch·k:
    (latent, value, row) [data, model, slots] with global latents and rows (padding: value
    0), so that their values, gradients and decode (`jaxsae.sae.sparse_decode`) stay on the
    device. A token keeps any number of latents on any device, and the list never overflows.
    (check_vma off: see `sparse_decode`.)"""
    blocks = NamedSharding(mesh, PartitionSpec("data", "model"))
    pre = jax.lax.with_sharding_constraint(jax.lax.stop_gradient(pre_acts), blocks)
    kept, threshold = batchtopk(pre, live, sweep_axis=sweep_axis, mesh=mesh)
    kept = jax.lax.with_sharding_constraint(kept, blocks)
    batch, d_sae = pre_acts.shape
    rows_here, width = batch // mesh.shape["data"], d_sae // mesh.shape["model"]
    slots = min(batch * k, rows_here * width)

    def select(kept, x, b_dec, W_enc, b_enc, pre_acts):
        position, count = kernels.first_true((kept > 0).reshape(-1), slots)
        row, index = (position // width)[None], (position % width)[None]
        values = jax.nn.relu(kernels.take_pre_acts(x, b_dec, W_enc, b_enc, pre_acts, index,
                                                   row)) * (jnp.arange(slots) < count)
        return ((index + jax.lax.axis_index("model") * width)[None], values[None],
                (row + jax.lax.axis_index("data") * rows_here)[None])

    split, listed = PartitionSpec("data", "model"), PartitionSpec("data", "model", None)
    index, values, row = jax.shard_map(
        select, mesh=mesh,
        in_specs=(split, PartitionSpec("data", None), PartitionSpec(),
                  PartitionSpec(None, "model"), PartitionSpec("model"), split),
        out_specs=(listed, listed, listed), check_vma=False)(
        kept, x, params["b_dec"], encoder_weight(params), params["b_enc"], pre)
    return index, values, row, threshold
