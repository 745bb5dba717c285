"""First-order optimality conditions of dictionary learning, measured on a trained SAE
(`jaxsae analyze --optimality`; the derivation is in docs/optimality.md).

The objective is the one dictionary learning solves, in the SAE's own terms: unit decoder
directions d_i = W_dec[i] / |W_dec[i]|, codes a_i = f_i |W_dec[i]| (the SAE's activations in
units of those directions), residuals r = x - x̂, and

    L = (1/N) Σ_n |r_n|² + λ (1/N) Σ_n Σ_i a_ni.

λ is the sparsity weight the codes themselves imply (for an active code the L1 problem's
stationarity says 2 r·d_i = λ, so λ = 2 Σ a r·d / Σ a over the active codes), or one given.
At a local optimum no small change of the dictionary may lower L to first order. Two families
of changes are measured:

- per latent, turning d_i on the unit sphere: the tangent gradient -(2/N) P⊥ Σ_n a_ni r_n must
  vanish. Reported as the angle by which one exact least-squares refit of d_i (codes fixed)
  would turn it, and as z = |P⊥ Σ a r| / sqrt(Σ a² |P⊥ r|²) (about 1 when what is left is
  noise; the latent is called stationary below 2);
- per co-firing pair (i, j), "i absorbs j": d_i turns towards d_j (by ε along
  u = (d_j - c d_i) / s, c = d_i·d_j, s = sqrt(1 - c²)); on tokens where both fire the codes
  compensate exactly (a_j -= ε a_i / s, a_i += ε a_i c / s: the reconstruction is unchanged,
  the L1 term changes by λ ε a_i (c - 1) / s < 0); where j is silent its code cannot go
  negative, so the reconstruction moves by ε a_i u (the squared error changes by
  -2 ε a_i r·u). The first-order change per ε, times N, is

      D(i←j) = λ (c - 1)/s · Σ_both a_i  -  2 Σ_i-alone a_i r·u

  and a local optimum needs D >= 0. If i never fires without j (i a child of j), the second
  sum is empty and D < 0 for any λ > 0: such a pair is never a local optimum (it must split
  into exclusive latents or absorb). If they never fire together, D is the stationarity of
  d_i towards d_j, ~0 at a stationary point: mutually exclusive latents are stable.

A nearby optimum balances a descent D < 0 by tilting d_i towards d_j by δ* (the tilt at
which the move's first-order gain is used up: docs/optimality.md). A pair is stable when
neither latent has to lean further than MAX_TILT (10°) either way; `margin` is MAX_TILT minus
the larger of the two tilts, in degrees (negative: unstable; -80 for a pure hierarchy).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import sae
from jaxsae.config import SAEConfig
from jaxsae.errors import refuse_past_float32

STATIONARY_Z = 2.0
"""A latent is stationary when its z (systematic over noise) is below this."""
MAX_TILT = 10.0
"""Degrees: a pair is stable when neither latent has to lean further than this towards the
other to balance the absorption move (a nearby local optimum can hold both)."""


@partial(jax.jit, static_argnames="cfg")
def _block(params, x, cfg: SAEConfig):
    """Codes of unit directions a [B, n], r·d [B, n], and the per-latent sums of one block."""
    f = sae.encode(params, x, cfg)
    norms = jnp.linalg.norm(params["W_dec"], axis=1)
    unit = params["W_dec"] / jnp.maximum(norms, 1e-12)[:, None]
    a = f * norms
    r = x - sae.decode(params, f, x)
    rd = r @ unit.T
    a2 = a * a
    sums = {"fires": jnp.sum(a > 0, 0), "a": jnp.sum(a, 0), "a2": jnp.sum(a2, 0),
            "g": a.T @ r, "a2_r2": a2.T @ jnp.sum(r * r, 1), "a2_rd2": jnp.sum(a2 * rd * rd, 0),
            "a_rd": jnp.sum(a * rd, 0)}
    return a, rd, sums


class _PairSums:
    """Per directed pair (i absorbs j), sums over the tokens where i fires."""

    NAMES = ("both", "alone", "alone2", "alone_u")

    def __init__(self, i: np.ndarray, j: np.ndarray, cos: np.ndarray):
        self.i, self.j, self.cos = i, j, cos
        self.sin = np.sqrt(np.maximum(1.0 - cos * cos, 1e-12))
        self.sums = {k: np.zeros(len(i)) for k in self.NAMES}

    def add(self, a: np.ndarray, rd: np.ndarray) -> None:
        from scipy.sparse import csc_matrix

        codes = csc_matrix(a)
        start, stop = codes.indptr[self.i], codes.indptr[self.i + 1]
        counts = stop - start
        pair = np.repeat(np.arange(len(self.i)), counts)
        # the positions of column i's entries, pair by pair
        offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        entry = np.repeat(start, counts) + offset
        token, a_i = codes.indices[entry], codes.data[entry]
        j, i = self.j[pair], self.i[pair]
        both = a[token, j] > 0
        r_u = (rd[token, j] - self.cos[pair] * rd[token, i]) / self.sin[pair]
        alone = ~both
        n = len(self.i)
        for name, w in (("both", a_i * both), ("alone", a_i * alone),
                        ("alone2", a_i * a_i * alone), ("alone_u", a_i * r_u * alone)):
            self.sums[name] += np.bincount(pair, weights=w, minlength=n)

    def conditions(self, lam: float) -> dict[str, np.ndarray]:
        """D (the first-order change, times N, of "i absorbs j") and the balancing tilt: the
        angle d_i would have to lean further towards d_j for D to reach 0 (leaning by δ
        adds 2 δ Σ_alone a_i² to D): 0 when D >= 0, 90° when nothing can balance it."""
        s = self.sums
        change = lam * (self.cos - 1.0) / self.sin * s["both"] - 2.0 * s["alone_u"]
        need = np.where(change < 0, -change, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            tilt = np.where(need == 0, 0.0, np.arctan(need / (2.0 * s["alone2"])))
        total = s["both"] + s["alone"]
        return {"D": change, "tilt": np.degrees(np.nan_to_num(tilt, nan=np.pi / 2)),
                "share_with_other": np.where(total > 0, s["both"] / np.maximum(total, 1e-30),
                                             0.0)}


def optimality(params: dict[str, Any], cfg: SAEConfig, blocks: Iterable[np.ndarray],
               pairs: np.ndarray, *, sparsity_weight: float | None = None,
               max_tilt: float = MAX_TILT, data: str = "the data", out: Any = None
               ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(optimality_latents rows, optimality rows, summary) of the SAE `params` on `blocks` of
    raw tokens, for the candidate `pairs` [m, 2] (co-firing latents; each tested both ways).
    `sparsity_weight`: the λ of the objective (None: implied by the codes). Sums past
    float32's range are refused, naming `data` (and `out`, the output not written)."""
    params = jax.tree.map(jnp.asarray, params)
    W = np.asarray(params["W_dec"], np.float64)
    unit = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    cos = np.einsum("pd,pd->p", unit[pairs[:, 0]], unit[pairs[:, 1]])
    directed = _PairSums(np.concatenate([pairs[:, 0], pairs[:, 1]]),
                         np.concatenate([pairs[:, 1], pairs[:, 0]]), np.concatenate([cos, cos]))
    sums: dict[str, np.ndarray] = {}
    n_tokens = 0
    for x in blocks:
        a, rd, s = _block(params, jnp.asarray(x, jnp.float32), cfg)
        for k, v in jax.device_get(s).items():
            sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
        if len(pairs):
            directed.add(np.asarray(a), np.asarray(rd))
        n_tokens += len(x)
    # (fault testing: data of norm 1e10 made a2_r2 inf, its noise inf - inf, and every latent
    # "stationary")
    refuse_past_float32({**sums, **directed.sums}, data, "the tokens or the SAE's codes are "
                        "too large to test the optimality conditions", out=out)
    # (None where nothing was measured: no latent fired; fault testing found 0.0 reported)
    implied = (2.0 * sums["a_rd"].sum() / sums["a"].sum()) if sums["a"].sum() > 0 else None
    lam = (None if implied is None else max(implied, 0.0)) if sparsity_weight is None \
        else sparsity_weight

    # per latent: stationarity of the decoder direction
    g = sums["g"]
    along = np.einsum("nd,nd->n", g, unit)
    across = np.sqrt(np.maximum(np.einsum("nd,nd->n", g, g) - along * along, 0.0))
    angle = np.degrees(np.arctan2(across, sums["a2"] + along))
    noise = np.sqrt(np.maximum(sums["a2_r2"] - sums["a2_rd2"], 0.0))
    z = np.where(noise > 0, across / np.maximum(noise, 1e-30), 0.0)
    alive = sums["fires"] > 0
    stationary = alive & (z < STATIONARY_Z)

    m = len(pairs)
    cond = directed.conditions(0.0 if lam is None else lam)  # (no pairs without firing)
    tilt_ab, tilt_ba = cond["tilt"][:m], cond["tilt"][m:]
    worst = np.maximum(tilt_ab, tilt_ba)
    stable = worst <= max_tilt
    unstable_of = np.bincount(pairs[~stable].ravel(), minlength=len(W)) if m else \
        np.zeros(len(W), np.int64)
    latent_rows = [{
        "latent": k, "fires": int(sums["fires"][k]),
        "lambda": float(2.0 * sums["a_rd"][k] / sums["a"][k]) if alive[k] else None,
        "refit_angle_deg": float(angle[k]) if alive[k] else None,
        "stationarity_z": float(z[k]), "stationary": int(stationary[k]),
        "unstable_pairs": int(unstable_of[k])} for k in range(len(W))]
    pair_rows = [{
        "latent_a": int(pairs[p, 0]), "latent_b": int(pairs[p, 1]), "stable": int(stable[p]),
        "margin": float(max_tilt - worst[p]), "decoder_cos": float(cos[p]),
        "tilt_a_absorbs_b": float(tilt_ab[p]), "tilt_b_absorbs_a": float(tilt_ba[p]),
        "a_share_with_b": float(cond["share_with_other"][p]),
        "b_share_with_a": float(cond["share_with_other"][m + p])} for p in range(m)]
    summary = {
        "optimality_tokens": n_tokens,
        "optimality_lambda": None if lam is None else float(lam),
        "optimality_lambda_implied": None if implied is None else float(implied),
        "stationary_fraction": (float(stationary.sum() / alive.sum()) if alive.any()
                                else None),
        "median_refit_angle_deg": float(np.median(angle[alive])) if alive.any() else None,
        "pairs_tested": m, "pairs_unstable": int(m - stable.sum()),
        "optimality_max_tilt_deg": max_tilt}
    return latent_rows, pair_rows, summary


