"""Evaluation of a dictionary: reconstruction metrics on tokens, recovery of known features.

Reconstruction (over every evaluated token; for a transcoder, x is its target):
  l0                  mean number of active latents per token
  mse                 mean over tokens of ‖x̂ − x‖²
  explained_variance  1 − Σ‖x̂ − x‖² / Σ‖x − mean(x)‖² (null where the tokens do not vary)
  dead_fraction       fraction of latents that never fire on these tokens
  firing_frequency    per latent, fraction of tokens on which it fires
Ground truth (decoder rows vs true directions, by |cosine|):
  mcc                 mean |cos| over a one-to-one (Hungarian) matching
  mmcs                mean over true features of the best |cos| of any latent
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxsae import sae
from jaxsae.config import SAEConfig
from jaxsae.errors import DataError, JaxsaeError


@partial(jax.jit, static_argnames="cfg")
def _batch_sums(params: sae.Params, x: jax.Array, target: jax.Array, cfg: SAEConfig
                ) -> dict[str, jax.Array]:
    return sums_of_codes(params, sae.encode(params, x, cfg, train=False), x, target)


def sums_of_codes(params: sae.Params, acts: jax.Array, x: jax.Array, target: jax.Array
                  ) -> dict[str, jax.Array]:
    """A block's sums for `ReconstructionSums.add_sums`, given its codes `acts` (traced: a
    caller that needs the codes for more than these sums encodes once)."""
    x_hat = sae.decode(params, acts, x)
    fired = acts > 0
    # the squares are summed in units of 2^exponent, the block's largest |error| for the
    # errors and its largest |value| for the values (exact: powers of two), then put back in
    # float64 (`ReconstructionSums`): float32 squares of activations near 1e19 overflowed (a
    # healthy run was reported diverged) and those near 1e-20 underflowed to 0 (an mse of 0,
    # variance "undefined"); one unit for both, an error 1e20 times the values underflowed
    # the values' squares (explained variance null, or 9 % off; fault testing)
    error = x_hat - target
    _, error_exponent = jnp.frexp(jnp.max(jnp.abs(error)))
    _, exponent = jnp.frexp(jnp.max(jnp.abs(target)))
    return {
        "sse": jnp.sum(jnp.square(error * jnp.ldexp(jnp.ones((), error.dtype), -error_exponent))),
        "sum_x": jnp.sum(target, axis=0),
        "sum_sq": jnp.sum(jnp.square(target * jnp.ldexp(jnp.ones((), target.dtype), -exponent))),
        "error_exponent": error_exponent,
        "exponent": exponent,
        "active": jnp.sum(fired),
        "fires": jnp.sum(fired, axis=0, dtype=jnp.int32),
    }


def bar_label(passes: int) -> str:
    """The evaluation bar's label: its count is tokens read over every pass (fault testing:
    "8.19k/8.19k tok" for 4,096 tokens read twice, with a truth, read as twice the tokens)."""
    return "evaluate" if passes == 1 else f"evaluate ({passes} passes over the tokens)"


class ReconstructionSums:
    """The running sums of `reconstruction_metrics` for one SAE; several SAEs evaluated on the
    same tokens each get one, and every block is read (and put on the device) once."""

    def __init__(self, params: sae.Params, cfg: SAEConfig) -> None:
        self.params, self.cfg = params, cfg
        self.n = 0
        self.sse = self.sum_sq = self.active = 0.0
        self.sum_x: np.ndarray | None = None
        self.fires: np.ndarray | None = None

    def add(self, x: jax.Array, target: jax.Array | None = None) -> None:
        """Adds a block [n, d_in] (on the device), and a transcoder's targets [n, d_out]."""
        self.add_sums(_batch_sums(self.params, x, x if target is None else target, self.cfg),
                      x.shape[0])

    def add_sums(self, sums: dict[str, jax.Array], n: int) -> None:
        """Adds the `sums_of_codes` of a block of `n` tokens."""
        s = jax.device_get(sums)
        self.n += n
        # (float64; float32's exponents: -148..128)
        self.sse += float(s["sse"]) * 4.0 ** int(s["error_exponent"])
        self.sum_sq += float(s["sum_sq"]) * 4.0 ** int(s["exponent"])
        self.active += float(s["active"])
        self.sum_x = s["sum_x"].astype(np.float64) + (0 if self.sum_x is None else self.sum_x)
        self.fires = s["fires"].astype(np.int64) + (0 if self.fires is None else self.fires)

    def result(self) -> dict[str, float | np.ndarray]:
        n = self.n
        if n == 0:
            raise ValueError("no tokens to evaluate")
        total_var = self.sum_sq - float(np.sum(self.sum_x**2)) / n
        frequency = self.fires / n
        return {
            "tokens": n,
            "l0": self.active / n,
            "mse": self.sse / n,
            "explained_variance": explained_variance(self.sse, total_var, self.sum_sq),
            "dead_fraction": float(np.mean(self.fires == 0)),
            "firing_frequency": frequency,
        }


