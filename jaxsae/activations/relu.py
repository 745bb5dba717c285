"""ReLU: f = relu((x − b_dec) · W_enc + b_enc); SAELens `standard`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae.activations import Activation, Codes, register


@register
class ReLU(Activation):
    name = "relu"
    architecture = "standard"

    def activate(self, params, x, pre_acts, cfg, *, train, mesh=None, k=None, sparse=False,
                 sweep_axis=None):
        return Codes(acts=jax.nn.relu(pre_acts), batch_threshold=jnp.zeros((), pre_acts.dtype))
