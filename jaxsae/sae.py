"""SAE parameters, initialisation, encode / decode, and the one forward pass of training.

Parameters are a dict pytree in SAELens orientation, so export is a copy: W_dec [d_sae, d_in],
b_dec [d_in], W_enc [d_in, d_sae] (absent when tied: the encoder is W_dec.T), plus what the
activation adds (`jaxsae.activations`: b_enc, threshold, the gates of a Gated SAE, ...).

The input is centred by the decoder bias before encoding (SAELens `apply_b_dec_to_input`):
  pre_acts = (x - b_dec) @ W_enc + b_enc,   x_hat = acts @ W_dec + b_dec.

A transcoder (`cfg.transcoder`) maps x [d_in] to a target y [d_out]: W_dec is [d_sae, d_out],
b_dec [d_out], the encoder reads x uncentred (pre_acts = x @ W_enc + b_enc, as SAELens's
transcoders), and a skip transcoder (`cfg.skip`) adds W_skip [d_out, d_in] (SAELens's
orientation): y_hat = acts @ W_dec + b_dec + x @ W_skip.T.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxsae import activations, kernels
from jaxsae.activations import encoder_weight
from jaxsae.config import SAEConfig

Params = dict[str, jax.Array]

__all__ = ["ForwardOutput", "Params", "encoder_weight"]


@flax.struct.dataclass
class ForwardOutput:
    """Everything the forward pass computed, for the loss terms (none re-encodes or re-decodes)."""

    x: jax.Array
    """[batch, d_in] input."""
    target: jax.Array
    """[batch, d_out] what x_hat reconstructs: x itself, or a transcoder's target."""
    pre_acts: jax.Array
    """[batch, d_sae] encoder pre-activations."""
    acts: jax.Array
    """[batch, d_sae] latent activations (sparse codes). On a sparse path they are
    assembled from `top_index` / `top_values` only if something reads them."""
    x_hat: jax.Array
    """[batch, d_out] reconstruction of `target`."""
    decoder_norms: jax.Array
    """[d_sae] L2 norm of each decoder row."""
    tokens_since_fired: jax.Array
    """[d_sae] tokens since each latent last fired, before this batch (from the train state)."""
    batch_threshold: jax.Array
    """[] BatchTopK: the smallest activation kept in this batch (0 for other activations)."""
    key: jax.Array
    """This step's random key (fold_in(state.rng, step)), for terms that sample."""
    block_recons: jax.Array
    """[n_blocks, batch, d_out] the decode split by latent blocks [ends[i-1], ends[i]) (no
    bias); their sum plus `offset` is x_hat. Terms build prefix reconstructions from them."""
    offset: jax.Array
    """What x_hat adds to the decode: b_dec [d_out], or with a skip transcoder's bypass
    b_dec + x @ W_skip.T [batch, d_out]."""
    penalized: jax.Array | None = None
    """[batch, d_sae] what sparsity penalties act on when it is not `acts` (Gated: the
    rectified gate pre-activations); use `penalized_acts`."""
    top_index: jax.Array | None = None
    """[batch, k] a sparse path's chosen latents (None on the dense paths); with `top_rows`,
    [n, m] entries of any tokens (BatchTopK)."""
    top_values: jax.Array | None = None
    """Their activations (0 for padding entries)."""
    top_rows: jax.Array | None = None
    """The token of each entry (None: entry [b, j] belongs to token b)."""
    transcoder: bool = flax.struct.field(pytree_node=False, default=False)
    """Whether the dictionary is a transcoder (the encoder reads x uncentred)."""
    prefix_ends: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    """Static ends of the latent blocks, increasing, the last = d_sae."""
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)
    """The device mesh the step runs on (for per-device top-k selections); None: one device."""
    sweep_axis: str | None = flax.struct.field(pytree_node=False, default=None)
    """The vmap axis name when the step trains a sweep (None: one SAE). A term that skips work
    with lax.cond must decide over all SAEs (a per-SAE predicate turns cond into select)."""

    @property
    def penalized_acts(self) -> jax.Array:
        """[batch, d_sae] the activations sparsity penalties act on."""
        return self.acts if self.penalized is None else self.penalized

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
        if self.top_rows is None:
            return jnp.sum(self.top_values > 0, axis=-1)
        active = (self.top_values > 0).astype(jnp.int32)
        return jnp.zeros(self.x.shape[0], jnp.int32).at[self.top_rows].add(active)

    def prefix_recons(self, selection: jax.Array | None = None) -> jax.Array:
        """[n, batch, d_out]: row j of `selection` [n, n_blocks] (0/1) picks the blocks summed
        into reconstruction j, plus `offset`; default: every prefix [0, ends[i])."""
        n_blocks, batch, d_out = self.block_recons.shape
        if selection is None:
            selection = jnp.tril(jnp.ones((n_blocks, n_blocks), self.block_recons.dtype))
        flat = self.block_recons.reshape(n_blocks, batch * d_out)
        return (selection @ flat).reshape(-1, batch, d_out) + self.offset


