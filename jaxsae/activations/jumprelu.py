"""JumpReLU (Rajamanoharan et al., 2024): f = relu(z) · 1[z > θ], θ learned through a
straight-through estimator of width `sae.jumprelu_bandwidth`; SAELens `jumprelu`.

θ is kept ≥ 0 (set to 0 after an update that takes it below; SAELens learns log θ): below 0
the output would not change (relu(z) is 0 there) while the L0 penalties, which count z > θ,
would count latents that never fire, and the threshold's pseudo-derivative −θ/ε would flip
its sign. (Fault testing: a target_l0 above what the pre-activations allowed drove θ below 0
and "met" its target with latents that never fired.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae import kernels
from jaxsae.activations import Activation, Codes, _number, register


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
    d_threshold = -(threshold / bandwidth) * kernels.rectangle((pre_acts - threshold)
                                                               / bandwidth) * g
    return d_pre, jnp.sum(d_threshold, axis=0), None


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@register
class JumpReLU(Activation):
    name = "jumprelu"
    architecture = "jumprelu"
    has_threshold = True
    learns_threshold = True

    def own_params(self, cfg, d_in):
        return {**super().own_params(cfg, d_in),
                "threshold": jnp.full((cfg.d_sae,), cfg.jumprelu_init_threshold, jnp.float32)}

    def saelens_loss(self, saelens):
        l0: dict = {"term": "l0", "coefficient": _number(saelens, "l0_coefficient")}
        mode = saelens.get("jumprelu_sparsity_loss_mode")
        if mode == "tanh":
            l0["mode"] = "tanh"
        elif mode == "quadratic":  # (without a target, the config is refused naming it)
            l0["mode"] = "quadratic"
            if saelens.get("target_l0") is not None:
                l0["target_l0"] = _number(saelens, "target_l0", 0.0)
        if saelens.get("jumprelu_bandwidth") is not None:
            l0["bandwidth"] = _number(saelens, "jumprelu_bandwidth", 0.001)
        return [{"term": "mse"}, l0]

    def export_cfg(self, cfg):
        # SAELens's training field, which `config_from_saelens` reads back (fault testing: an
        # import of jaxsae's own export fine-tuned at the default width, not the one trained)
        return {"jumprelu_bandwidth": cfg.jumprelu_bandwidth}

    def config_from_saelens(self, cfg_json):
        details = cfg_json.get("metadata", {}).get("training_architecture_details") or {}
        fields = {**details, **cfg_json}
        if fields.get("jumprelu_bandwidth") is not None:
            return {"jumprelu_bandwidth": _number(fields, "jumprelu_bandwidth", 0.001)}
        return {}

    def after_update(self, params, codes, step, cfg):
        return {**params, "threshold": jnp.maximum(params["threshold"], 0.0)}

    def activate(self, params, x, pre_acts, cfg, *, train, mesh=None, k=None, sparse=False,
                 sweep_axis=None):
        acts = jumprelu(pre_acts, params["threshold"], cfg.jumprelu_bandwidth)
        return Codes(acts=acts, batch_threshold=jnp.zeros((), pre_acts.dtype))