def explained_variance(sse: float, total_var: float, sum_sq: float) -> float:
    """1 − sse / total_var; NaN (written as null) where the tokens have no variance to
    explain: total_var at the rounding error of computing it as Σ‖x‖² − ‖Σx‖²/n (constant
    or all-zero tokens), where any ratio would be a number nobody measured."""
    if not total_var > 1e-6 * sum_sq:
        return float("nan")
    return 1.0 - sse / total_var


def reconstruction_metrics(
    params: sae.Params, cfg: SAEConfig, blocks: Iterable[np.ndarray], d_in: int | None = None
) -> dict[str, float | np.ndarray]:
    """Metrics over all tokens of `blocks` (arrays [n, d_in]; a transcoder's: [n, d_in +
    d_out] pairs, split after column `d_in`); exact sums, not batch averages."""
    sums = ReconstructionSums(params, cfg)
    for block in blocks:
        block = jnp.asarray(block)
        if d_in is not None and block.shape[1] > d_in:
            sums.add(block[:, :d_in], block[:, d_in:])
        else:
            sums.add(block)
    return sums.result()


def log10_firing(frequency: np.ndarray) -> np.ndarray:
    """SAELens's sparsity convention: log10(frequency + 1e-10)."""
    return np.log10(np.asarray(frequency, np.float64) + 1e-10).astype(np.float32)


def cosine_matrix(directions: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    """[n_true, d_sae] |cos| between true directions [n_true, d] and decoder rows [d_sae, d]."""
    # normalised in float64 and clipped: float32 rows gave |cos| 1 + 7e-9 for a row equal to
    # a true direction, and an mcc above 1 (fault testing)
    a, b = (np.asarray(m, np.float64) for m in (directions, decoder))
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.minimum(np.abs(a @ b.T), 1.0)


def feature_recovery(directions: np.ndarray, decoder: np.ndarray) -> dict[str, float]:
    """mcc (Hungarian one-to-one matching, mean |cos| over matched pairs) and mmcs."""
    cos, rows, cols = _matching(directions, decoder)
    return {"mcc": float(cos[rows, cols].mean()), "mmcs": float(cos.max(axis=1).mean())}


# ---------------------------------------------------------------------------------------------
# Ground truth: firing against the true features, absorption (hierarchies), circles

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""
FIRING_EPS = 1e-6
"""A true feature counts as active, and a latent as firing, above this value."""


@partial(jax.jit, static_argnames="cfg")
def encode_decode(params: sae.Params, x: jax.Array, cfg: SAEConfig):
    """(codes, reconstruction) of x [n, d_in] at inference (x [d_in]: [d_sae], [d_out])."""
    acts = sae.encode(params, x, cfg, train=False)
    return acts, sae.decode(params, acts, x)


def ground_truth_metrics(
    params: sae.Params, cfg: SAEConfig, directions: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]], *, parent: np.ndarray | None = None,
) -> dict[str, Any]:
    """Recovery of known features, over `blocks` of (x [n, d_in], true codes [n, n_features]).

    Each true feature is matched one-to-one to a latent (Hungarian on |cos| of the decoder
    rows), then: mcc, mmcs; uniqueness (distinct best-matching features / firing latents:
    1 = no two latents share a feature); firing precision / recall / F1 of each matched latent
    against its feature (means, and per feature); L0 vs the true L0; dead and dense fractions;
    shrinkage (mean ‖x̂‖ / ‖x‖). With `parent` [n_features] (-1 for roots), absorption
    (see `_absorption`).
    """
    recovery = GroundTruthSums(params, cfg, directions, parent=parent)
    for x, codes in blocks:
        recovery.add(x, jnp.asarray(x), codes)
    return recovery.result()


