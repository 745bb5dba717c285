"""The per-latent taxonomy (jaxsae.analysis.taxonomy, the `kind` column of analyze's
latents.csv): each rule on evidence made for it, and the kinds analyze calls for dictionaries
set at the true features of data whose features' kinds are known."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from jaxsae import export
from jaxsae.analysis import taxonomy
from jaxsae.analysis.geometry import analyze, cofiring
from jaxsae.config import SAEConfig
from jaxsae.data import synthetic


def test_each_rule_on_its_own_evidence():
    n = 11
    plane = {"planar": np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0], bool),
             "size": np.array([0, 0, 0, 0, 0, 0, 3, 3, 0, 0, 0]), "energy": np.ones(n)}
    rows = taxonomy.classify(
        frequency=np.array([0, 0.5, 0.01, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.5, 0.01]),
        mean=np.ones(n), std=np.array([0, 0, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1, 0.1, 0.8, 0.1]),
        peaks=np.ones(n, np.int64),
        ring_cv=np.array([0, 0, 0, 0, 0, 0, 0.1, 0.1, 0, 0, 0]),
        arc=np.array([0, 0, 0, 0, 0, 0, 90.0, 5.0, 0, 0, 0]),  # latent 7: a point, no arc
        plane=plane,
        partner=np.array([-1, -1, 3, -1, 3, -1, -1, -1, -1, -1, -1]),
        partner_cos=np.array([0, 0, 0.0, 0, 0.6, 0, 0, 0, 0, 0, 0]),
        p_partner=np.array([0, 0, 0.95, 0, 0.0, 0, 0, 0, 0, 0, 0]),
        carries=np.array([0, 0, 1.0, 0, 0.98, 0, 0, 0, 0, 0, 0]),
        carried=np.array([0, 0, 0.4, 0, 0.5, 0, 0, 0, 0, 0, 0]),
        nearest=np.array([2, 0, 0, 0, 0, 0, 0, 9, 0, 10, 9]),
        nearest_cos=np.array([0.95, 0.1, 0.95, 0.1, 0.2, 0.1, 0.1, 0.89, 0.99, 0.9, 0.97]))
    kinds = [r["kind"] for r in rows]
    # 2: fires only with 3 (hierarchy); 4: never with 3 but shares its direction (absorption);
    # 9 and 10: a decoder (nearly) another firing one's, before dense (9) and single (10);
    # 0: dead first; 8's only twin is 0, which never fired: learnt once (fault testing)
    assert kinds == ["dead", "dense", "child", "parent", "child", "variable", "circular",
                     "single", "single", "duplicate", "duplicate"]
    assert set(kinds) <= set(taxonomy.KINDS)


def _oracle(root, spec, rows, bias):
    data = synthetic.write(spec, root / "data", progress=False)
    W = np.asarray(rows, np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    export.export_sae({"W_dec": W, "W_enc": W.T.copy(), "b_enc": np.full(len(W), bias, np.float32),
                       "b_dec": np.zeros(spec.d_in, np.float32)},
                      SAEConfig(d_sae=len(W), activation="relu"), root / "sae")
    analyze(str(root / "sae"), str(data), root / "out", tokens=16384, progress=False)
    with open(root / "out" / "latents.csv") as f:
        return [r["kind"] for r in csv.DictReader(f)]


@pytest.mark.usefixtures("no_analysis_figures")  # (reads no figure: test_geometry.py does)
def test_a_feature_learnt_twice_is_duplicate(tmp_path):
    """A dictionary at the true features plus a near copy (cos ~0.98) of the first six: those
    twelve are duplicates, the others not."""
    spec = synthetic.SuperpositionSpec(n_features=24, d_in=32, mean_l0=2.0, zipf_exponent=0.0,
                                       tokens=16384, seed=3)
    D = spec.truth()["directions"]
    noise = np.random.default_rng(0).standard_normal((6, spec.d_in))
    copies = D[:6] + 0.2 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    kinds = _oracle(tmp_path, spec, [*D, *copies], -0.2)
    twice = [*range(6), *range(24, 30)]
    assert [kinds[i] for i in twice] == ["duplicate"] * 12, kinds
    assert "duplicate" not in [k for i, k in enumerate(kinds) if i not in twice], kinds


@pytest.mark.usefixtures("no_analysis_figures")  # (reads no figure: test_geometry.py does)
def test_circles_are_circular(tmp_path):
    """Six latents tiling each circle's plane (as wide SAEs learn circles)."""
    spec = synthetic.CirclesSpec(n_circles=10, d_in=48, prob=0.03, tokens=16384, seed=1)
    D = spec.truth()["directions"]
    rows = [np.cos(t) * D[2 * c] + np.sin(t) * D[2 * c + 1]
            for c in range(10) for t in np.arange(6) * np.pi / 3]
    kinds = _oracle(tmp_path, spec, rows, -0.5)
    assert np.mean([k == "circular" for k in kinds]) >= 0.9


