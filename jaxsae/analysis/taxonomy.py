"""What kind of latent is this? The `kind` column of `jaxsae analyze`'s latents.csv.

Each latent gets the first kind whose test it passes, in this order, with the evidence
columns behind every test written beside it:

  dead      never fired on the sample
  dense     fires on more than 10% of tokens
  circular  its decoder lies, with at least two others' (its decoder neighbours with
            cos > 0.3), in a plane (the top two singular values carry >= 90% of the group's
            squared norm), and on the tokens where it fires the input's projection onto
            that plane has a near-constant radius (coefficient of variation < 0.25) and
            angles spread along an arc (circular standard deviation > 0.15 rad), not
            gathered at a point: it traces a circle or ellipse with the others (a parent
            and its absorbed children also share a plane, but sit at a few points of it)
  child     it carries a partner's component: a partner (a co-firing latent or a decoder
            neighbour with cos > 0.3) with which it either fires almost only
            (P(partner | it) >= 0.9: a hierarchy kept as two latents) or almost never
            (P(partner | it) < 0.05) while their decoders share a direction (cos > 0.3:
            absorption, it took the partner's component and the partner went silent on its
            tokens), and its tokens hold the partner's direction more fully than the
            partner's tokens hold its own (`carries_partner`: the mean projection on the
            partner's direction where it fires, over the same where the partner fires: ~1
            for a child, which comes with all of its parent; a parent's tokens hold only
            the share of a child that fires with it)
  parent    the partner side of a child
  variable  broad magnitudes: its non-zero activations spread (coefficient of variation
            >= 0.35) or their histogram has several peaks (magnitude used as uncertainty,
            or structure the tests above did not place)
  single    one peak: a feature firing at a set magnitude

The thresholds are module constants; `benchmarks/experiments/taxonomy_accuracy.py` measures
how often each kind is called right on data whose features' kinds are known.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxsae.evaluate import DENSE_FREQUENCY

KINDS = ("dead", "dense", "circular", "child", "parent", "variable", "single")
PARTNER_COS = 0.3
"""Decoder cosine above which two latents share a direction (random unit vectors in d dims
have |cos| ~ 1/sqrt(d): 0.04 at d 768, 0.13 at d 64)."""
PLANE_ENERGY = 0.9
RING_CV = 0.25
MIN_ARC = 0.15
HIERARCHY_P = 0.9
EXCLUSIVE_P = 0.05
VARIABLE_CV = 0.35


def planes(unit: np.ndarray, nb_idx: np.ndarray, nb_cos: np.ndarray) -> dict[str, np.ndarray]:
    """Per latent: its plane group — itself and its closest decoder neighbours with
    cos > PARTNER_COS, as many of them (closest first, at least two) as still lie in a plane
    (the top two singular values carry >= PLANE_ENERGY of their squared norm; a neighbour
    from elsewhere that happens to be close is left out) — its size, that share, and the
    plane's basis [n, 2, d] (zeros where no group of 3 is planar)."""
    n, d = unit.shape
    size, energy = np.zeros(n, np.int64), np.zeros(n)
    basis = np.zeros((n, 2, d), np.float32)
    for k in np.flatnonzero(np.sum(nb_cos > PARTNER_COS, axis=1) >= 2):
        near = nb_idx[k][nb_cos[k] > PARTNER_COS]  # closest first
        for m in range(len(near), 1, -1):
            _, s, vt = np.linalg.svd(unit[np.concatenate([[k], near[:m]])], full_matrices=False)
            share = float(np.sum(s[:2] ** 2) / np.sum(s**2))
            if share >= PLANE_ENERGY or m == 2:
                size[k], energy[k], basis[k] = m + 1, share, vt[:2]
                break
    return {"size": size, "energy": energy, "basis": basis,
            "planar": (size >= 3) & (energy >= PLANE_ENERGY)}


def classify(*, frequency: np.ndarray, mean: np.ndarray, std: np.ndarray, peaks: np.ndarray,
             ring_cv: np.ndarray, arc: np.ndarray, plane: dict[str, np.ndarray],
             partner: np.ndarray, partner_cos: np.ndarray, p_partner: np.ndarray,
             carries: np.ndarray, carried: np.ndarray) -> list[dict[str, Any]]:
    """The kind and its evidence per latent. `partner` [n]: the latent's likeliest partner
    (-1: none), with their decoder cosine and P(partner | it); `carries`: the mean projection
    of the input on the partner's direction where the latent fires, over the same where the
    partner fires (1: its tokens hold the partner's whole component); `carried`: the same
    with the two swapped."""
    n = len(frequency)
    cv = np.where(mean > 0, std / np.maximum(mean, 1e-30), 0.0)
    has = partner >= 0
    close = partner_cos > PARTNER_COS
    related = (p_partner >= HIERARCHY_P) | ((p_partner < EXCLUSIVE_P) & close)
    child = has & related & (carries > carried)
    parent = np.zeros(n, bool)
    parent[partner[child]] = True
    circular = plane["planar"] & (ring_cv < RING_CV) & (arc > MIN_ARC)
    kind = np.full(n, "single", dtype=object)
    kind[(cv >= VARIABLE_CV) | (peaks >= 2)] = "variable"
    kind[parent] = "parent"
    kind[child] = "child"
    kind[circular] = "circular"
    kind[frequency > DENSE_FREQUENCY] = "dense"
    kind[frequency == 0] = "dead"
    return [{"kind": str(kind[k]), "activation_cv": float(cv[k]), "partner": int(partner[k]),
             "partner_cos": float(partner_cos[k]), "p_partner_given_latent": float(p_partner[k]),
             "carries_partner": float(carries[k]) if has[k] else 0.0,
             "plane_size": int(plane["size"][k]) if plane["planar"][k] else 0,
             "plane_energy": float(plane["energy"][k]),
             "ring_cv": float(ring_cv[k]) if plane["planar"][k] else 0.0,
             "arc": float(arc[k]) if plane["planar"][k] else 0.0}
            for k in range(n)]


def partners(n: int, i: np.ndarray, j: np.ndarray, count: np.ndarray, fires: np.ndarray,
             nb_idx: np.ndarray, nb_cos: np.ndarray, unit: np.ndarray
             ) -> dict[str, np.ndarray]:
    """Each latent's likeliest partner: the latent it fires with most often given it fires, if
    that is a hierarchy (P >= HIERARCHY_P), else its closest decoder neighbour with
    cos > PARTNER_COS, else none (-1). (i, j, count): co-firing pairs counted on a sample where
    the latents fired `fires` times."""
    from scipy.sparse import coo_matrix

    both = coo_matrix((np.concatenate([count, count]).astype(np.float64),
                       (np.concatenate([i, j]), np.concatenate([j, i]))), shape=(n, n)).tocsr()
    partner = np.full(n, -1)
    p = np.zeros(n)
    for k in np.flatnonzero(fires > 0):
        row = slice(both.indptr[k], both.indptr[k + 1])
        if row.stop > row.start:
            at = row.start + int(np.argmax(both.data[row]))
            best_p = both.data[at] / fires[k]
            if best_p >= HIERARCHY_P:
                partner[k], p[k] = both.indices[at], best_p
                continue
        if nb_cos[k, 0] > PARTNER_COS:
            m = int(nb_idx[k, 0])
            partner[k], p[k] = m, both[k, m] / fires[k]
    cos = np.where(partner >= 0, np.einsum("nd,nd->n", unit, unit[np.maximum(partner, 0)]), 0.0)
    return {"partner": partner, "p_partner": p, "partner_cos": cos}
