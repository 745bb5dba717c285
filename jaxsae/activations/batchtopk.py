"""BatchTopK (Bussmann et al., 2024): in training the batch·k largest activations of the whole
batch; at inference relu(z) · 1[z > θ] with θ a running average of the smallest kept value,
i.e. a JumpReLU, which is how it exports."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae import kernels
from jaxsae.activations import Activation, Codes, register


def batchtopk(pre_acts: jax.Array, k: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keeps the batch*k largest positive activations of the whole batch.

    Returns the codes and the threshold (smallest kept value). The threshold is found exactly by
    bisection on the float bits (non-negative floats order like their int32 bit patterns), which
    needs only element-wise compares and global counts: no sort, and it works unchanged when
    the batch or the dictionary is sharded across devices.
    """
    values = jax.nn.relu(pre_acts)
    target = pre_acts.shape[0] * k
    threshold = kernels.kth_largest_nonnegative(values, target)
    # Keep strictly positive values at or above the threshold (ties may keep a few more).
    kept = values * (values >= jnp.maximum(threshold, jnp.finfo(values.dtype).tiny))
    return kept, threshold


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

    def activate(self, params, x, pre_acts, cfg, *, train, mesh=None, k=None, sparse=False):
        if train:
            acts, threshold = batchtopk(pre_acts, cfg.k if k is None else k)
            return Codes(acts=acts, batch_threshold=threshold)
        # Inference: a fixed per-latent threshold, i.e. a JumpReLU (how BatchTopK exports).
        acts = jax.nn.relu(pre_acts) * (pre_acts > params["threshold"])
        return Codes(acts=acts, batch_threshold=jnp.zeros((), pre_acts.dtype))

    def saelens_loss(self, saelens):
        return [{"term": "mse"}, {"term": "auxk", "coefficient": 1 / 32}]  # as TopK's

    def after_update(self, params, codes, step, cfg):
        # The inference threshold averages the first 1/momentum batches exactly, then becomes
        # an EMA of the smallest kept activation.
        rate = jnp.maximum(cfg.batchtopk_threshold_momentum, 1.0 / (step + 1.0))
        threshold = (1.0 - rate) * params["threshold"] + rate * codes.batch_threshold
        return {**params, "threshold": threshold}
