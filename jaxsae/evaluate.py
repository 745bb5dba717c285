"""Evaluation of a dictionary: reconstruction metrics on tokens, recovery of known features.

Reconstruction (over every evaluated token):
  l0                  mean number of active latents per token
  mse                 mean over tokens of ‖x̂ − x‖²
  explained_variance  1 − Σ‖x̂ − x‖² / Σ‖x − mean(x)‖²
  dead_fraction       fraction of latents that never fire on these tokens
  firing_frequency    per latent, fraction of tokens on which it fires
Ground truth (decoder rows vs true directions, by |cosine|):
  mcc                 mean |cos| over a one-to-one (Hungarian) matching
  mmcs                mean over true features of the best |cos| of any latent
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxsae import sae
from jaxsae.config import SAEConfig


@partial(jax.jit, static_argnames="cfg")
def _batch_sums(params: sae.Params, x: jax.Array, cfg: SAEConfig) -> dict[str, jax.Array]:
    acts = sae.encode(params, x, cfg, train=False)
    x_hat = sae.decode(params, acts)
    fired = acts > 0
    return {
        "sse": jnp.sum(jnp.square(x_hat - x)),
        "sum_x": jnp.sum(x, axis=0),
        "sum_sq": jnp.sum(jnp.square(x)),
        "active": jnp.sum(fired),
        "fires": jnp.sum(fired, axis=0, dtype=jnp.int32),
    }


def reconstruction_metrics(
    params: sae.Params, cfg: SAEConfig, blocks: Iterable[np.ndarray]
) -> dict[str, float | np.ndarray]:
    """Metrics over all tokens of `blocks` (arrays [n, d_in]); exact sums, not batch averages."""
    n = 0
    sse = sum_sq = active = 0.0
    sum_x = fires = None
    for block in blocks:
        s = jax.device_get(_batch_sums(params, jnp.asarray(block), cfg))
        n += len(block)
        sse += float(s["sse"])
        sum_sq += float(s["sum_sq"])
        active += float(s["active"])
        sum_x = s["sum_x"].astype(np.float64) + (0 if sum_x is None else sum_x)
        fires = s["fires"].astype(np.int64) + (0 if fires is None else fires)
    if n == 0:
        raise ValueError("no tokens to evaluate")
    total_var = sum_sq - float(np.sum(sum_x**2)) / n
    frequency = fires / n
    return {
        "tokens": n,
        "l0": active / n,
        "mse": sse / n,
        "explained_variance": 1.0 - sse / max(total_var, 1e-30),
        "dead_fraction": float(np.mean(fires == 0)),
        "firing_frequency": frequency,
    }


def log10_firing(frequency: np.ndarray) -> np.ndarray:
    """SAELens's sparsity convention: log10(frequency + 1e-10)."""
    return np.log10(np.asarray(frequency, np.float64) + 1e-10).astype(np.float32)


def cosine_matrix(directions: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    """[n_true, d_sae] |cos| between true directions [n_true, d] and decoder rows [d_sae, d]."""
    a = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    b = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    return np.abs(a.astype(np.float64) @ b.astype(np.float64).T)


def feature_recovery(directions: np.ndarray, decoder: np.ndarray) -> dict[str, float]:
    """mcc (Hungarian one-to-one matching, mean |cos| over matched pairs) and mmcs."""
    cos = cosine_matrix(directions, decoder)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return {"mcc": float(cos[rows, cols].mean()), "mmcs": float(cos.max(axis=1).mean())}