# ---------------------------------------------------------------------------------------------
# Initialisation


def init_params(key: jax.Array, d_in: int, cfg: SAEConfig, d_out: int | None = None,
                input_norm: float | None = None) -> Params:
    """Decoder rows are random directions of fixed norm; the encoder starts as W_dec.T (a
    transcoder's, whose decoder rows live in another space: its own random directions of the
    same norm, and W_skip at zero); the activation adds (and initialises) its own parameters.
    `d_out`: a transcoder's target width (default d_in). `input_norm`: the typical norm of
    the inputs the encoder reads (after normalisation), which `sae.init_l0` needs (None:
    sqrt(d_in), inputs normalised to E|x|^2 = d_in)."""
    kind = activations.get(cfg.activation)
    d_out = d_in if d_out is None else d_out
    norm = 1.0 if cfg.decoder_norm == "unit" else cfg.init_decoder_norm
    W_dec = _unit_rows(key, cfg.d_sae, d_out) * norm
    params = {"W_dec": W_dec, "b_dec": jnp.zeros((d_out,), jnp.float32)}
    if kind.has_encoder and not cfg.tied:
        params["W_enc"] = (_unit_rows(jax.random.fold_in(key, 1), cfg.d_sae, d_in) * norm).T \
            if cfg.transcoder else W_dec.T
    if cfg.skip:
        params["W_skip"] = jnp.zeros((d_out, d_in), jnp.float32)
    own = kind.own_params(cfg, d_in)
    l0 = initial_l0(cfg, d_in)
    if l0 is not None:
        own["b_enc"] = jnp.full_like(own["b_enc"], initial_bias(cfg, l0, d_in, norm, input_norm))
    return {**own, **params}


def initial_l0(cfg: SAEConfig, d_in: int) -> float | None:
    """How many latents `sae.init_l0` has fire at first (None: the encoder bias starts at 0).
    `auto`: with unit decoder rows on a ReLU, d_in, at most d_sae / 2 (a dictionary less than
    twice as wide as its input overshoots nothing from a bias of 0; l0 = d_in would make every
    latent fire on every token where d_in >= d_sae, and add a bias term about the input's size
    to the reconstruction: a review); otherwise none."""
    if cfg.init_l0 is None or (cfg.init_l0 == "auto" and not (
            cfg.activation == "relu" and cfg.decoder_norm == "unit")):
        return None
    return min(d_in, cfg.d_sae / 2) if cfg.init_l0 == "auto" else cfg.init_l0


def initial_bias(cfg: SAEConfig, l0: float, d_in: int, row_norm: float,
                 input_norm: float | None) -> float:
    """The encoder bias at which about `l0` latents fire on an input of norm
    `input_norm`: a random encoder direction of norm `row_norm` gives a pre-activation of
    about N(0, (row_norm · input_norm)² / d_in), so a bias of -Φ⁻¹(1 - l0 / d_sae) times that
    spread leaves l0 / d_sae of them above 0. With `auto` (l0 = d_in) and unit rows, the
    first reconstruction's part along x is d_sae · E[(z - t)⁺ z] / d_in = d_sae · P(z > t) /
    d_in = 1 times x (z standard normal)."""
    if input_norm is None:  # (inputs normalised to E|x|^2 = d_in, the default)
        input_norm = math.sqrt(d_in)
    fraction = min(l0 / cfg.d_sae, 1 - 1e-6)
    spread = row_norm * input_norm / math.sqrt(d_in)
    return -statistics.NormalDist().inv_cdf(1 - fraction) * spread