@pytest.mark.usefixtures("no_analysis_figures")  # (reads no figure: test_geometry.py does)
@pytest.mark.parametrize(("magnitude_std", "want"), [(0.05, "single"), (0.6, "variable")])
def test_set_and_spread_magnitudes(tmp_path, magnitude_std, want):
    spec = synthetic.SuperpositionSpec(n_features=16, d_in=64, mean_l0=0.8, zipf_exponent=0.0,
                                       magnitude_std=magnitude_std, tokens=16384, seed=2)
    kinds = _oracle(tmp_path, spec, spec.truth()["directions"], -0.4)
    assert np.mean([k == want for k in kinds]) >= 0.9, kinds


@pytest.mark.usefixtures("no_analysis_figures")  # (reads no figure: test_geometry.py does)
def test_a_hierarchy_kept_and_absorbed(tmp_path):
    spec = synthetic.HierarchySpec(n_trees=4, branching=2, depth=2, probs=(0.06, 0.4),
                                   magnitude_std=0.05, d_in=24, tokens=16384, seed=3)
    D = spec.truth()["directions"]
    kinds = _oracle(tmp_path / "kept", spec, D, -0.1)
    assert kinds == ["parent"] * 4 + ["child"] * 8
    # absorbed: each child latent carries its parent's direction and fires instead of it
    # (the parent latent reads the parent minus its children, so it is silent with them)
    parent = np.repeat(np.arange(4), 2)
    W = np.concatenate([D[:4], D[4:] + D[parent]])
    W_enc = np.concatenate([D[:4] - D[4:].reshape(4, 2, -1).sum(1), D[4:]]).T
    data = synthetic.write(spec, tmp_path / "abs" / "data", progress=False)
    export.export_sae({"W_dec": W, "W_enc": W_enc, "b_enc": np.full(12, -0.3, np.float32),
                       "b_dec": np.zeros(24, np.float32)},
                      SAEConfig(d_sae=12, activation="relu", decoder_norm="free"),
                      tmp_path / "abs" / "sae")
    analyze(str(tmp_path / "abs" / "sae"), str(data), tmp_path / "abs" / "out", tokens=16384,
            progress=False)
    with open(tmp_path / "abs" / "out" / "latents.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == ["parent"] * 4 + ["child"] * 8
    assert all(float(r["p_partner_given_latent"]) < 0.05 for r in rows[4:])  # exclusive now


def test_a_latent_that_always_fires_is_no_ones_parent():
    """On a real TopK SAE one latent (the mean direction) fired on every token, and every
    other latent fired "only with it": it was called the parent of 79% of the dictionary."""
    codes = np.zeros((100, 4), bool)
    codes[:, 0] = True  # always on
    codes[:30, 2] = True
    codes[20:30, 1] = True  # 1 fires only with 2 (and with 0, as everything does)
    codes[95:, 3] = True  # 3 fires with 0 alone
    t, j = np.nonzero(codes)
    i, k, count, fires = cofiring(t, j, 100, 4)
    both = taxonomy.cofiring_matrix(4, i, k, count)
    unit = np.eye(4, 8)
    out = taxonomy.partners(both, fires, np.array([[1], [0], [0], [0]]), np.zeros((4, 1)), unit,
                            tokens=100)
    assert out["partner"].tolist() == [-1, 2, -1, -1]
    assert out["p_partner"][1] == 1.0


def test_the_longest_arc_wraps_round_and_ignores_stray_bins():
    bins = taxonomy.ANGLE_BINS
    row = np.zeros((3, bins))
    row[0, [bins - 2, bins - 1, 0, 1, 2]] = 10  # 5 bins across the wrap
    row[0, 30] = 0.1  # a stray token: under 1% of the row
    row[1] = 1.0
    step = 360 / bins
    assert list(taxonomy.longest_arc(row)) == [5 * step, 360.0, 0.0]


def _planes_reference(unit, nb_idx, nb_cos, cofiring=None):
    """taxonomy.planes as it was first written: one latent at a time, an SVD per trial."""
    n, d = unit.shape
    size, energy = np.zeros(n, np.int64), np.zeros(n)
    basis = np.zeros((n, 2, d), np.float32)
    for k in range(n):
        candidates = list(nb_idx[k][nb_cos[k] > taxonomy.PARTNER_COS])
        if cofiring is not None:
            row = slice(cofiring.indptr[k], cofiring.indptr[k + 1])
            order = np.argsort(-cofiring.data[row], kind="stable")
            order = order[:taxonomy.CO_FIRING_CANDIDATES]
            candidates += [m for m in cofiring.indices[row][order] if m not in candidates]
        if len(candidates) < 2:
            continue
        group, share, vt = [k], 1.0, None
        for m in candidates:
            _, s, v = np.linalg.svd(unit[[*group, m]], full_matrices=False)
            e = float(np.sum(s[:2] ** 2) / np.sum(s**2))
            if e >= taxonomy.PLANE_ENERGY:
                group, share, vt = [*group, m], e, v[:2]
        if vt is None:
            continue
        angles = np.sort(np.degrees(np.arctan2(unit[group] @ vt[1], unit[group] @ vt[0])))
        gaps = np.diff(np.concatenate([angles, angles[:1] + 360]))
        size[k] = max(1, int(np.sum(gaps >= taxonomy.MIN_SEPARATION)))
        energy[k], basis[k] = share, vt
    return {"size": size, "energy": energy, "basis": basis, "planar": size >= 3}


def test_planes_in_lockstep_equal_one_latent_at_a_time(rng):
    """taxonomy.planes (every latent's group grown at once, shares from Gram eigenvalues)
    against the per-latent form with an SVD per trial: group sizes, shares and the planes
    themselves, on decoders with planted circles, near-duplicates and random co-firing, in
    chunks that split the latents unevenly."""
    from scipy.sparse import csr_matrix

    from jaxsae.analysis.geometry import decoder_graph

    n, d = 300, 12
    W = rng.normal(size=(n, d))
    for _ in range(8):  # circles of 3-6 latents in random planes
        plane = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
        members = rng.choice(n, size=rng.integers(3, 7), replace=False)
        angles = rng.uniform(0, 2 * np.pi, size=len(members))
        W[members] = np.stack([np.cos(angles), np.sin(angles)], 1) @ plane
        W[members] += 0.02 * rng.normal(size=(len(members), d))
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    nb_idx, nb_cos, _ = decoder_graph(W, 8, 0.99)
    counts = rng.poisson(0.05, size=(n, n)) * rng.integers(1, 50, size=(n, n))
    together = csr_matrix(counts + counts.T)
    for co in (None, together):
        want = _planes_reference(unit, nb_idx, nb_cos, co)
        got = taxonomy.planes(unit, nb_idx, nb_cos, co, chunk=70)
        assert want["planar"].sum() >= 8
        np.testing.assert_array_equal(got["size"], want["size"])
        np.testing.assert_array_equal(got["planar"], want["planar"])
        np.testing.assert_allclose(got["energy"], want["energy"], rtol=1e-5)
        span = [np.einsum("nki,nkj->nij", b, b) for b in (got["basis"], want["basis"])]
        np.testing.assert_allclose(span[0], span[1], atol=1e-4)
