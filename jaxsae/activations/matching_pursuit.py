"""Matching pursuit SAE; SAELens `matching_pursuit`. No encoder: `sae.k` greedy steps, each
picking the decoder row most correlated with what is left of the input,

    r ← x − b_dec;   k times:   j = argmax_i relu(r · d_i),   v = relu(r · d_j),
                                f_j ← f_j + v,   r ← r − v · d_j

and x̂ = f · W_dec + b_dec. The selection carries no gradient; the values and the residual
updates do, so W_dec and b_dec learn through all k steps. Decoder rows must keep unit norm
(`sae.decoder_norm: unit`) for r · d to be a correlation. Exports with `max_iterations = k`,
`residual_threshold = 0` and `stop_on_duplicate_support = false`, so SAELens runs the same k
steps; SAELens files that stop earlier are refused (jaxsae would not give their codes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae import kernels
from jaxsae.activations import Activation, Codes, register
from jaxsae.errors import ConfigError


def pursue(W_dec: jax.Array, centred: jax.Array, steps: int,
           live: jax.Array | None = None) -> jax.Array:
    """[batch, d_sae] the codes of `steps` matching-pursuit steps on `centred` [batch, d_in]
    (x − b_dec); `live` (traced, <= steps): only the first `live` steps count (sweeps over k)."""
    W_dec, rows = jnp.asarray(W_dec), jnp.arange(centred.shape[0])

    def step(i, carry):
        acts, residual = carry
        scores = jax.nn.relu(jax.lax.stop_gradient(residual) @ jax.lax.stop_gradient(W_dec).T)
        chosen = jnp.argmax(scores, axis=1)
        atom = W_dec[chosen]  # [batch, d_in]
        value = jax.nn.relu(jnp.sum(residual * atom, axis=-1))
        if live is not None:
            value = value * (i < live)
        return acts.at[rows, chosen].add(value), residual - value[:, None] * atom

    zeros = jnp.zeros((centred.shape[0], W_dec.shape[0]), centred.dtype)
    return jax.lax.fori_loop(0, steps, step, (zeros, centred))[0]


@register
class MatchingPursuit(Activation):
    name = "matching_pursuit"
    architecture = "matching_pursuit"
    has_k = True
    has_encoder = False
    scale_invariant = False
    per_latent = False

    def own_params(self, cfg, d_in):
        return {}

    def own_param_names(self, cfg):
        return []

    def pre_activations(self, params, x):
        """[batch, d_sae] the first step's correlations (x − b_dec) · W_decᵀ."""
        return kernels.centred_matmul(x, params["b_dec"], params["W_dec"].T)

    def activate(self, params, x, pre_acts, cfg, *, train, mesh=None, k=None, sparse=False,
                 sweep_axis=None):
        acts = pursue(params["W_dec"], x - params["b_dec"], cfg.k, live=k)
        return Codes(acts=acts, batch_threshold=jnp.zeros((), acts.dtype))

    def export_tensors(self, params):
        return {}

    def tensor_shapes(self, d_in, d_sae):
        return {}

    def export_cfg(self, cfg):
        return {"max_iterations": cfg.k, "residual_threshold": 0.0,
                "stop_on_duplicate_support": False}

    def check_saelens_cfg(self, cfg_json, file):
        steps = cfg_json.get("max_iterations")
        if steps is None:
            steps = cfg_json["d_in"]  # SAELens's default
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"{file}: 'max_iterations' must be a positive integer, got "
                              f"{steps!r}")
        if cfg_json.get("residual_threshold", 1e-2) != 0 or \
                cfg_json.get("stop_on_duplicate_support", True):
            raise ConfigError(f"{file}: jaxsae runs exactly max_iterations steps; it reads "
                              "matching_pursuit SAEs with residual_threshold 0 and "
                              "stop_on_duplicate_support false only")

    def config_from_saelens(self, cfg_json):
        steps = cfg_json.get("max_iterations")
        return {"k": steps if steps is not None else cfg_json["d_in"]}

    def saelens_loss(self, saelens):
        return [{"term": "mse"}]

    def check(self, cfg):
        if cfg.tied:  # (fault testing: it trained, and the export recorded a tied SAE)
            raise ConfigError("sae.tied: matching_pursuit has no encoder to tie to the decoder "
                              "(its codes come from the decoder rows already)")
        if cfg.decoder_norm != "unit":
            raise ConfigError("sae.decoder_norm: matching_pursuit needs unit decoder rows (its "
                              "selection compares correlations), got free")