class TruthTooLarge(JaxsaeError):
    """The matching of true features to latents does not fit in host memory."""


class NotTheTruth(DataError):
    """The data is not the data the truth describes (its size)."""


def _matching(directions: np.ndarray, decoder: np.ndarray) -> tuple[np.ndarray, ...]:
    """(|cos| [n_true, d_sae], matched features, matched latents): the Hungarian matching of
    every true feature to a latent, which needs the whole [n_true, d_sae] matrix in float64
    (scipy's) — too large for the host, one line naming it (fault testing: a 262,144-latent
    SAE's run ended in "Unable to allocate 1.00 GiB" at every resume, naming nothing)."""
    try:
        cos_abs = cosine_matrix(directions, decoder)
        return (cos_abs, *linear_sum_assignment(cos_abs, maximize=True))
    except MemoryError:
        n, d_sae = directions.shape[0], decoder.shape[0]
        raise TruthTooLarge(
            f"the ground-truth metrics match {n:,} true features to {d_sae:,} latents through "
            f"a {n:,} x {d_sae:,} matrix ({n * d_sae * 8 / 2**30:.3g} GiB in float64, and "
            "copies), which this machine's memory does not hold") from None


class GroundTruthSums:
    """The running sums of `ground_truth_metrics` for one SAE (as `ReconstructionSums`)."""

    def __init__(self, params: sae.Params, cfg: SAEConfig, directions: np.ndarray, *,
                 parent: np.ndarray | None = None,
                 input_directions: np.ndarray | None = None) -> None:
        """`input_directions`: a transcoder's input dictionary, which the encoder's columns
        are matched against (encoder_mcc); `directions` is what the decoder's rows are."""
        self.params, self.cfg, self.directions, self.parent = params, cfg, directions, parent
        self.input_directions = input_directions
        W_dec = np.asarray(params["W_dec"], np.float64)
        cos_abs, self.match_f, self.match_l = _matching(directions, W_dec)
        # what the metrics need of the [n_true, d_sae] matrix, which is not kept: a sweep's
        # SAEs held one each for the whole pass (a review: K times the memory)
        self.matched_cos = cos_abs[self.match_f, self.match_l]
        self.best = np.argmax(cos_abs, axis=0)  # each latent's best-matching true feature
        self.mmcs = float(cos_abs.max(axis=1).mean())
        del cos_abs
        self.counts = _FiringCounts(directions.shape[0], W_dec.shape[0], self.match_f,
                                    self.match_l, parent)
        self.saelens = _SAELensCounts(self.best)

    def add(self, x: np.ndarray, on_device: jax.Array, codes: np.ndarray,
            target: np.ndarray | None = None) -> None:
        """Adds a block: x [n, d_in] (and the same on the device), its true codes, and a
        transcoder's targets [n, d_out] (what x_hat is compared with)."""
        acts, x_hat = jax.device_get(encode_decode(self.params, on_device, self.cfg))
        compared = np.asarray(x if target is None else target)
        self.counts.add(compared, np.asarray(acts), np.asarray(x_hat), codes)
        self.saelens.add(compared, np.asarray(acts), np.asarray(x_hat), codes)

    def result(self) -> dict[str, Any]:
        counts, best = self.counts, self.best
        match_f, match_l = self.match_f, self.match_l
        if counts.n == 0:
            raise ValueError("no tokens to evaluate")
        freq = counts.fires / counts.n
        firing = freq > 0
        # Per feature; NaN (null) where undefined: recall of a feature never active in these
        # tokens, precision of a matched latent that never fired, F1 = 2tp / (2tp + fp + fn)
        # of a feature neither active nor fired. Means over the defined ones.
        tp, fp, fn = (a.astype(np.float64) for a in (counts.tp, counts.fp, counts.fn))
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
            recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
            f1 = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        out = {
            "mcc": float(self.matched_cos.mean()),
            "mmcs": self.mmcs,
            "uniqueness": (float(len(set(best[firing].tolist())) / int(firing.sum()))
                           if firing.any() else float("nan")),  # (no latent fired: null)
            "precision": _mean_defined(precision),
            "recall": _mean_defined(recall),
            "f1": _mean_defined(f1),
            "l0": counts.active / counts.n,
            "true_l0": counts.true_active / counts.n,
            "dead_fraction": float(np.mean(~firing)),
            "dense_fraction": float(np.mean(freq > DENSE_FREQUENCY)),
            "shrinkage": (counts.shrinkage / counts.nonzero_tokens if counts.nonzero_tokens
                          else float("nan")),  # (no token reconstructed: null)
            "per_feature": {"latent": match_l.tolist(),
                            "cos": self.matched_cos.tolist(),
                            "precision": precision.tolist(), "recall": recall.tolist(),
                            "f1": f1.tolist()},
        }
        out.update(self.saelens.result(out["mcc"]))
        if self.parent is not None:
            out.update(_absorption(self.params, self.directions, self.parent, match_f,
                                   match_l, counts, input_directions=self.input_directions))
        if self.input_directions is not None:
            encoder = np.asarray(sae.encoder_weight(self.params), np.float64).T
            out["encoder_mcc"] = feature_recovery(self.input_directions, encoder)["mcc"]
        return out