def _unit_rows(key: jax.Array, n: int, d: int) -> jax.Array:
    directions = jax.random.normal(key, (n, d), jnp.float32)
    return directions / jnp.linalg.norm(directions, axis=1, keepdims=True)


def param_names(cfg: SAEConfig) -> list[str]:
    """The parameters an SAE with this config has."""
    kind = activations.get(cfg.activation)
    names = [*kind.own_param_names(cfg), "W_dec", "b_dec"]
    return (names + (["W_enc"] if kind.has_encoder and not cfg.tied else [])
            + (["W_skip"] if cfg.skip else []))


def is_trainable(name: str, cfg: SAEConfig) -> bool:
    """Whether the optimiser updates a parameter (the BatchTopK threshold is an EMA instead)."""
    return activations.get(cfg.activation).trainable(name)


# ---------------------------------------------------------------------------------------------
# Encode / decode


def pre_activations(params: Params, x: jax.Array, cfg: SAEConfig | None = None) -> jax.Array:
    """[batch, d_sae] the activation's pre-activations ((x - b_dec) @ W_enc + b_enc for all
    but a few; `cfg` None: that form)."""
    kind = activations.get(cfg.activation if cfg is not None else "relu")
    return kind.pre_activations(coding_params(params, x, cfg is not None and cfg.transcoder), x)


def coding_params(params: Params, x: jax.Array, transcoder: bool) -> Params:
    """The parameters the encoder reads: a transcoder's b_dec is in the target's space, so its
    encoder sees a zero centring (a constant: no gradient reaches b_dec through it)."""
    if not transcoder:
        return params
    return {**params, "b_dec": jnp.zeros(x.shape[-1], params["b_dec"].dtype)}


def decode(params: Params, acts: jax.Array, x: jax.Array | None = None) -> jax.Array:
    """[batch, d_out] = acts @ W_dec + b_dec (+ x @ W_skip.T for a skip transcoder, whose
    input `x` it then needs)."""
    out = acts @ params["W_dec"] + params["b_dec"]
    if "W_skip" in params:
        out = out + x @ params["W_skip"].T
    return out


def decode_blocks(params: Params, acts: jax.Array, ends: tuple[int, ...]) -> jax.Array:
    """[len(ends), batch, d_in]: the partial decodes of latent blocks [ends[i-1], ends[i]),
    together one decode's FLOPs. `ends` must finish at d_sae (`forward` ensures it)."""
    if ends[-1] != acts.shape[-1]:
        raise ValueError(f"block ends {ends} must finish at d_sae ({acts.shape[-1]})")
    if len(ends) == 1:
        return (acts @ params["W_dec"])[None]
    return kernels.block_matmuls(acts, params["W_dec"], ends)


def encode(params: Params, x: jax.Array, cfg: SAEConfig, *, train: bool = False) -> jax.Array:
    """[batch, d_sae] sparse codes of raw inputs x [batch, d_in] (one input [d_in]: its codes
    [d_sae]; fault testing found the first call a user makes after load_sae failing deep
    inside)."""
    if jnp.ndim(x) == 1:
        return encode(params, jnp.asarray(x)[None], cfg, train=train)[0]
    kind = activations.get(cfg.activation)
    coding = coding_params(params, x, cfg.transcoder)
    return kind.activate(coding, x, kind.pre_activations(coding, x), cfg, train=train).acts


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
    sweep_axis: str | None = None,
    sparse: bool = True,
    target: jax.Array | None = None,
) -> ForwardOutput:
    """Encode and decode once; `target`: what a transcoder reconstructs (default: x itself);
    `prefix_ends` asks for reconstructions of dictionary prefixes;
    `mesh` is the device mesh the step runs on (None: one device); `k` a traced number of
    active latents (a sweep over sae.k, whose largest value is cfg.k); `sweep_axis` the vmap
    axis of a sweep's SAEs. `sparse`: False keeps every activation on its dense path (the
    reference the sparse paths are tested against)."""
    kind = activations.get(cfg.activation)
    coding = coding_params(params, x, cfg.transcoder)
    pre_acts = kind.pre_activations(coding, x)
    ends = tuple(sorted({*prefix_ends, cfg.d_sae}))
    codes = kind.activate(coding, x, pre_acts, cfg, train=train, mesh=mesh, k=k,
                          sparse=sparse, sweep_axis=sweep_axis)
    if codes.top_index is not None:  # a sparse path: decode only the chosen rows
        block_recons = sparse_decode(params["W_dec"], codes, ends, x.shape[0], mesh)
    else:
        block_recons = decode_blocks(params, codes.acts, ends)
    if tokens_since_fired is None:
        tokens_since_fired = jnp.zeros((cfg.d_sae,), jnp.int32)
    offset = params["b_dec"]
    if "W_skip" in params:
        offset = offset + x @ params["W_skip"].T
    return ForwardOutput(
        x=x,
        target=x if target is None else target,
        pre_acts=pre_acts,
        acts=codes.acts,
        x_hat=jnp.sum(block_recons, axis=0) + offset,
        offset=offset,
        decoder_norms=row_norms(params["W_dec"]),
        tokens_since_fired=tokens_since_fired,
        batch_threshold=codes.batch_threshold,
        key=jax.random.PRNGKey(0) if key is None else key,
        block_recons=block_recons,
        penalized=codes.penalized,
        top_index=codes.top_index,
        top_values=codes.top_values,
        top_rows=codes.top_rows,
        transcoder=cfg.transcoder,
        prefix_ends=ends,
        mesh=mesh,
        sweep_axis=sweep_axis,
    )