def plot(latent_rows: list[dict], pair_rows: list[dict], out) -> None:
    """optimality.png: each pair's margin against its decoder cosine (unstable in red), and
    the latents' refit angles."""
    from jaxsae.outputs import hist_range, save_figure, subplots

    fig, axes = subplots(1, 2, figsize=(11, 3.8), dpi=100)
    if pair_rows:
        cos = np.array([r["decoder_cos"] for r in pair_rows])
        margin = np.array([r["margin"] for r in pair_rows])
        bad = np.array([not r["stable"] for r in pair_rows])
        axes[0].scatter(cos[~bad], margin[~bad], s=6, color="C0", label="stable")
        axes[0].scatter(cos[bad], margin[bad], s=6, color="C3", label="unstable")
        axes[0].legend(fontsize=8)
    axes[0].set_xlabel("decoder cosine of the pair")
    axes[0].set_ylabel("margin (degrees; < 0: unstable)")
    axes[0].set_title(f"{len(pair_rows)} co-firing pairs", fontsize=9)
    angles = [r["refit_angle_deg"] for r in latent_rows if r["fires"] > 0]
    axes[1].hist(angles, bins=50, range=hist_range(angles), color="C1")
    axes[1].set_xlabel("refit angle of the decoder direction (degrees; 0: stationary)")
    axes[1].set_ylabel("latents")
    save_figure(fig, out / "optimality.png")