def _mean_defined(values) -> float:
    """The mean of the values that are defined (not NaN); NaN (null) if none is."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


class _FiringCounts:
    """Running sums over token blocks for ground_truth_metrics."""

    def __init__(self, n_feat, d_sae, match_f, match_l, parent):
        self.n = self.nonzero_tokens = 0
        self.active = self.true_active = self.shrinkage = 0.0
        self.fires = np.zeros(d_sae, np.int64)
        self.latent_of = np.full(n_feat, -1)
        self.latent_of[match_f] = match_l
        self.tp = np.zeros(n_feat, np.int64)
        self.fp = np.zeros(n_feat, np.int64)
        self.fn = np.zeros(n_feat, np.int64)
        self.parent = parent
        if parent is not None:
            self.parents = np.unique(parent[parent >= 0])
            k = len(self.parents)
            self.alone = np.zeros(k, np.int64)  # parent active, no child active
            self.alone_fired = np.zeros(k, np.int64)
            self.alone_mag = np.zeros(k)  # summed activation of the parent latent (alone)
            self.with_child = np.zeros(k, np.int64)
            self.with_child_fired = np.zeros(k, np.int64)
            self.with_child_acts: list[list[np.ndarray]] = [[] for _ in range(k)]
            self.full = np.zeros(k, np.int64)

    def add(self, x, acts, x_hat, codes):
        fired = acts > FIRING_EPS
        active = codes > FIRING_EPS
        self.n += len(x)
        self.active += float(fired.sum())
        # (every non-zero true code: a circle's cos / sin coordinates may be negative)
        self.true_active += float(np.sum(np.abs(codes) > FIRING_EPS))
        self.fires += fired.sum(axis=0)
        norms = np.linalg.norm(x, axis=1)
        ok = norms > 0
        self.shrinkage += float(np.sum(np.linalg.norm(x_hat[ok], axis=1) / norms[ok]))
        self.nonzero_tokens += int(ok.sum())
        has = self.latent_of >= 0
        lat = fired[:, np.where(has, self.latent_of, 0)] & has
        self.tp += np.sum(lat & active, axis=0)
        self.fp += np.sum(lat & ~active, axis=0)
        self.fn += np.sum(~lat & active, axis=0)
        if self.parent is None:
            return
        for i, p in enumerate(self.parents):
            children = np.flatnonzero(self.parent == p)
            on = active[:, p]
            child_on = active[:, children].any(axis=1)
            ell = self.latent_of[p]
            ell_acts = acts[:, ell] if ell >= 0 else np.zeros(len(x), np.float32)
            ell_fired = ell_acts > FIRING_EPS
            alone, both = on & ~child_on, on & child_on
            self.alone[i] += alone.sum()
            self.alone_fired[i] += (alone & ell_fired).sum()
            self.alone_mag[i] += ell_acts[alone & ell_fired].sum()
            self.with_child[i] += both.sum()
            self.with_child_fired[i] += (both & ell_fired).sum()
            self.with_child_acts[i].append(ell_acts[both])
            child_latents = self.latent_of[children]
            child_latents = child_latents[child_latents >= 0]
            child_fired = (fired[:, child_latents].any(axis=1) if len(child_latents)
                           else np.zeros(len(x), bool))
            self.full[i] += (both & ~ell_fired & child_fired).sum()


class _SAELensCounts:
    """The metrics of SAELens's `eval_sae_on_synthetic_data` (SynthSAEBench's table), defined
    as SAELens defines them, under `sb_` keys: each latent against its best-matching true
    feature (argmax |cos| of its decoder row; dead latents included), a latent fires when its
    code is non-zero, a feature when its code is > 0; precision / recall / F1 / accuracy per
    latent, averaged over latents; uniqueness = distinct best matches / latents; explained
    variance 1 - E‖x - x̂‖² / (E‖x‖² - ‖E x‖²); shrinkage = mean ‖x̂‖ / ‖x‖ over tokens with
    ‖x‖ > 1e-6; dead latents (a count); the true and the SAE's L0."""

    def __init__(self, best: np.ndarray):
        self.best = best
        d_sae = best.size
        self.tp, self.fp, self.fn = (np.zeros(d_sae, np.int64) for _ in range(3))
        self.fired = np.zeros(d_sae, bool)
        self.n = self.active = self.true_active = self.shrink_n = 0
        self.shrink = self.sum_sq = self.sse = 0.0
        self.sum_x: np.ndarray | None = None

    def add(self, x, acts, x_hat, codes) -> None:
        fires = acts != 0
        truth = codes[:, self.best] > 0
        self.tp += np.sum(fires & truth, axis=0)
        self.fp += np.sum(fires & ~truth, axis=0)
        self.fn += np.sum(~fires & truth, axis=0)
        self.fired |= fires.any(axis=0)
        self.n += len(x)
        self.active += int(fires.sum())
        self.true_active += int(np.sum(codes != 0))
        x64 = x.astype(np.float64)
        total = x64.sum(axis=0)
        self.sum_x = total if self.sum_x is None else self.sum_x + total
        self.sum_sq += float(np.sum(x64**2))
        self.sse += float(np.sum((x64 - x_hat) ** 2))
        norms = np.linalg.norm(x64, axis=1)
        ok = norms > 1e-6
        self.shrink += float(np.sum(np.linalg.norm(x_hat[ok], axis=1) / norms[ok]))
        self.shrink_n += int(ok.sum())

    def result(self, mcc: float) -> dict[str, float]:
        """(`mcc`, the Hungarian mean |cos|, is SAELens's definition too: passed in, not
        matched twice.)"""
        tp, fp, fn = self.tp, self.fp, self.fn
        tn = self.n - tp - fp - fn
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(precision + recall > 0,
                      2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
        variance = self.sum_sq / self.n - float(np.sum((self.sum_x / self.n) ** 2))
        mse = self.sse / self.n
        # (SAELens reports 1 or 0 where the tokens do not vary; null here, as explained_variance)
        ev = (1.0 - mse / variance) if variance >= 1e-10 else float("nan")
        return {
            "sb_mcc": mcc,
            "sb_uniqueness": len(np.unique(self.best)) / self.best.size,
            "sb_precision": float(precision.mean()),
            "sb_recall": float(recall.mean()),
            "sb_f1": float(f1.mean()),
            "sb_accuracy": float(((tp + tn) / max(self.n, 1)).mean()),
            "sb_explained_variance": ev,
            "sb_shrinkage": self.shrink / self.shrink_n if self.shrink_n else float("nan"),
            "sb_dead_latents": int(np.sum(~self.fired)),
            "sb_l0": self.active / self.n,
            "sb_true_l0": self.true_active / self.n,
        }


def _absorption(params, directions, parent, match_f, match_l, c: _FiringCounts, *,
                input_directions: np.ndarray | None = None) -> dict:
    """Feature absorption on a hierarchy, per parent feature p with matched latent ℓ:

    recall_alone       P(ℓ fires | p active, no child active)
    recall_with_child  P(ℓ fires | p active, a child active)
    full               P(ℓ silent and a child's latent fires | p and a child active)
    partial            P(ℓ fires below half its usual (alone) magnitude | p and a child active)
                       (null where ℓ fired beside a child but never with p alone: no usual
                       magnitude to compare with)
    absorption         full + partial
    decoder mixing     cos(W_dec[ℓ], child direction) for each child (signed)
    encoder mixing     cos(W_enc[:, ℓ_c], sibling direction) for each child c, sibling s ≠ c
    child decoders     cos(W_dec[ℓ_c], sibling direction) (negative: a child latent
                       subtracts its siblings)
    (A transcoder's encoder reads the input: its columns are compared with the input
    dictionary, `input_directions`.)
    """
    W_dec = np.asarray(params["W_dec"], np.float64)
    W_enc = np.asarray(sae.encoder_weight(params), np.float64)
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    unit_in = unit if input_directions is None else (
        input_directions / np.linalg.norm(input_directions, axis=1, keepdims=True))

    def cos(u, v):
        return float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))

    rows = []
    for i, p in enumerate(c.parents):
        # its usual magnitude is that of the tokens where it fired alone; with none, the
        # firings beside a child have nothing to compare with and partial absorption is null
        # (fault testing: a parent never active without a child read 0.0, as if measured);
        # a latent that never fired beside a child has none, whatever its usual magnitude
        usual = c.alone_mag[i] / c.alone_fired[i] if c.alone_fired[i] else None
        both_acts = np.concatenate(c.with_child_acts[i]) if c.with_child_acts[i] else np.zeros(0)
        fired = both_acts > FIRING_EPS
        partial = (np.sum(fired & (both_acts < 0.5 * usual)) if usual is not None
                   else 0 if not fired.any() else None)
        children = np.flatnonzero(parent == p)
        ell = c.latent_of[p]
        def share(count, of):  # NaN (null) where no token qualifies
            return count / of if of else float("nan")

        rows.append({
            "parent": int(p), "latent": int(ell),
            "recall_alone": share(c.alone_fired[i], c.alone[i]),
            "recall_with_child": share(c.with_child_fired[i], c.with_child[i]),
            "full": share(c.full[i], c.with_child[i]),
            "partial": share(partial, c.with_child[i]) if partial is not None else float("nan"),
            "decoder_child_cos": [cos(W_dec[ell], unit[ch]) for ch in children] if ell >= 0
            else [],
            "encoder_sibling_cos": [
                cos(W_enc[:, c.latent_of[a]], unit_in[b]) for a in children for b in children
                if a != b and c.latent_of[a] >= 0],
            "decoder_sibling_cos": [
                cos(W_dec[c.latent_of[a]], unit[b]) for a in children for b in children
                if a != b and c.latent_of[a] >= 0],
        })
    def mean(key):  # over the parents where it is defined (null if none)
        return _mean_defined([r[key] for r in rows])

    def mean_of_lists(key):  # over every value of every parent's list
        return _mean_defined([v for r in rows for v in r[key]])

    return {
        "absorption": mean("full") + mean("partial"),
        "absorption_full": mean("full"),
        "absorption_partial": mean("partial"),
        "parent_recall_alone": mean("recall_alone"),
        "parent_recall_with_child": mean("recall_with_child"),
        "parent_decoder_child_cos": mean_of_lists("decoder_child_cos"),
        "child_encoder_sibling_cos": mean_of_lists("encoder_sibling_cos"),
        "child_decoder_sibling_cos": mean_of_lists("decoder_sibling_cos"),
        "per_parent": [{k: (float(v) if isinstance(v, np.floating) else v) for k, v in r.items()}
                       for r in rows],
    }