def sparse_decode(W_dec: jax.Array, codes: activations.Codes, ends: tuple[int, ...],
                  batch: int, mesh: Mesh | None = None) -> jax.Array:
    """[len(ends), batch, d_in] the block decodes (as `decode_blocks`) of sparse codes, from
    their decoder rows alone. One block of k latents per token: a gathered sum per token
    (`kernels.gather_decode`); otherwise each entry is scatter-added into the row of its token
    in its latent's block (`kernels.scatter_decode`), all blocks in one pass. On a dictionary
    split over `model`, each device decodes its own entries from its own rows of W_dec
    ([batch, model·k] codes laid out [data, model], as TopK's split selection gives them, or
    [data, model, slots] lists with their rows, as BatchTopK's) and the partial decodes are
    summed over `model`."""
    if mesh is not None and mesh.shape["model"] > 1:
        rows_here = batch // mesh.shape["data"]

        def local(values, index, W_dec, rows=None):
            own = index - jax.lax.axis_index("model") * W_dec.shape[0]
            if rows is not None:  # (a device's list: [1, 1, slots], its rows global)
                values, own, index = values[0], own[0], index[0]
                rows = rows[0] - jax.lax.axis_index("data") * rows_here
            # (summed over `model` in float32, then rounded once: in bfloat16 each device's
            # part was rounded before the sum; fault testing)
            part = _decode_entries(W_dec, values, own, index, rows, ends, rows_here,
                                   dtype=jnp.float32)
            return jax.lax.psum(part, "model").astype(values.dtype)

        # check_vma off: the custom VJPs' gradients of a device's rows are sums over its part
        # of the batch; shard_map adds them up over `data` (what the type check would refuse).
        codes_spec = PartitionSpec("data", "model", *([None] * (codes.top_index.ndim - 2)))
        specs = (codes_spec, codes_spec, PartitionSpec("model"))
        args = (codes.top_values, codes.top_index, W_dec)
        if codes.top_rows is not None:
            specs, args = (*specs, codes_spec), (*args, codes.top_rows)
        return jax.shard_map(local, mesh=mesh, in_specs=specs,
                             out_specs=PartitionSpec(None, "data"), check_vma=False)(*args)
    return _decode_entries(W_dec, codes.top_values, codes.top_index, codes.top_index,
                           codes.top_rows, ends, batch)


def _decode_entries(W_dec: jax.Array, values: jax.Array, index: jax.Array, latent: jax.Array,
                    rows: jax.Array | None, ends: tuple[int, ...], batch: int,
                    dtype=None) -> jax.Array:
    """sparse_decode on one device: `index` the rows of W_dec, `latent` the latents (the
    same, unless W_dec is a device's block of the dictionary), `rows` each entry's token;
    in `dtype` (default: the values')."""
    dtype = values.dtype if dtype is None else dtype
    if rows is None and len(ends) == 1:
        return kernels.gather_decode(values, W_dec, index)[None].astype(dtype)
    if rows is None:
        rows = jnp.broadcast_to(jnp.arange(batch, dtype=index.dtype)[:, None], index.shape)
    if len(ends) > 1:  # the block of latent i: the first end above i
        block = jnp.searchsorted(jnp.asarray(ends, latent.dtype), latent, side="right")
        rows = rows + batch * block.astype(index.dtype)
    recons = kernels.scatter_decode(values, W_dec, index, rows, len(ends) * batch)
    return recons.reshape(len(ends), batch, W_dec.shape[1]).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Constraints applied around the optimiser update


