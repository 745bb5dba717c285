"""TopK (Gao et al., 2024): the k largest pre-activations of each token, ReLU'd; SAELens
`topk`.

Training takes the sparse path: after the dense encoder matmul an exact two-stage top-k picks
the k latents, and the values' gradient reaches only their encoder columns
(`kernels.take_pre_acts`); the decode then sums only their decoder rows
(`kernels.gather_decode`, or with nested prefix losses `kernels.scatter_decode`, in
`jaxsae.sae.forward`). On a dictionary split over `model` each device does this for its own
latents (`_sparse_topk_split`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxsae import kernels
from jaxsae.activations import Activation, Codes, encoder_weight, register
from jaxsae.errors import ConfigError


def topk(pre_acts: jax.Array, k: int, mesh: Mesh | None = None,
         live: jax.Array | None = None) -> jax.Array:
    """Keeps the k largest pre-activations of each row (then ReLU); zeros elsewhere. `live`
    (traced, <= k) keeps that many instead, for sweeps over k.

    Exactly k a row, ties at the k-th value too (`_kept`). On a mesh, each device takes the top
    k of its own [batch/data, d_sae/model] block; the row's k-th largest is found among the
    model·k candidates gathered along `model`. Exact (a global top-k entry is in its block's
    top k), and no device holds a full row or the whole batch (XLA's partitioner would gather
    the entire operand of a top_k).
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
    # The block's k largest, largest first, by the kernels' selection (on the CPU a
    # lax.top_k over a wide row whose output is sliced runs as a full sort: 11 s against
    # 0.07 s at [1024, 65536], k 64, measured 2026-12-03).
    index = kernels.top_k_indices(jax.lax.stop_gradient(pre_acts), min(k, pre_acts.shape[-1]))
    own = jnp.take_along_axis(pre_acts, index, axis=1)
    values = jax.nn.relu(own) * _kept(jax.lax.stop_gradient(own), k, live, axis)
    rows = jnp.arange(pre_acts.shape[0])[:, None]
    return jnp.zeros_like(pre_acts).at[rows, index].set(values, unique_indices=True)


def _kept(own: jax.Array, k: int, live: jax.Array | None, axis: str | None) -> jax.Array:
    """Which of a block's candidates (`own`: [rows, k'] its largest, largest first) are among
    the row's k (or `live`) largest: exactly that many a row, ties at the k-th value included
    (a threshold `>= k-th` kept every tied latent: more than k codes, fault testing). On a
    dictionary split over `axis`, the rows' candidates are gathered along it; the tied entries
    a row still needs go to the devices in order, and on each to its first."""
    n = k if live is None else live
    if axis is None:
        return jnp.arange(own.shape[1]) < n
    candidates = jax.lax.all_gather(own, axis, axis=1, tiled=True)  # [rows, devices·k']
    largest = jax.lax.top_k(candidates, k)[0]
    kth = largest[:, -1:] if live is None else jnp.take(largest, live - 1, axis=1)[:, None]
    ties = own == kth
    per_device = (candidates == kth).reshape(own.shape[0], -1, own.shape[1]).sum(-1)
    before = jnp.cumsum(per_device, axis=1) - per_device  # ties on the devices before each
    me = jax.lax.axis_index(axis)
    wanted = n - (candidates > kth).sum(1) - before[:, me]  # ties this device still gives
    rank = jnp.cumsum(ties, axis=1) - 1  # this device's ties, first to last
    return (own > kth) | (ties & (rank < wanted[:, None]))