def circle_metrics(params: sae.Params, cfg: SAEConfig, directions: np.ndarray, *,
                   radius: float = 1.0, points: int = 64, in_plane: float = 0.99
                   ) -> dict[str, Any]:
    """Circles (directions rows 2c, 2c+1 span circle c's plane): a decoder row belongs to a
    plane when its projection onto it keeps >= `in_plane` of its norm. Returns the histogram
    of rows per plane, the fraction of planes covered, and the explained variance of the SAE
    on `points` points r·(a cos θ + b sin θ) of each circle (mean over circles)."""
    n_circles = directions.shape[0] // 2
    planes = np.stack([np.linalg.qr(directions[2 * c: 2 * c + 2].T.astype(np.float64))[0].T
                       for c in range(n_circles)])  # [C, 2, d] orthonormal bases
    W = np.asarray(params["W_dec"], np.float64)
    W = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    kept = np.sqrt(np.sum(np.einsum("cjd,sd->csj", planes, W) ** 2, axis=-1))  # [C, d_sae]
    belongs = kept >= in_plane
    per_plane = belongs.sum(axis=1)
    theta = np.linspace(0, 2 * np.pi, points, endpoint=False)
    a, b = directions[0::2].astype(np.float64), directions[1::2].astype(np.float64)
    evs = []
    for lo in range(0, n_circles, 256):
        hi = min(lo + 256, n_circles)
        x = radius * (np.cos(theta)[None, :, None] * a[lo:hi, None]
                      + np.sin(theta)[None, :, None] * b[lo:hi, None])  # [c, points, d]
        flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
        _, x_hat = jax.device_get(encode_decode(params, jnp.asarray(flat), cfg))
        err = np.sum((np.asarray(x_hat).reshape(x.shape) - x) ** 2, axis=(1, 2))
        spread = np.sum((x - x.mean(axis=1, keepdims=True)) ** 2, axis=(1, 2))
        evs.append(1.0 - err / np.maximum(spread, 1e-30))
    values, counts = np.unique(per_plane, return_counts=True)
    return {
        "rows_per_plane_histogram": {int(v): int(n) for v, n in zip(values, counts, strict=True)},
        "planes_covered": float(np.mean(per_plane > 0)),
        "rows_per_covered_plane": float(per_plane[per_plane > 0].mean()) if per_plane.any()
        else None,  # (no plane covered: nothing to count; fault testing found 0.0)
        "rows_in_planes": int(belongs.any(axis=0).sum()),
        "circle_explained_variance": float(np.mean(np.concatenate(evs))),
    }