def holding(params: Params, frozen: Sequence[str]) -> Params:
    """`params` with the `frozen` ones held: no gradient flows to them (XLA then drops the
    matmuls that would compute it)."""
    return {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}


def project_decoder_grad(params: Params, grads: Params, cfg: SAEConfig) -> Params:
    """With unit decoder rows, removes the gradient component parallel to each row."""
    if cfg.decoder_norm != "unit":
        return grads
    W, g = params["W_dec"], grads["W_dec"]
    parallel = jnp.sum(g * W, axis=1, keepdims=True) / jnp.sum(W * W, axis=1, keepdims=True)
    return {**grads, "W_dec": g - parallel * W}


def after_update(params: Params, out: ForwardOutput, step: jax.Array, cfg: SAEConfig) -> Params:
    """Renormalises unit decoder rows, then what the activation does after an update (e.g. the
    BatchTopK inference threshold)."""
    params = dict(params)
    if cfg.decoder_norm == "unit":
        W = params["W_dec"]
        params["W_dec"] = W / jnp.linalg.norm(W, axis=1, keepdims=True)
    codes = activations.Codes(acts=out.acts, batch_threshold=out.batch_threshold,
                              penalized=out.penalized)
    return activations.get(cfg.activation).after_update(params, codes, step, cfg)


def fold_input_scale(params: Params, scale: float, target_scale: float | None = None
                     ) -> Params:
    """Parameters that take raw x for an SAE trained on scale·x: same codes, x̂ in raw units.

    (s·x − b_dec)·W_enc = (x − b_dec/s)·(s·W_enc), and x̂ = (f·W_dec + b_dec)/s, so
    W_enc → s·W_enc, W_dec → W_dec/s, b_dec → b_dec/s (b_enc and thresholds unchanged).
    The result always has W_enc (a tied SAE stops being tied once scaled).

    A transcoder trained on s·x → t·y (`target_scale` t; its encoder reads x uncentred):
    W_enc → s·W_enc, W_dec → W_dec/t, b_dec → b_dec/t, W_skip → W_skip·s/t.
    """
    t = scale if target_scale is None else target_scale
    if scale == 1.0 and t == 1.0:
        return params
    folded = dict(params)
    folded["W_enc"] = encoder_weight(params) * scale
    folded["W_dec"] = params["W_dec"] / t
    folded["b_dec"] = params["b_dec"] / t
    if "W_skip" in params:
        folded["W_skip"] = params["W_skip"] * (scale / t)
    return folded


def row_norms(W: jax.Array) -> jax.Array:
    """Each row's Euclidean norm, as jnp.linalg.norm computes it, with a gradient of 0 at a
    row of zeros, where jnp.linalg.norm's is NaN (fault testing: a start with a zero decoder
    row stopped at step 1 on a NaN gradient of the L1 weighted by the rows' norms)."""
    squares = jnp.sum(W * W, axis=1)
    some = squares > 0
    return jnp.where(some, jnp.sqrt(jnp.where(some, squares, 1.0)), 0.0)


def unit_band(stored_dtype: Any = np.float32) -> float:
    """How far from 1 a unit row's norm may read after storage in `stored_dtype` (bfloat16
    moves it by up to half its epsilon, 0.004; float32 by ~1e-7): `unit_rows`' tolerance."""
    return max(1e-3, float(ml_dtypes.finfo(stored_dtype).eps)) + 1e-5


def unit_rows(W_dec: np.ndarray, stored_dtype: Any = np.float32) -> bool:
    """Whether every row of W_dec has norm 1, up to the rounding of the dtype it was stored in
    (`unit_band`)."""
    return bool(np.all(np.abs(np.linalg.norm(W_dec, axis=1) - 1.0) <= unit_band(stored_dtype)))
