"""The first-order optimality conditions (jaxsae.analysis.optimality), against a plain
reference: the change of the L1 dictionary-learning objective under the moves themselves,
taken by finite differences in numpy; and the seed's claim on a dictionary set at the true
features of hierarchy data."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from jaxsae import cli, export
from jaxsae.analysis import optimality as opt
from jaxsae.analysis.geometry import analyze
from jaxsae.config import SAEConfig
from jaxsae.data import synthetic
from jaxsae.errors import JaxsaeError


def _relu_sae(W_dec, W_enc, b_enc, b_dec):
    return {"W_dec": np.asarray(W_dec, np.float32), "W_enc": np.asarray(W_enc, np.float32),
            "b_enc": np.asarray(b_enc, np.float32), "b_dec": np.asarray(b_dec, np.float32)}


def _objective(x, unit, a, lam):
    r = x - a @ unit
    return (np.sum(r * r) + lam * np.sum(a)) / len(x)


def test_the_conditions_are_the_objectives_own_first_order_changes():
    rng = np.random.default_rng(0)
    n, d, tokens = 6, 5, 3000
    params = _relu_sae(rng.normal(size=(n, d)) * rng.uniform(0.5, 2, (n, 1)),
                       rng.normal(size=(d, n)) * 0.6, rng.normal(size=n) * 0.3 - 0.2,
                       rng.normal(size=d) * 0.1)
    x = (rng.normal(size=(tokens, d)) * 1.5).astype(np.float32)
    cfg = SAEConfig(d_sae=n, activation="relu")
    pairs = np.array([(a, b) for a in range(n) for b in range(a + 1, n)])
    lam = 0.37
    latents, rows, summary = opt.optimality(params, cfg, [x[:1000], x[1000:]], pairs,
                                            sparsity_weight=lam)

    # the same quantities in float64 numpy, and the moves applied for real
    W = params["W_dec"].astype(np.float64)
    norms = np.linalg.norm(W, axis=1)
    unit = W / norms[:, None]
    f = np.maximum((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], 0.0)
    a = f * norms
    xc = x - params["b_dec"]  # the decode adds b_dec back: residuals are xc - a @ unit
    r = xc - a @ unit
    implied = 2 * np.sum(a * (r @ unit.T)) / np.sum(a)
    assert summary["optimality_lambda_implied"] == pytest.approx(implied, rel=1e-4)

    eps = 1e-5
    for row in rows:
        for i, j, tilt in ((row["latent_a"], row["latent_b"], row["tilt_a_absorbs_b"]),
                           (row["latent_b"], row["latent_a"], row["tilt_b_absorbs_a"])):
            c = unit[i] @ unit[j]
            s = np.sqrt(1 - c * c)
            u = (unit[j] - c * unit[i]) / s
            both = (a[:, i] > 0) & (a[:, j] > 0)
            moved_unit, moved_a = unit.copy(), a.copy()
            moved_unit[i] = unit[i] + eps * u
            moved_unit[i] /= np.linalg.norm(moved_unit[i])
            moved_a[both, j] -= eps * a[both, i] / s
            moved_a[both, i] += eps * a[both, i] * c / s
            change = (_objective(xc, moved_unit, moved_a, lam)
                      - _objective(xc, unit, a, lam)) / eps * len(x)
            alone2 = np.sum(a[~both, i] ** 2 * (a[~both, i] > 0))
            want = 0.0 if change >= 0 else np.degrees(np.arctan(-change / (2 * alone2)))
            assert tilt == pytest.approx(want, rel=2e-3, abs=2e-3), (i, j)

    # per latent: the refit angle is the angle to the least-squares decoder given the codes
    for k, row in enumerate(latents):
        refit = (r + a[:, k:k + 1] * unit[k]).T @ a[:, k]
        cos = refit @ unit[k] / np.linalg.norm(refit)
        assert row["refit_angle_deg"] == pytest.approx(np.degrees(np.arccos(min(cos, 1.0))),
                                                       abs=1e-3)
        assert row["fires"] == int(np.sum(a[:, k] > 0))


@pytest.fixture(scope="module")
def true_feature_sae(tmp_path_factory):
    """Hierarchy data (4 trees: a parent and two mutually exclusive children, orthogonal) and
    a ReLU SAE whose encoder and decoder are exactly the true features (shrinkage 0.1)."""
    root = tmp_path_factory.mktemp("optimality")
    spec = synthetic.HierarchySpec(n_trees=4, branching=2, depth=2, probs=(0.3, 0.4),
                                   magnitudes=(1.0, 1.0), d_in=20, tokens=16384, seed=4)
    data = synthetic.write(spec, root / "data", progress=False)
    truth = synthetic.load_truth(data)
    D = truth.directions
    export.export_sae(_relu_sae(D, D.T, np.full(len(D), -0.1), np.zeros(20)),
                      SAEConfig(d_sae=len(D), activation="relu"), root / "sae")
    return root, data, truth.arrays["parent"]


def test_a_dictionary_at_the_true_features_of_a_hierarchy_is_no_local_optimum(true_feature_sae):
    root, data, parent = true_feature_sae
    summary = analyze(str(root / "sae"), str(data), root / "out", tokens=8192,
                      optimality=True, progress=False)
    assert summary["optimality_lambda"] == pytest.approx(0.2, rel=1e-3)  # 2 x the shrinkage
    with open(root / "out" / "optimality.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["latent_a", "latent_b", "stable", "margin"]
    kinds = {"parent-child": [], "siblings": [], "independent": []}
    for row in rows:
        a, b = int(row["latent_a"]), int(row["latent_b"])
        if parent[a] == b or parent[b] == a:
            kind = "parent-child"
        elif parent[a] == parent[b] != -1:
            kind = "siblings"
        else:
            kind = "independent"
        kinds[kind].append(row)
    assert len(kinds["parent-child"]) == 8 and len(kinds["siblings"]) == 4
    for row in kinds["parent-child"]:  # the child can never balance absorbing its parent
        child_absorbs = (row["tilt_b_absorbs_a"] if parent[int(row["latent_b"])] >= 0
                         else row["tilt_a_absorbs_b"])
        assert row["stable"] == "0" and float(child_absorbs) == 90.0
    for row in kinds["siblings"]:  # mutually exclusive: always stable
        assert row["stable"] == "1"
        assert float(row["margin"]) == pytest.approx(opt.MAX_TILT, abs=1e-3)
    assert kinds["independent"] and all(r["stable"] == "1" for r in kinds["independent"])
    with open(root / "out" / "optimality_latents.csv") as f:
        latents = list(csv.DictReader(f))
    assert len(latents) == len(parent) and {"refit_angle_deg", "stationary"} <= set(latents[0])
    assert (root / "out" / "optimality.png").is_file()
    assert "Optimality" in (root / "out" / "index.html").read_text()


@pytest.mark.parametrize("weight", ["-1", "inf", "nan"])
def test_analyze_refuses_a_sparsity_weight_that_is_no_weight(true_feature_sae, tmp_path,
                                                             capsys, weight):
    """(fault testing: inf was taken, every pair found unstable, and the summary said null)"""
    root, data, _ = true_feature_sae
    argv = ["analyze", str(root / "sae"), "--data", str(data), "--out", str(tmp_path / "o"),
            "--optimality", "--sparsity-weight", weight, "--no-progress"]
    assert cli.main(argv) == 2
    assert "--sparsity-weight: must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nothing_is_reported_where_no_latent_fires(true_feature_sae, tmp_path):
    """(fault testing: an SAE whose latents never fire was reported with a sparsity weight,
    a stationary fraction and refit angles of 0.0, none of them measured)"""
    root, data, _ = true_feature_sae
    loaded = export.load_sae(root / "sae")
    silent = {**loaded.params, "b_enc": np.full_like(loaded.params["b_enc"], -1e6)}
    export.export_sae(silent, loaded.sae, tmp_path / "silent")
    summary = analyze(str(tmp_path / "silent"), str(data), tmp_path / "out", tokens=2048,
                      optimality=True, progress=False)
    for key in ("optimality_lambda", "optimality_lambda_implied", "stationary_fraction",
                "median_refit_angle_deg"):
        assert summary[key] is None, key
    with open(tmp_path / "out" / "optimality_latents.csv") as f:
        latents = list(csv.DictReader(f))
    assert {(r["lambda"], r["refit_angle_deg"]) for r in latents} == {("", "")}
    assert "no latent fired" in (tmp_path / "out" / "index.html").read_text()


@pytest.mark.parametrize("threshold", ["2", "nan", "0"])
def test_analyze_refuses_a_cluster_threshold_that_is_no_cosine(true_feature_sae, tmp_path,
                                                                capsys, threshold):
    root, data, _ = true_feature_sae
    argv = ["analyze", str(root / "sae"), "--data", str(data), "--out", str(tmp_path / "o"),
            "--cluster-threshold", threshold, "--no-progress"]
    assert cli.main(argv) == 2
    assert "--cluster-threshold" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sums_past_float32s_range_are_refused_not_reported():
    """(fault testing: on tokens of norm ~1e10 the per-latent sum of a²|r|² overflowed to inf,
    its noise estimate was inf - inf, and every latent was reported stationary with z = 0.)
    Such sums are refused in one line naming the data and the sums."""
    rng = np.random.default_rng(0)
    n, d = 6, 5
    params = _relu_sae(rng.normal(size=(n, d)), rng.normal(size=(d, n)) * 0.6,
                       np.zeros(n), np.zeros(d))
    x = (rng.normal(size=(1000, d)) * 1e10).astype(np.float32)
    with pytest.raises(JaxsaeError, match=r"^acts: the block sums .*a2_r2.* pass float32's "
                                          r"range .* too large to test the optimality"):
        opt.optimality(params, SAEConfig(d_sae=n, activation="relu"), [x],
                       np.array([(0, 1)]), data="acts")

