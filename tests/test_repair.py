"""`jaxsae repair` (jaxsae.analysis.repair): the projection on its own, and an absorbed
dictionary made by hand taken back to the true features, with the ground-truth absorption and
parent recall measured before and after."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxsae import cli, export
from jaxsae.analysis import repair
from jaxsae.config import SAEConfig
from jaxsae.data import synthetic


def test_the_projection_against_its_definition():
    rng = np.random.default_rng(0)
    d_in, d_sae = 10, 6
    params = {"W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
              "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
              "b_enc": rng.normal(size=d_sae).astype(np.float32)}
    pairs = [(3, 0), (4, 0), (5, 1)]
    out = repair.repaired(params, pairs)
    W_dec, W_enc = params["W_dec"].astype(np.float64), params["W_enc"].astype(np.float64)
    for child, parent in pairs:  # the child's decoder: nothing left along the parent's
        u = W_dec[parent] / np.linalg.norm(W_dec[parent])
        assert abs(out["W_dec"][child] @ u) < 1e-5
        rest = out["W_dec"][child] - W_dec[child]
        assert np.allclose(rest, -(W_dec[child] @ u) * u, atol=1e-5)  # and only that removed
    u0 = W_dec[0] / np.linalg.norm(W_dec[0])
    kids = np.stack([W_enc[:, c] - (W_enc[:, c] @ u0) * u0 for c in (3, 4)], 1)
    q, _ = np.linalg.qr(kids)  # the span of parent 0's children, off its decoder direction
    assert np.allclose(q.T @ out["W_enc"][:, 0], 0, atol=1e-5)
    assert np.allclose(out["W_enc"][:, 0], W_enc[:, 0] - q @ (q.T @ W_enc[:, 0]), atol=1e-5)
    # untouched: decoders of parents and bystanders, encoders of children, biases
    assert np.array_equal(out["W_dec"][[0, 1, 2]], params["W_dec"][[0, 1, 2]])
    assert np.array_equal(out["W_enc"][:, 2:], params["W_enc"][:, 2:])
    assert np.array_equal(out["b_enc"], params["b_enc"])
    assert not np.allclose(out["W_enc"][:, 1], W_enc[:, 1])  # parent 1: repaired
    assert repair.pairs_from_latents([
        {"latent": "3", "kind": "child", "partner": "0"},
        {"latent": "4", "kind": "parent", "partner": "3"},
        {"latent": "5", "kind": "child", "partner": "-1"}]) == [(3, 0)]


@pytest.fixture(scope="module")
def absorbed(tmp_path_factory):
    """Hierarchy data and an SAE whose children absorbed their parents: each child latent's
    decoder carries its parent's direction, each parent's encoder reads its children
    negatively, so the parent latent is silent whenever a child fires."""
    root = tmp_path_factory.mktemp("absorbed")
    spec = synthetic.HierarchySpec(n_trees=4, branching=2, depth=2, probs=(0.06, 0.4),
                                   magnitude_std=0.05, d_in=24, tokens=16384, seed=3)
    data = synthetic.write(spec, root / "data", progress=False)
    D = spec.truth()["directions"]
    parent = np.repeat(np.arange(4), 2)
    W_dec = np.concatenate([D[:4], D[4:] + D[parent]]).astype(np.float32)
    W_enc = np.concatenate([D[:4] - D[4:].reshape(4, 2, -1).sum(1), D[4:]]).T
    export.export_sae({"W_dec": W_dec, "W_enc": W_enc.astype(np.float32),
                       "b_enc": np.full(12, -0.3, np.float32),
                       "b_dec": np.zeros(24, np.float32)},
                      SAEConfig(d_sae=12, activation="relu", decoder_norm="free"), root / "sae")
    return root, data, D


@pytest.mark.usefixtures("no_analysis_figures")  # (reads no figure: test_geometry.py does)
def test_repair_undoes_absorption(absorbed, capsys):
    root, data, D = absorbed
    out = root / "out"
    cfg_file = root / "sae" / export.CFG_FILE
    cfg_json = json.loads(cfg_file.read_text())
    cfg_json["metadata"] = {**cfg_json.get("metadata", {}), "eval_l0": 2.0}
    cfg_file.write_text(json.dumps(cfg_json))  # the absorbed SAE's own evaluation
    assert cli.main(["repair", str(root / "sae"), "--data", str(data), "--truth", str(data),
                     "--out", str(out), "--tokens", "16384", "--no-progress"]) == 0
    report = json.loads((out / "repair.json").read_text())
    printed = json.loads(capsys.readouterr().out.split("\n8 pairs repaired")[0])
    assert printed == {k: report[k] for k in ("before", "after")}
    assert sorted((p["child"], p["parent"]) for p in report["pairs"]) == [
        (4 + i, i // 2) for i in range(8)]
    before, after = report["before"], report["after"]
    assert before["parent_recall_with_child"] < 0.05 and before["absorption"] > 0.9
    assert after["parent_recall_with_child"] > 0.95 and after["absorption"] < 0.05
    assert after["explained_variance"] >= before["explained_variance"] - 0.01
    assert after["mcc"] > 0.99
    fixed = export.load_sae(str(out / "sae")).params
    cos = np.sum(fixed["W_dec"] * D, 1) / np.linalg.norm(fixed["W_dec"], axis=1)
    assert cos.min() > 0.99  # the dictionary is back at the true features
    assert (out / "analysis" / "latents.csv").exists()
    assert "| after |" in (out / "repair.md").read_text()
    assert "eval_l0" not in json.loads((out / "sae" / export.CFG_FILE).read_text())["metadata"]
    # its latents' firing, measured on the tokens `after` evaluates (fault testing: every
    # latent written as dead, -10)
    sparsity = load_file(str(out / "sae" / "sparsity.safetensors"))["sparsity"]
    assert np.sum(10.0 ** sparsity.astype(np.float64) - 1e-10) == pytest.approx(after["l0"],
                                                                                 rel=1e-4)


def test_bad_input_changes_nothing(absorbed, capsys):
    root, data, _ = absorbed
    keep = root / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    assert cli.main(["repair", str(root / "sae"), "--data", str(data), "--out", str(keep),
                     "--no-progress"]) == 2
    assert "keep" in capsys.readouterr().err
    assert [p.name for p in keep.iterdir()] == ["mine.txt"]
    assert cli.main(["repair", str(root / "nothing"), "--data", str(data), "--out",
                     str(root / "o2"), "--no-progress"]) == 2
    assert "nothing" in capsys.readouterr().err and not (root / "o2").exists()
    W = export.load_sae(str(root / "sae")).params["W_dec"]
    export.export_sae({"W_dec": W, "b_dec": np.zeros(24, np.float32)},
                      SAEConfig(d_sae=12, activation="matching_pursuit", k=2), root / "mp")
    assert cli.main(["repair", str(root / "mp"), "--data", str(data), "--out",
                     str(root / "o3"), "--no-progress"]) == 2
    assert "needs an encoder" in capsys.readouterr().err and not (root / "o3").exists()
