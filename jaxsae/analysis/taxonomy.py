"""What kind of latent is this? The `kind` column of `jaxsae analyze`'s latents.csv.

Each latent gets the first kind whose test it passes, in this order, with the evidence
columns behind every test written beside it:

  dead      never fired on the sample
  circular  its decoder lies in a plane with those of at least two other distinct
            directions (grown from its decoder neighbours with cos > 0.3 and the latents it
            co-fires with most; the top two singular values carry >= 90% of the group's
            squared norm; near-duplicates count once), and on the tokens where it fires the
            input's projection onto
            that plane has a near-constant radius (coefficient of variation < 0.25) and
            angles that run continuously along an arc of at least 40° (5° bins each
            holding >= 1% of its tokens, without a gap): it traces a circle or ellipse with
            the others (a parent and its absorbed children also share a plane, but sit at
            a few separate points of it)
  child     it carries a partner's component: a partner (a co-firing latent firing on at
            most half the tokens, or a decoder neighbour with cos > 0.3) with which it
            either fires almost only
            (P(partner | it) >= 0.9: a hierarchy kept as two latents) or almost never
            (P(partner | it) < 0.05) while their decoders share a direction (0.3 < cos < 0.9:
            absorption, it took the partner's component and the partner went silent on its
            tokens; a near-duplicate splits one feature), and its tokens hold the partner's
            direction more fully than the partner's tokens hold its own, by 0.2 at least
            (`carries_partner`: the mean projection on the
            partner's direction where it fires, over the same where the partner fires: ~1
            for a child, which comes with all of its parent; a parent's tokens hold only
            the share of a child that fires with it)
  parent    the partner side of a child
  duplicate its decoder direction is another firing latent's, or nearly (nearest decoder
            cosine >= 0.9): one feature learnt twice or split over two latents (a wide
            dictionary's waste, or its feature splitting); `nearest` names the other
  dense     fires on more than 10% of tokens (after the structural kinds: a parent firing
            often is still a parent)
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

KINDS = ("dead", "circular", "child", "parent", "duplicate", "dense", "variable", "single")
PARTNER_COS = 0.3
"""Decoder cosine above which two latents share a direction (random unit vectors in d dims
have |cos| ~ 1/sqrt(d): 0.04 at d 768, 0.13 at d 64)."""
PLANE_ENERGY = 0.9
MIN_SEPARATION = 20.0
CO_FIRING_CANDIDATES = 5
RING_CV = 0.25
MIN_ARC = 40.0
ANGLE_BINS = 72
ARC_BIN_SHARE = 0.01
HIERARCHY_P = 0.9
COMMON_PARTNER = 0.5
"""A latent firing on more than this share of the tokens is no one's hierarchy partner: every
latent fires "almost only with" a latent that always fires (a real TopK SAE's latent for the
mean activation direction fires on every token)."""
DUPLICATE_COS = 0.9
CARRY_MARGIN = 0.2
EXCLUSIVE_P = 0.05
VARIABLE_CV = 0.35


def planes(unit: np.ndarray, nb_idx: np.ndarray, nb_cos: np.ndarray,
           cofiring=None, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Per latent: its plane group, grown greedily from the latent over its candidates — its
    decoder neighbours with cos > PARTNER_COS (closest first), then the latents it co-fires
    with most (`cofiring`: a CSR matrix of co-firing counts; adjacent latents tiling a circle
    co-fire between them, whatever their cosine) — keeping each that leaves the group in a
    plane (the top two singular values carry >= PLANE_ENERGY of its squared norm). Returns
    the number of distinct directions in the group (in-plane angles >= MIN_SEPARATION
    degrees apart: duplicates of one feature count once), that share, and the plane's basis
    [n, 2, d]; `planar`: at least three distinct directions.

    Every latent's group grows in lockstep, `chunk` latents at a time: a trial's share is read
    from the eigenvalues of the members' Gram matrix ([candidates + 1]² per latent, the
    excluded rows zeroed), and the plane's basis from one SVD of each final group."""
    n, d = unit.shape
    candidates, count = _plane_candidates(nb_idx, nb_cos, cofiring)
    size, energy = np.zeros(n, np.int64), np.zeros(n)
    basis = np.zeros((n, 2, d), np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        members = np.concatenate([np.arange(lo, hi)[:, None], candidates[lo:hi]], axis=1)
        rows = unit[members].astype(np.float64)  # [m, 1 + C, d]
        gram = rows @ rows.transpose(0, 2, 1)
        grows = count[lo:hi] >= 2
        keep = np.zeros(members.shape, bool)
        keep[:, 0] = True
        share = np.ones(hi - lo)
        accepted = np.zeros(hi - lo, bool)
        for j in range(1, members.shape[1]):
            trial = keep.copy()
            trial[:, j] = True
            masked = gram * (trial[:, :, None] & trial[:, None, :])
            eig = np.linalg.eigvalsh(masked)
            total = np.trace(masked, axis1=1, axis2=2)
            with np.errstate(invalid="ignore", divide="ignore"):
                e = (eig[:, -1] + eig[:, -2]) / total
            take = grows & (j <= count[lo:hi]) & (e >= PLANE_ENERGY)
            keep[:, j] |= take
            share = np.where(take, e, share)
            accepted |= take
        if not accepted.any():
            continue
        at = np.flatnonzero(accepted)
        vt = np.linalg.svd(rows[at] * keep[at][:, :, None], full_matrices=False)[2][:, :2]
        proj = np.einsum("mcd,mkd->mck", rows[at], vt)
        angles = np.where(keep[at], np.degrees(np.arctan2(proj[..., 1], proj[..., 0])), np.inf)
        angles = np.sort(angles, axis=1)  # the group's first, the excluded (inf) after
        n_in = keep[at].sum(axis=1)
        with np.errstate(invalid="ignore"):  # inf - inf beyond each group: masked next
            inner = np.diff(angles, axis=1)
        inner = np.where(np.arange(inner.shape[1]) < (n_in - 1)[:, None], inner, 0.0)
        wrap = angles[:, 0] + 360 - angles[np.arange(len(at)), n_in - 1]
        distinct = np.sum(inner >= MIN_SEPARATION, axis=1) + (wrap >= MIN_SEPARATION)
        size[lo + at] = np.maximum(1, distinct)
        energy[lo + at] = share[at]
        basis[lo + at] = vt
    return {"size": size, "energy": energy, "basis": basis, "planar": size >= 3}


def _plane_candidates(nb_idx: np.ndarray, nb_cos: np.ndarray, cofiring
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Each latent's plane candidates in order, [n, C] (padded with the latent itself) and
    their number: its neighbours with cos > PARTNER_COS, closest first, then up to
    CO_FIRING_CANDIDATES of the latents it co-fires with most (ties: in column order) not
    among them."""
    n = len(nb_idx)
    width = nb_idx.shape[1] + (CO_FIRING_CANDIDATES if cofiring is not None else 0)
    out = np.repeat(np.arange(n)[:, None], width, axis=1)
    count = np.zeros(n, np.int64)
    close = nb_cos > PARTNER_COS
    top = np.full((n, CO_FIRING_CANDIDATES), -1, np.int64)
    if cofiring is not None:  # each row's most frequent partners, by one sort of all entries
        row = np.repeat(np.arange(n), np.diff(cofiring.indptr))
        order = np.lexsort((np.arange(len(row)), -cofiring.data, row))
        rank = np.arange(len(row)) - cofiring.indptr[row[order]]
        first = rank < CO_FIRING_CANDIDATES
        top[row[order][first], rank[first]] = cofiring.indices[order][first]
    for k in range(n):
        chosen = list(nb_idx[k][close[k]])
        chosen += [m for m in top[k] if m >= 0 and m not in chosen]
        out[k, :len(chosen)] = chosen
        count[k] = len(chosen)
    return out, count


def classify(*, frequency: np.ndarray, mean: np.ndarray, std: np.ndarray, peaks: np.ndarray,
             ring_cv: np.ndarray, arc: np.ndarray, plane: dict[str, np.ndarray],
             partner: np.ndarray, partner_cos: np.ndarray, p_partner: np.ndarray,
             carries: np.ndarray, carried: np.ndarray, nearest: np.ndarray,
             nearest_cos: np.ndarray) -> list[dict[str, Any]]:
    """The kind and its evidence per latent. `nearest` [n], `nearest_cos` [n]: its nearest
    other latent by decoder cosine, and that cosine. `partner` [n]: the latent's likeliest partner
    (-1: none), with their decoder cosine and P(partner | it); `carries`: the mean projection
    of the input on the partner's direction where the latent fires, over the same where the
    partner fires (1: its tokens hold the partner's whole component); `carried`: the same
    with the two swapped."""
    n = len(frequency)
    with np.errstate(divide="ignore", invalid="ignore"):  # (NaN for a latent that never fired)
        cv = np.where(mean > 0, std / mean, np.where(frequency > 0, 0.0, np.nan))
    has = partner >= 0
    # (a near-duplicate, cos >= DUPLICATE_COS, splits one feature: not absorption)
    close = (partner_cos > PARTNER_COS) & (partner_cos < DUPLICATE_COS)
    related = (p_partner >= HIERARCHY_P) | ((p_partner < EXCLUSIVE_P) & close)
    child = has & related & (carries >= carried + CARRY_MARGIN)
    parent = np.zeros(n, bool)
    parent[partner[child]] = True
    circular = plane["planar"] & (ring_cv < RING_CV) & (arc > MIN_ARC)
    kind = np.full(n, "single", dtype=object)
    kind[(cv >= VARIABLE_CV) | (peaks >= 2)] = "variable"
    kind[frequency > DENSE_FREQUENCY] = "dense"
    # (a twin that never fires learnt nothing twice: fault testing)
    kind[(nearest_cos >= DUPLICATE_COS) & (frequency[nearest] > 0)] = "duplicate"
    kind[parent] = "parent"
    kind[child] = "child"
    kind[circular] = "circular"
    kind[frequency == 0] = "dead"
    return [{"kind": str(kind[k]), "activation_cv": float(cv[k]), "partner": int(partner[k]),
             "partner_cos": float(partner_cos[k]), "p_partner_given_latent": float(p_partner[k]),
             "carries_partner": float(carries[k]) if has[k] else 0.0,
             "plane_size": int(plane["size"][k]) if plane["planar"][k] else 0,
             "plane_energy": float(plane["energy"][k]),
             "ring_cv": float(ring_cv[k]) if plane["planar"][k] else 0.0,
             "arc_deg": float(arc[k]) if plane["planar"][k] else 0.0}
            for k in range(n)]


def longest_arc(angles: np.ndarray) -> np.ndarray:
    """[m] degrees: the longest run of consecutive angle bins (`angles` [m, ANGLE_BINS]
    counts, wrapping round) that each hold at least ARC_BIN_SHARE of the row's total."""
    held = angles >= ARC_BIN_SHARE * np.maximum(angles.sum(1, keepdims=True), 1e-30)
    held &= angles > 0
    out = np.zeros(len(angles))
    for k, row in enumerate(held):
        if row.all():
            out[k] = 360.0
            continue
        twice = np.concatenate([row, row])  # runs that wrap round
        best = run = 0
        for v in twice:
            run = run + 1 if v else 0
            best = max(best, run)
        out[k] = min(best, len(row)) * 360.0 / len(row)
    return out


def cofiring_matrix(n: int, i: np.ndarray, j: np.ndarray, count: np.ndarray):
    """The symmetric CSR matrix [n, n] of co-firing counts of the pairs (i, j, count)."""
    from scipy.sparse import coo_matrix

    return coo_matrix((np.concatenate([count, count]).astype(np.float64),
                       (np.concatenate([i, j]), np.concatenate([j, i]))), shape=(n, n)).tocsr()


def partners(both, fires: np.ndarray, nb_idx: np.ndarray, nb_cos: np.ndarray,
             unit: np.ndarray, tokens: int) -> dict[str, np.ndarray]:
    """Each latent's likeliest partner: the latent it fires with most often given it fires, if
    that is a hierarchy (P >= HIERARCHY_P, the partner firing on at most COMMON_PARTNER of the
    tokens), else its closest decoder neighbour with cos > PARTNER_COS, else none (-1).
    Co-firing counts: counted on a sample of `tokens` tokens where the latents fired `fires`
    times (`both`: their `cofiring_matrix`)."""
    n = len(fires)
    partner = np.full(n, -1)
    p = np.zeros(n)
    rare = fires <= COMMON_PARTNER * tokens
    for k in np.flatnonzero(fires > 0):
        row = slice(both.indptr[k], both.indptr[k + 1])
        counts = both.data[row] * rare[both.indices[row]]
        if counts.size and counts.max() > 0:
            at = row.start + int(np.argmax(counts))
            best_p = both.data[at] / fires[k]
            if best_p >= HIERARCHY_P:
                partner[k], p[k] = both.indices[at], best_p
                continue
        if nb_cos[k, 0] > PARTNER_COS:
            m = int(nb_idx[k, 0])
            partner[k], p[k] = m, both[k, m] / fires[k]
    cos = np.where(partner >= 0, np.einsum("nd,nd->n", unit, unit[np.maximum(partner, 0)]), 0.0)
    return {"partner": partner, "p_partner": p, "partner_cos": cos}
