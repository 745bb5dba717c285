"""Ground-truth generators (hierarchy, circles, correlated superposition), regeneration of the
true codes, and the metrics computed against them, on hand-built SAEs with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxsae import evaluate
from jaxsae.config import DataConfig, SAEConfig
from jaxsae.data import open_source, synthetic
from jaxsae.data.shards import ShardSet
from jaxsae.errors import ConfigError, DataError


def _generate(tmp_path, **raw):
    _, spec = synthetic.parse_spec(raw)
    out = synthetic.write(spec, tmp_path / raw["kind"], progress=False)
    return out, synthetic.load_truth(out)


# ---------------------------------------------------------------------------------------------
# Generators


def test_hierarchy_structure_and_firing(tmp_path):
    out, truth = _generate(tmp_path, kind="hierarchy", n_trees=3, branching=2, depth=3,
                           probs=[0.5, 0.4, 0.3], magnitudes=[1.0, 2.0, 5.0], d_in=32,
                           tokens=40000)
    spec = truth.spec
    assert spec.n_features == 3 * (1 + 2 + 4)
    parent, level = truth.arrays["parent"], truth.arrays["level"]
    assert list(parent[:3]) == [-1, -1, -1] and list(parent[3:9]) == [0, 0, 1, 1, 2, 2]
    assert list(level) == [0] * 3 + [1] * 6 + [2] * 12
    d = truth.directions.astype(np.float64)
    np.testing.assert_allclose(d @ d.T, np.eye(spec.n_features), atol=1e-5)  # orthonormal
    codes = truth.codes(0, spec.tokens)
    on = codes > 0
    children = np.flatnonzero(parent >= 0)
    assert not np.any(on[:, children] & ~on[:, parent[children]])  # child only with its parent
    for p in range(9):  # exclusive siblings never fire together
        assert not np.any(on[:, parent == p].sum(axis=1) > 1)
    roots = on[:, :3].mean(axis=0)
    np.testing.assert_allclose(roots, 0.5, atol=0.02)
    given = on[:, 3:9].sum(axis=0) / on[:, parent[3:9]].sum(axis=0)
    np.testing.assert_allclose(given, 0.4, atol=0.03)
    for lv, mag in enumerate([1.0, 2.0, 5.0]):
        values = codes[:, level == lv][on[:, level == lv]]
        np.testing.assert_allclose(values, mag)  # magnitude_std 0: exact magnitudes
    # The shards are codes @ directions (to float32 rounding: BLAS sums a block's rows in an
    # order that depends on the matrix sizes and the CPU, so the last bit may differ).
    x = ShardSet(out).read(0, spec.tokens)
    np.testing.assert_allclose(x, codes @ truth.directions, rtol=1e-6, atol=1e-6)


def test_a_parent_whose_magnitude_clips_to_zero_has_no_children_firing(tmp_path):
    """(fault testing: with magnitude_std > 0, a parent drawn at or below 0 was silent and its
    children fired; 12,387 orphan firings in 50,000 tokens); P(child | parent fires) stays."""
    _, truth = _generate(tmp_path, kind="hierarchy", n_trees=4, branching=2, depth=3,
                         probs=[0.5, 0.4, 0.5], magnitudes=[0.5, 1.0, 1.0], magnitude_std=1.0,
                         d_in=32, tokens=16384)
    parent = truth.arrays["parent"]
    on = truth.codes(0, truth.spec.tokens) > 0
    children = np.flatnonzero(parent >= 0)
    assert on[:, :4].mean() < 0.5 * 0.8  # roots clip (P(N(0.5, 1) <= 0) = 0.31)
    assert not np.any(on[:, children] & ~on[:, parent[children]])
    kids = children[:8]  # P(a child fires | its parent fires) is as drawn, before its clip
    given = on[:, kids].sum() / on[:, parent[kids]].sum()
    assert 0.4 * 0.84 * 0.9 < given < 0.4 * 0.84 * 1.1  # (its own clip: P(N(1, 1) > 0) = .84)


def test_hierarchy_small_preset(tmp_path):
    gen, spec = synthetic.parse_spec({"kind": "hierarchy_small", "tokens": 20000})
    assert (spec.n_trees, spec.branching, spec.depth, spec.d_in) == (1, 2, 2, 20)
    assert spec.probs == (0.3, 0.4) and spec.exclusive and spec.orthogonal
    assert spec.n_features == 3 and gen.defaults
    # preset values can still be overridden
    assert synthetic.parse_spec({"kind": "hierarchy_small", "d_in": 8})[1].d_in == 8


@pytest.mark.parametrize(("raw", "key"), [
    ({"probs": [0.3]}, "probs"),
    ({"magnitudes": [1.0, -1.0]}, "magnitudes"),
    ({"probs": [0.3, 0.6]}, "probs"),  # 2 exclusive children x 0.6 > 1
    ({"n_trees": 20, "d_in": 20}, "orthogonal"),  # 60 orthogonal directions in 20 dims
    ({"depth": 0}, "depth"),
])
def test_hierarchy_validation_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=rf"generate\.{key}"):
        synthetic.parse_spec({"kind": "hierarchy", **raw})


def test_circles(tmp_path):
    out, truth = _generate(tmp_path, kind="circles", n_circles=40, d_in=24, prob=0.1,
                           radius=2.0, tokens=30000)
    codes = truth.codes(0, truth.spec.tokens).reshape(-1, 40, 2)
    r = np.linalg.norm(codes, axis=-1)
    active = r > 0
    np.testing.assert_allclose(r[active], 2.0, rtol=1e-5)  # points on the circle
    assert abs(active.mean() - 0.1) < 0.01
    theta = np.arctan2(codes[..., 1], codes[..., 0])[active]
    hist, _ = np.histogram(theta, bins=8, range=(-np.pi, np.pi))
    assert hist.min() > 0.8 * hist.mean()  # θ uniform
    assert truth.directions.shape == (80, 24)
    # true_l0 counts the negative coordinates too (it counted only the positive ones, half)
    report = evaluate.truth_report(_sae(truth.directions.T, truth.directions),
                                   SAEConfig(d_sae=80, activation="relu"),
                                   open_source(DataConfig(path=str(out))), truth,
                                   start=20000)
    assert report["true_l0"] == pytest.approx(report["sb_true_l0"])
    assert report["true_l0"] == pytest.approx(np.sum(codes[20000:] != 0, axis=(1, 2)).mean())


def test_correlated_superposition_keeps_marginals_and_correlates(tmp_path):
    common = {"kind": "superposition", "n_features": 64, "d_in": 16, "tokens": 32768,
              "mean_l0": 6.0, "zipf_exponent": 0.0}
    _, plain = _generate(tmp_path / "a", **common)
    _, corr = _generate(tmp_path / "b", **common, correlation_rank=1, correlation=0.8)
    for truth in (plain, corr):
        rate = (truth.codes(0, 32768) > 0).mean(axis=0)
        np.testing.assert_allclose(rate, 6 / 64, atol=0.015)

    def mean_abs_corr(truth):
        c = np.corrcoef((truth.codes(0, 32768) > 0).T)
        return np.abs(c[~np.eye(64, dtype=bool)]).mean()

    assert mean_abs_corr(corr) > 3 * mean_abs_corr(plain)
    with pytest.raises(ConfigError, match="correlation"):
        synthetic.parse_spec({**common, "correlation": 0.5})


def test_true_codes_across_a_block_boundary(tmp_path):
    out, truth = _generate(tmp_path, kind="superposition", n_features=40, d_in=12,
                           tokens=40000, shard_tokens=7000)
    start, stop = synthetic.BLOCK_TOKENS - 300, synthetic.BLOCK_TOKENS + 500
    codes = truth.codes(start, stop)
    assert codes.shape == (800, 40)
    np.testing.assert_allclose(ShardSet(out).read(start, stop), codes @ truth.directions,
                               rtol=1e-6, atol=1e-6)  # float32 rounding, as above
    np.testing.assert_array_equal(truth.codes(0, 40000)[start:stop], codes)
    with pytest.raises(ValueError, match="outside"):
        truth.codes(0, 40001)


def test_load_truth_errors(tmp_path):
    with pytest.raises(DataError, match=r"truth\.json: not found"):
        synthetic.load_truth(tmp_path)
    out, _ = _generate(tmp_path, kind="hierarchy_small", tokens=1000)
    meta = json.loads((out / "truth.json").read_text())
    (out / "truth.json").write_text(json.dumps({**meta, "generator": "spirals"}))
    with pytest.raises(DataError, match="unknown generator 'spirals'"):
        synthetic.load_truth(out)


# ---------------------------------------------------------------------------------------------
# Metrics on hand-built SAEs


RELU = SAEConfig(d_sae=3, activation="relu")


def _sae(W_enc, W_dec):
    W_enc, W_dec = np.asarray(W_enc, np.float32), np.asarray(W_dec, np.float32)
    return {"W_enc": W_enc, "W_dec": W_dec, "b_enc": np.zeros(W_enc.shape[1], np.float32),
            "b_dec": np.zeros(W_dec.shape[1], np.float32)}


@pytest.fixture(scope="module")
def small_hierarchy(tmp_path_factory):
    raw = {"kind": "hierarchy_small", "tokens": 20000, "seed": 1}
    _, spec = synthetic.parse_spec(raw)
    out = synthetic.write(spec, tmp_path_factory.mktemp("h") / "h", progress=False)
    return out, synthetic.load_truth(out)


def _report(params, cfg, data, truth, **kw):
    return evaluate.truth_report(params, cfg, open_source(DataConfig(path=str(data))), truth,
                                 batch_size=4096, **kw)


def test_the_true_dictionary_scores_perfectly(small_hierarchy):
    data, truth = small_hierarchy
    d = truth.directions  # orthonormal parent, child 1, child 2
    r = _report(_sae(d.T, d), RELU, data, truth, details=True)
    for key in ("mcc", "mmcs", "uniqueness", "precision", "recall", "f1", "shrinkage",
                "parent_recall_alone", "parent_recall_with_child"):
        assert r[key] == pytest.approx(1.0, abs=1e-5), key
    assert r["l0"] == pytest.approx(r["true_l0"], rel=1e-6)
    assert r["true_l0"] == pytest.approx(0.3 * (1 + 0.8), abs=0.03)
    assert r["absorption"] == 0 and r["dead_fraction"] == 0
    assert r["parent_decoder_child_cos"] == pytest.approx(0.0, abs=1e-5)
    assert r["per_feature"]["latent"] == [0, 1, 2]
    assert r["per_parent"][0]["parent"] == 0


def test_undefined_ratios_are_null_not_zero(small_hierarchy):
    """(fault testing: a feature never active in the tokens evaluated counted as recall 0, and
    absorption over no qualifying token read 0.0, a perfect score)"""
    data, truth = small_hierarchy
    d = truth.directions
    assert (truth.codes(19980, 20000)[:, 2] == 0).all()  # child 2 is silent in these tokens
    r = _report(_sae(d.T, d), RELU, data, truth, start=19980, details=True)
    assert r["recall"] == r["precision"] == r["f1"] == pytest.approx(1.0)  # (not 2/3)
    assert np.isnan(r["per_feature"]["recall"][2]) and np.isnan(r["per_feature"]["f1"][2])
    assert (truth.codes(19999, 20000) == 0).all()  # nothing is active in the last token
    r = _report(_sae(d.T, d), RELU, data, truth, start=19999)
    # (one token does not vary: no explained variance either, as SAELens's 1 or 0 would say)
    for key in ("recall", "precision", "f1", "absorption", "parent_recall_alone",
                "parent_recall_with_child", "sb_explained_variance"):
        assert np.isnan(r[key]), key


def test_an_sae_on_a_transcoder_s_inputs_is_measured_against_the_input_dictionary(tmp_path):
    """(fault testing: a run of an SAE on the inputs of `synth transcoder` data was refused
    before training as "not the truth of this data", its truth's directions being the
    targets', and `eval --truth` failed in a numpy matmul error.) The decoder rows are
    compared with the input dictionary, what the tokens are built from: the true one scores 1,
    and there is no encoder_mcc (a transcoder's)."""
    from jaxsae.config import config_from_dict
    from jaxsae.finish import ground_truth
    from tests.conftest import small_config_dict

    data, truth = _generate(tmp_path, kind="transcoder", n_features=4, d_in=8, d_out=6,
                            tokens=2048, mean_l0=1.0)
    d = truth.arrays["input_directions"]
    r = _report(_sae(np.linalg.pinv(d), d), SAEConfig(d_sae=4, activation="relu"), data, truth)
    for key in ("mcc", "f1", "sb_explained_variance"):
        assert r[key] == pytest.approx(1.0, abs=1e-5), key
    assert "encoder_mcc" not in r
    cfg = config_from_dict(small_config_dict(data, tmp_path / "run"))
    assert ground_truth(cfg, open_source(cfg.data)) is not None


def test_eval_shows_its_progress_over_both_passes(small_hierarchy, tmp_path, capsys):
    """(fault testing: eval --data printed nothing on long evaluations)"""
    from jaxsae import cli
    from jaxsae.export import export_sae

    data, truth = small_hierarchy
    d = truth.directions
    sae_dir = export_sae(_sae(d.T, d), RELU, tmp_path / "sae")
    assert cli.main(["eval", str(sae_dir), "--data", str(data), "--truth", str(data)]) == 0
    err = capsys.readouterr().err  # 20,000 tokens read twice: the reconstruction, the truth
    # (fault testing: "40k/40k tok" alone read as twice the tokens evaluated)
    assert "evaluate (2 passes over the tokens): 40k/40k tok (100%)" in err
    assert cli.main(["eval", str(sae_dir), "--data", str(data)]) == 0
    assert "evaluate: 20k/20k tok (100%)" in capsys.readouterr().err
    assert cli.main(["eval", str(sae_dir), "--data", str(data), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_full_absorption_is_detected(small_hierarchy):
    data, truth = small_hierarchy
    p, c1, c2 = truth.directions
    # The parent latent is switched off by either child; the child latents carry the parent.
    W_enc = np.stack([p - c1 - c2, c1, c2], axis=1)
    W_dec = np.stack([p, (p + c1) / np.sqrt(2), (p + c2) / np.sqrt(2)])
    r = _report(_sae(W_enc, W_dec), RELU, data, truth, details=True)
    assert r["parent_recall_alone"] == pytest.approx(1.0)
    assert r["parent_recall_with_child"] == 0.0
    assert r["absorption_full"] == pytest.approx(1.0) and r["absorption_partial"] == 0.0
    assert r["recall"] < 1.0  # the parent's latent misses the tokens its children took


def test_partial_absorption_is_detected(small_hierarchy):
    data, truth = small_hierarchy
    p, c1, c2 = truth.directions
    W_enc = np.stack([p - 0.6 * (c1 + c2), c1, c2], axis=1)  # 0.4 < half its usual 1.0
    r = _report(_sae(W_enc, np.stack([p, c1, c2])), RELU, data, truth)
    assert r["absorption_full"] == 0.0
    assert r["absorption_partial"] == pytest.approx(1.0)
    assert r["parent_recall_with_child"] == pytest.approx(1.0)


def test_partial_absorption_without_a_usual_magnitude_is_null(tmp_path):
    """(fault testing: with exclusive children that always fire with their parent (2 x 0.5),
    the parent is never active alone, so its latent has no usual magnitude to fall below
    half of, and absorption_partial read 0.0, as if measured.) It is null, and so is the
    absorption it adds to; absorption_full is still measured."""
    data, truth = _generate(tmp_path, kind="hierarchy", n_trees=1, branching=2, depth=2,
                            probs=[0.3, 0.5], magnitudes=[1.0, 1.0], d_in=8, tokens=2048)
    d = truth.directions
    r = _report(_sae(d.T, d), RELU, data, truth)
    assert np.isnan(r["parent_recall_alone"]) and r["parent_recall_with_child"] == 1.0
    assert np.isnan(r["absorption_partial"]) and np.isnan(r["absorption"])
    assert r["absorption_full"] == 0.0


def test_encoder_and_decoder_mixing(small_hierarchy):
    data, truth = small_hierarchy
    p, c1, c2 = truth.directions
    W_dec = np.stack([(p + 0.5 * c1 + 0.5 * c2), c1, c2])
    W_enc = np.stack([p, c1 - 0.5 * c2, c2 - 0.5 * c1], axis=1)
    r = _report(_sae(W_enc, W_dec), RELU, data, truth)
    assert r["parent_decoder_child_cos"] == pytest.approx(0.5 / np.sqrt(1.5), abs=1e-4)
    assert r["child_encoder_sibling_cos"] == pytest.approx(-0.5 / np.sqrt(1.25), abs=1e-4)


def test_duplicates_lower_uniqueness(small_hierarchy):
    data, truth = small_hierarchy
    d = truth.directions
    dup = np.concatenate([d, d[1:2]])  # two latents for child 1
    r = _report(_sae(dup.T, dup), SAEConfig(d_sae=4, activation="relu"), data, truth)
    assert r["uniqueness"] == pytest.approx(3 / 4)
    assert r["shrinkage"] > 1.0  # child 1 is reconstructed twice


def test_truth_reports_of_several_saes_read_the_tokens_once(small_hierarchy):
    """A sweep's final evaluation: each SAE's report is the one it gets alone, from one pass
    over the tokens and their true codes."""
    data, truth = small_hierarchy
    p, c1, c2 = truth.directions
    d = truth.directions
    saes = [(_sae(d.T, d), RELU),
            (_sae(np.stack([p - c1 - c2, c1, c2], axis=1),
                  np.stack([p, (p + c1) / np.sqrt(2), (p + c2) / np.sqrt(2)])), RELU)]
    source = open_source(DataConfig(path=str(data)))
    reads = []
    read = source.read
    source.read = lambda lo, hi: (reads.append(lo), read(lo, hi))[1]
    together = evaluate.truth_reports(saes, source, truth, batch_size=4096, details=True)
    assert reads == list(range(0, 20000, 4096))
    for (params, cfg), got in zip(saes, together, strict=True):
        assert got == _report(params, cfg, data, truth, details=True)
    assert together[0]["absorption"] == 0 and together[1]["absorption_full"] > 0.9


def test_circle_metrics():
    rng = np.random.default_rng(0)
    n, d = 4, 16
    q, _ = np.linalg.qr(rng.standard_normal((d, 2 * n)))
    directions = q.T.astype(np.float32)  # circle c spans rows 2c, 2c+1
    a, b = directions[0], directions[1]
    rows = [a, -a, b, -b]  # circle 0 covered exactly (ReLU needs both signs)
    rows += [(directions[2] + directions[3]) / np.sqrt(2)]  # one row in plane 1
    rows += [directions[4] + directions[6]]  # between planes 2 and 3: in neither
    W = np.stack(rows).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    r = evaluate.circle_metrics(_sae(W.T, W), SAEConfig(d_sae=len(rows)), directions,
                                radius=1.5)
    assert r["rows_per_plane_histogram"] == {0: 2, 1: 1, 4: 1}
    assert r["planes_covered"] == 0.5 and r["rows_per_covered_plane"] == 2.5
    assert r["rows_in_planes"] == 5
    # circle 0 reconstructed exactly, the others partly at best
    assert 0.25 < r["circle_explained_variance"] < 0.75
    # rows in no plane: no plane covered, and rows per covered plane undefined (it read 0.0)
    none = evaluate.circle_metrics(_sae(W[-1:].T, W[-1:]), SAEConfig(d_sae=1), directions,
                                   radius=1.5)
    assert none["planes_covered"] == 0.0 and none["rows_per_covered_plane"] is None


def test_truth_report_refuses_other_data(small_hierarchy, tmp_path):
    _, truth = small_hierarchy
    other, _ = _generate(tmp_path, kind="hierarchy_small", tokens=1000)
    d = truth.directions
    with pytest.raises(evaluate.NotTheTruth, match="not the data it was generated with"):
        _report(_sae(d.T, d), RELU, other, truth)


def test_training_on_generated_data_reports_the_truth(tmp_path, capsys):
    from jaxsae import cli
    from jaxsae.config import config_from_dict
    from jaxsae.train import train

    cfg = config_from_dict({
        "name": "h", "run_dir": str(tmp_path / "run"),
        "data": {"path": str(tmp_path / "data"), "eval_tokens": 4096,
                 "generate": {"kind": "hierarchy_small", "tokens": 16384}},
        "sae": {"d_sae": 3, "activation": "relu"},
        "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 0.01}],
        "optim": {"lr": 1e-2, "batch_size": 256, "total_tokens": 256 * 30, "warmup_steps": 2},
        "checkpoint": {"every_steps": 100},
        "log": {"every_steps": 10, "curves": False}})  # (drawn where tested: test_curves.py)
    result = train(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    for key in ("mcc", "f1", "uniqueness", "absorption", "parent_recall_with_child",
                "shrinkage", "explained_variance"):
        assert key in saved and key in result.eval
    assert saved["mcc"] > 0.5
    # (the command in this process: the real processes of the command line are test_cli.py's)
    capsys.readouterr()
    code = cli.main(["eval", str(result.sae_dir), "--data", str(tmp_path / "data"), "--truth",
                     str(tmp_path / "data"), "--tokens", "4096", "--details"])
    out = capsys.readouterr()
    assert code == 0, out.err
    printed = json.loads(out.out)
    assert printed["mcc"] == pytest.approx(saved["mcc"])
    assert printed["absorption"] == pytest.approx(saved["absorption"])
    assert len(printed["per_feature"]["f1"]) == 3


def test_a_truth_too_large_for_memory_is_left_out_of_training_s_evaluation(tmp_path, capsys,
                                                                          monkeypatch):
    """(fault testing: a 262,144-latent SAE's run failed at its end on the [n_true, d_sae]
    float64 matching matrix, "Unable to allocate 1.00 GiB", at every resume) Training ends,
    exported, without the ground-truth metrics, saying why; `jaxsae eval --truth` refuses in
    one line naming the matrix."""
    from jaxsae import cli
    from jaxsae.config import config_from_dict
    from jaxsae.train import train

    def too_large(directions, decoder):
        raise MemoryError("Unable to allocate 1.00 GiB")
    monkeypatch.setattr(evaluate, "cosine_matrix", too_large)
    cfg = config_from_dict({
        "name": "h", "run_dir": str(tmp_path / "run"),
        "data": {"path": str(tmp_path / "data"), "eval_tokens": 2048,
                 "generate": {"kind": "hierarchy_small", "tokens": 8192}},
        "sae": {"d_sae": 3, "activation": "relu"},
        "optim": {"batch_size": 256, "total_tokens": 256 * 4, "warmup_steps": 0},
        # (no training curves: read nowhere here)
        "checkpoint": {"every_steps": 100}, "log": {"every_steps": 2, "curves": False}})
    result = train(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "mcc" not in saved and "explained_variance" in saved
    assert (result.sae_dir / "cfg.json").is_file()
    assert ("note: the ground-truth metrics match 3 true features to 3 latents through a 3 x 3 "
            "matrix (6.71e-08 GiB in float64, and copies), which this machine's memory does "
            "not hold: the evaluation goes on without them") in capsys.readouterr().err
    code = cli.main(["eval", str(result.sae_dir), "--data", str(tmp_path / "data"),
                     "--truth", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(
        "jaxsae eval: error: the ground-truth metrics match 3 true features to 3 latents")


def test_cli_synth_presets_and_kinds(tmp_path, capsys):
    """(The command in this process: the real processes of the command line are
    test_cli.py's.)"""
    from jaxsae import cli

    for kind, extra in [("hierarchy_small", []), ("circles", ["--n-circles", "5", "--d-in",
                                                              "8"])]:
        code = cli.main(["synth", kind, "--out", str(tmp_path / kind), "--tokens", "2000",
                         "--no-progress", *extra])
        assert code == 0, capsys.readouterr().err
        assert synthetic.load_truth(tmp_path / kind).spec.kind == kind.split("_")[0]
    capsys.readouterr()
    code = cli.main(["synth", "hierarchy", "--out", str(tmp_path / "bad"), "--probs", "0.3",
                     "0.9", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "probs" in err and len(err.strip().splitlines()) == 1


def test_circles_need_a_plane():
    with pytest.raises(ConfigError, match="d_in: a circle needs a plane"):
        synthetic.CirclesSpec(n_circles=2, d_in=1)


def test_float16_tokens_one_rounding_off_are_the_truth_s_but_changed_ones_are_not(tmp_path):
    """Another backend's draw of float16 data may round a value the other way: one unit in the
    last place of a large value passed the 1e-3-of-a-typical-norm tolerance (fault testing:
    refused); a changed token is still refused, naming it. A transcoder's changed target is
    named as a target, in its own directory."""
    spec = synthetic.SuperpositionSpec(n_features=32, d_in=8, tokens=512, mean_l0=3.0,
                                       magnitude_spread=1.0, magnitude_std=1.0,
                                       dtype="float16", seed=5)
    synthetic.write(spec, tmp_path / "h", progress=False)
    truth = synthetic.load_truth(tmp_path / "h")
    names = synthetic.data_names(ShardSet(tmp_path / "h"))
    rows = ShardSet(tmp_path / "h").read(0, 512)
    row, col = np.unravel_index(np.argmax(np.abs(rows)), rows.shape)
    typical = np.sqrt(np.mean(np.sum(np.square(rows.astype(np.float64)), axis=1)))
    ulp = float(np.spacing(np.float16(abs(rows[row, col]))))
    assert ulp / typical > 1e-3  # (what the plain tolerance refused)
    nudged = rows.copy()
    nudged[row, col] = np.nextafter(np.float16(rows[row, col]), np.float16(0))
    truth.check_rows(0, nudged, names)
    nudged[row] = 0
    with pytest.raises(DataError, match=rf"{tmp_path / 'h'}: token {row:,} is not the one"):
        truth.check_rows(0, nudged, names)
    pairs = synthetic.TranscoderSpec(n_features=16, d_in=8, d_out=6, tokens=256, mean_l0=2.0)
    synthetic.write(pairs, tmp_path / "t", progress=False)
    source = open_source(DataConfig(path=str(tmp_path / "t"),
                                    target=str(tmp_path / "t" / "target")))
    rows = source.read(0, 256)
    rows[100, 8:] += 1.0  # a target changed
    with pytest.raises(DataError, match=rf"{tmp_path / 't' / 'target'}: target of token 100 "):
        synthetic.load_truth(tmp_path / "t").check_rows(0, rows, synthetic.data_names(source))
