"""Gated SAE (Rajamanoharan et al., 2024); SAELens `gated`. A gate decides which latents fire,
a magnitude path that shares W_enc decides how much:

    π = (x − b_dec) · W_enc + b_gate
    f = 1[π > 0] · relu((x − b_dec) · W_enc · exp(r_mag) + b_mag)

The step 1[π > 0] has no gradient, so the gate learns from what acts on relu(π): sparsity
penalties (`l1`, `group_l1_l2` read `ForwardOutput.penalized_acts`) and the `gated_aux` loss
term, which reconstructs x from relu(π) through the frozen decoder. Loss:
`[{term: mse}, {term: l1}, {term: gated_aux}]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae import kernels
from jaxsae.activations import Activation, Codes, _number, encoder_weight, register

GATES = ("b_gate", "r_mag", "b_mag")


@register
class Gated(Activation):
    name = "gated"
    architecture = "gated"
    has_gate = True

    def own_params(self, cfg, d_in):
        return {name: jnp.zeros((cfg.d_sae,), jnp.float32) for name in GATES}

    def own_param_names(self, cfg):
        return list(GATES)

    def pre_activations(self, params, x):
        """[batch, d_sae] the gate's pre-activations π."""
        return kernels.encoder_matmul(x, params["b_dec"], encoder_weight(params),
                                      params["b_gate"])

    def activate(self, params, x, pre_acts, cfg, *, train, mesh=None, k=None, sparse=False,
                 sweep_axis=None):
        # (x − b_dec) · W_enc is π − b_gate: the magnitude path costs no second matmul.
        magnitude = (pre_acts - params["b_gate"]) * jnp.exp(params["r_mag"]) + params["b_mag"]
        acts = (pre_acts > 0) * jax.nn.relu(magnitude)
        return Codes(acts=acts, batch_threshold=jnp.zeros((), pre_acts.dtype),
                     penalized=jax.nn.relu(pre_acts))

    def export_tensors(self, params):
        return {name: params[name] for name in GATES}

    def tensor_shapes(self, d_in, d_sae):
        return {name: (d_sae,) for name in GATES}

    def saelens_loss(self, saelens):
        return [{"term": "mse"}, {"term": "l1", "coefficient": _number(saelens, "l1_coefficient")},
                {"term": "gated_aux"}]