def truth_report(params: sae.Params, cfg: SAEConfig, source, truth, *, start: int = 0,
                 stop: int | None = None, batch_size: int = 4096, details: bool = False,
                 keep=None, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Every ground-truth metric that applies to `truth` (a `synthetic.Truth` of the data in
    `source`), over tokens [start, stop): feature recovery and firing for every kind, absorption
    for hierarchies, plane coverage for circles. `details`: keep the per-feature / per-parent
    lists. `keep`: a `KeepFn`; tokens it rejects are left out (with their true codes).
    `progress`: called with each block's number of tokens."""
    return truth_reports([(params, cfg)], source, truth, start=start, stop=stop,
                         batch_size=batch_size, details=details, keep=keep,
                         progress=progress)[0]


def truth_reports(saes: list[tuple[sae.Params, SAEConfig]], source, truth, *, start: int = 0,
                  stop: int | None = None, batch_size: int = 4096, details: bool = False,
                  keep=None, progress: Callable[[int], Any] | None = None
                  ) -> list[dict[str, Any]]:
    """`truth_report` of several SAEs (a sweep's), the tokens and their true codes read once."""
    from jaxsae.data.synthetic import data_names
    from jaxsae.data.window import Window

    stop = source.n_tokens if stop is None else stop
    if source.n_tokens != truth.spec.tokens:
        raise NotTheTruth(f"the data has {source.n_tokens} tokens but the truth describes "
                         f"{truth.spec.tokens}: not the data it was generated with")
    parent = truth.arrays.get("parent")
    paired = bool(getattr(source, "d_out", 0))
    sums = [GroundTruthSums(params, cfg, truth.directions_of(paired), parent=parent,
                            input_directions=(truth.arrays.get("input_directions") if paired
                                              else None))
            for params, cfg in saes]
    d_in = source.d_in
    names = data_names(source)
    window = Window(source, start, stop, batch_size=batch_size)
    for at, block, _ in window.masked():
        if progress is not None:
            progress(len(block))
        codes = truth.codes(at, at + len(block))
        truth.check_rows(at, block, names)  # (the codes describe these tokens only if they
        # are the tokens the truth generates)
        kept = None if keep is None else keep(block)
        if kept is not None:
            block, codes = block[kept], codes[kept]
        if not len(block):
            continue
        x, target = block[:, :d_in], (block[:, d_in:] if getattr(source, "d_out", 0) else None)
        on_device = jnp.asarray(x)
        for one in sums:
            one.add(x, on_device, codes, target)
    reports = []
    for (params, cfg), one in zip(saes, sums, strict=True):
        out = one.result()
        if truth.spec.kind == "circles":
            out.update(circle_metrics(params, cfg, truth.directions, radius=truth.spec.radius))
        if not details:
            out.pop("per_feature")
            out.pop("per_parent", None)
        reports.append(out)
    return reports