def sparse_topk(params: dict[str, jax.Array], x: jax.Array, pre_acts: jax.Array, k: int,
                mesh: Mesh | None, live: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """The TopK selection of the sparse path: [batch, k] indices (largest first) and values.

    The selection and the values come from the dense pre-activations; the values' gradient
    reaches only the chosen encoder columns (scatter-adds), so with `kernels.gather_decode` a
    step costs one dense encoder matmul plus O(batch·k·d_in) instead of five dense matmuls.
    Equal to the dense path (see tests). `live`: keep only the first `live` (traced) of the k.
    On a dictionary split over `model`, see `_sparse_topk_split`.
    """
    if mesh is not None and mesh.shape["model"] > 1:
        return _sparse_topk_split(params, x, pre_acts, k, mesh, live)
    index = kernels.topk_indices(jax.lax.stop_gradient(pre_acts), k, mesh)  # [batch, k]
    values = jax.nn.relu(kernels.take_pre_acts(
        x, params["b_dec"], encoder_weight(params), params["b_enc"],
        jax.lax.stop_gradient(pre_acts), index))
    if live is not None:
        values = values * (jnp.arange(k) < live)
    return index, values


@register
class TopK(Activation):
    name = "topk"
    architecture = "topk"
    has_k = True
    per_latent = False

    def activate(self, params, x, pre_acts, cfg, *, train, mesh=None, k=None, sparse=False,
                 sweep_axis=None):
        zero = jnp.zeros((), pre_acts.dtype)
        if not sparse:
            return Codes(acts=topk(pre_acts, cfg.k, mesh, live=k), batch_threshold=zero)
        index, values = sparse_topk(params, x, pre_acts, cfg.k, mesh, live=k)
        rows = jnp.arange(x.shape[0])[:, None]
        acts = jnp.zeros_like(pre_acts).at[rows, index].set(values, unique_indices=True)
        return Codes(acts=acts, batch_threshold=zero, top_index=index, top_values=values)

    def saelens_loss(self, saelens):
        # jaxsae's auxk is normalised as in Gao et al. (2024): their 1/32 carries over.
        return [{"term": "mse"}, {"term": "auxk", "coefficient": 1 / 32}]

    def export_cfg(self, cfg):
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}

    def config_from_saelens(self, cfg_json):
        return {"k": cfg_json["k"]}

    def check_saelens_cfg(self, cfg_json, file) -> None:
        if "k" not in cfg_json:
            raise ConfigError(f"{file}: missing 'k' (a topk SAE keeps the k largest latents)")
        k = cfg_json["k"]
        if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= cfg_json["d_sae"]:
            raise ConfigError(f"{file}: 'k' must be an integer in 1..d_sae "
                              f"({cfg_json['d_sae']}), got {k!r}")
        if not isinstance(cfg_json.get("rescale_acts_by_decoder_norm", False), bool):
            raise ConfigError(f"{file}: 'rescale_acts_by_decoder_norm' must be true or false, "
                              f"got {cfg_json['rescale_acts_by_decoder_norm']!r}")


def _sparse_topk_split(params: dict[str, jax.Array], x: jax.Array, pre_acts: jax.Array, k: int,
                       mesh: Mesh, live: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The sparse TopK selection on a dictionary split over `model`: each device takes the k
    largest of its own block of latents, the row's k-th largest is found among the model·k
    candidates gathered along `model` (as the dense `topk` does), and each device keeps those
    of its candidates that are among the row's k (`_kept`). Returns [batch, model·k] global
    indices and values (0 for the candidates not kept), laid out [data, model] so that each
    device's entries are its own latents: their values, gradients and decode
    (`jaxsae.sae.sparse_decode`) stay on it. (check_vma off: see `sparse_decode`.)"""
    split = PartitionSpec("data", "model")

    def select(x, b_dec, W_enc, b_enc, pre_acts, live):
        width = pre_acts.shape[1]
        index = kernels.top_k_indices(pre_acts, min(k, width))  # this block's own
        own = jnp.take_along_axis(pre_acts, index, axis=1)
        values = jax.nn.relu(kernels.take_pre_acts(x, b_dec, W_enc, b_enc, pre_acts, index))
        return (index + jax.lax.axis_index("model") * width,
                values * _kept(own, k, live, "model"))

    args = (x, params["b_dec"], encoder_weight(params), params["b_enc"],
            jax.lax.stop_gradient(pre_acts))
    specs = (PartitionSpec("data", None), PartitionSpec(), PartitionSpec(None, "model"),
             PartitionSpec("model"), split)
    if live is None:
        return jax.shard_map(partial(select, live=None), mesh=mesh, in_specs=specs,
                             out_specs=(split, split), check_vma=False)(*args)
    return jax.shard_map(select, mesh=mesh, in_specs=(*specs, PartitionSpec()),
                         out_specs=(split, split), check_vma=False)(*args, live)
