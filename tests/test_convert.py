"""TopK SAEs as JumpReLU SAEs (jaxsae.analysis.convert; `jaxsae convert`; frankenstein on
TopK families): the calibrated thresholds against a plain search over every threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SMALL_SPEC
from safetensors.numpy import load_file

from jaxsae import cli, export
from jaxsae.analysis import convert
from jaxsae.analysis.stitch import frankenstein
from jaxsae.config import DataConfig, SAEConfig
from jaxsae.data import open_source


def _topk_sae(path, n_latents: int, k: int, seed: int):
    """A TopK SAE whose latents are the data's true directions (and noisy copies)."""
    rng = np.random.default_rng(seed)
    D = SMALL_SPEC.truth()["directions"]
    W = D[np.arange(n_latents) % len(D)] + 0.2 * rng.standard_normal((n_latents, D.shape[1]))
    W = (W / np.linalg.norm(W, axis=1, keepdims=True)).astype(np.float32)
    export.export_sae({"W_dec": W, "W_enc": W.T.copy(),
                       "b_enc": rng.normal(0, 0.05, n_latents).astype(np.float32),
                       "b_dec": np.zeros(D.shape[1], np.float32)},
                      SAEConfig(d_sae=n_latents, activation="topk", k=k), path)
    return export.load_sae(path)


def test_thresholds_reproduce_topk_firing_as_well_as_any_threshold(small_data, tmp_path):
    loaded = _topk_sae(tmp_path / "topk", 48, 3, 0)
    x = open_source(DataConfig(path=str(small_data))).read(0, 3072)
    threshold = convert.calibrate(loaded.params, loaded.sae, lambda: [x[:1536], x[1536:]])
    p = loaded.params
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    top = np.argsort(-pre, axis=1)[:, :3]
    kept = np.zeros_like(pre, bool)
    np.put_along_axis(kept, top, True, axis=1)
    kept &= pre > 0
    width = pre.max(0) / convert.BINS
    for i in range(48):
        def errors(t, i=i):
            fires = (pre[:, i] > 0) & (pre[:, i] >= t)
            return int(np.sum(fires != kept[:, i]))
        # the fewest errors of any threshold: 0 and every value seen. errors(t) counted at all
        # of them at once (kept values below t, plus positive unkept ones at or above it; the
        # kept are all positive), not one pass over the tokens each (3073 a latent: seconds)
        candidates = np.concatenate([[0.0], np.unique(pre[:, i])])
        unkept = np.sort(pre[(pre[:, i] > 0) & ~kept[:, i], i])
        below = np.searchsorted(np.sort(pre[kept[:, i], i]), candidates, side="left")
        counts = len(unkept) - np.searchsorted(unkept, candidates, side="left") + below
        if i == 0:  # (the count, against errors() itself)
            assert counts.tolist() == [errors(t) for t in candidates]
        best = int(counts.min())
        # optimal up to the calibration's bin width: no threshold within a bin does better
        near = min(errors(t) for t in (threshold[i] - width[i], threshold[i],
                                       threshold[i] + width[i]))
        assert errors(threshold[i]) <= best + 2 * np.sum(
            np.abs(pre[:, i] - threshold[i]) <= width[i]), i
        assert near >= best


def test_convert_command_and_a_topk_family_in_frankenstein(small_data, tmp_path, capsys,
                                                          monkeypatch):
    _topk_sae(tmp_path / "small", 24, 3, 1)
    _topk_sae(tmp_path / "large", 64, 4, 2)
    # the source's own evaluation, which describes it and not what convert makes of it
    cfg_file = tmp_path / "small" / export.CFG_FILE
    cfg_json = json.loads(cfg_file.read_text())
    cfg_json["metadata"] = {**cfg_json.get("metadata", {}), "eval_l0": 3.0,
                            "eval_explained_variance": 0.9, "training_tokens": 1234}
    cfg_file.write_text(json.dumps(cfg_json))
    out = tmp_path / "converted"
    monkeypatch.chdir(tmp_path)  # (the source given relative: recorded absolute)
    argv = ["convert", "small", "--data", str(small_data), "--out", str(out),
            "--tokens", "4096", "--batch-size", "1024", "--no-progress"]
    assert cli.main(argv) == 0
    report = json.loads((out / "convert.json").read_text())
    # the reported change, recomputed in numpy on the same (last 4096) tokens
    x = open_source(DataConfig(path=str(small_data))).read(SMALL_SPEC.tokens - 4096,
                                                           SMALL_SPEC.tokens)
    topk, jump = export.load_sae(tmp_path / "small").params, export.load_sae(out / "sae")
    assert jump.sae.activation == "jumprelu"
    written = json.loads((out / "sae" / export.CFG_FILE).read_text())
    assert written["jaxsae"]["decoder_norm"] == "unit"  # the TopK SAE's unit rows
    assert written["jaxsae"]["converted_from"] == str(tmp_path / "small")
    metadata = written["metadata"]
    assert metadata["training_tokens"] == 1234 and not any(k.startswith("eval_")
                                                           for k in metadata)
    pre = (x - topk["b_dec"]) @ topk["W_enc"] + topk["b_enc"]
    kept = np.zeros_like(pre, bool)
    np.put_along_axis(kept, np.argsort(-pre, axis=1)[:, :3], True, axis=1)
    kept &= pre > 0
    fires = (pre > 0) & (pre > jump.params["threshold"])
    assert report["l0_topk"] == pytest.approx(kept.sum(1).mean())
    assert report["l0_jumprelu"] == pytest.approx(fires.sum(1).mean(), rel=1e-3)
    assert report["recall_of_topk_codes"] == pytest.approx((kept & fires).sum() / kept.sum(),
                                                           rel=1e-3)
    assert report["precision"] == pytest.approx((kept & fires).sum() / fires.sum(), rel=1e-3)
    # each latent's firing on these tokens (fault testing: every latent written as dead, -10)
    np.testing.assert_allclose(_sparsity(out / "sae"),
                               np.log10(fires.mean(0) + 1e-10), atol=2e-3)
    # explained variance about the mean of all 4096 tokens (not of each block of 1024)
    codes = np.where(kept, pre, 0.0)
    sse = np.sum((x - codes @ topk["W_dec"] - topk["b_dec"]) ** 2)
    total = np.sum((x - x.mean(axis=0)) ** 2)
    assert 1 - report["explained_variance_topk"] == pytest.approx(sse / total, rel=1e-5)
    capsys.readouterr()
    # not a TopK SAE: refused, nothing written
    assert cli.main(["convert", str(out / "sae"), "--data", str(small_data), "--out",
                     str(tmp_path / "again")]) == 2
    assert "TopK" in capsys.readouterr().err and not (tmp_path / "again").exists()

    rows = frankenstein([str(tmp_path / "small"), str(tmp_path / "large")], str(small_data),
                        tmp_path / "frank", retrain_decoder_tokens=0, tokens=4096,
                        batch_size=1024, progress=False)
    md = (tmp_path / "frank" / "frankenstein.md").read_text()
    assert "converted to JumpReLU" in md and "recall_of_topk_codes" in md
    assert rows[-1]["architecture"] == "jumprelu" and rows[-1]["d_sae"] >= 24
    # the stitched SAE's sparsity, measured on the tokens its row of the table evaluates
    frequency = 10.0 ** _sparsity(tmp_path / "frank" / "stitched") - 1e-10
    assert frequency.sum() == pytest.approx(rows[-1]["l0"], rel=1e-4)


def _sparsity(sae_dir):
    return load_file(str(sae_dir / "sparsity.safetensors"))["sparsity"].astype(np.float64)


def test_convert_refuses_data_too_short_to_calibrate(small_data, tmp_path):
    _topk_sae(tmp_path / "t", 24, 3, 3)
    with pytest.raises(Exception, match="calibrate"):
        convert.convert_dir(str(tmp_path / "t"), str(small_data), tmp_path / "o",
                            tokens=SMALL_SPEC.tokens)
    # data of one token with the default --tokens: the data is named, not a --tokens 0
    from jaxsae.data.shards import ShardSet, ShardWriter

    with ShardWriter(tmp_path / "one", 16) as writer:
        writer.write(ShardSet(small_data).read(0, 1))
    with pytest.raises(Exception, match=r"one: 1 token\(s\) are too few to convert on"):
        convert.convert_dir(str(tmp_path / "t"), str(tmp_path / "one"), tmp_path / "o")


def test_ratios_with_nothing_to_count_are_null(small_data, tmp_path):
    """(fault testing: an SAE none of whose latents fired reported recall and precision 0.0)"""
    loaded = _topk_sae(tmp_path / "t", 24, 3, 3)
    silent = {**loaded.params, "b_enc": np.full(24, -1e3, np.float32)}
    x = open_source(DataConfig(path=str(small_data))).read(0, 512)
    report = convert.compare(export.LoadedSAE(**{**vars(loaded), "params": silent}), silent,
                             loaded.sae, [x])
    assert report["l0_topk"] == 0 and report["l0_jumprelu"] == 0
    assert report["recall_of_topk_codes"] is None and report["precision"] is None


def test_the_comparison_measures_reconstructions_as_eval_does(small_data, tmp_path):
    """(fault testing: a token near 1e30 overflowed the float32 sums here: an explained
    variance of null, where `jaxsae eval` measured one on the same tokens)"""
    from jaxsae import evaluate

    loaded = _topk_sae(tmp_path / "t", 24, 3, 3)
    x = np.array(open_source(DataConfig(path=str(small_data))).read(0, 512))
    x[7] = 1e30
    report = convert.compare(loaded, loaded.params, loaded.sae, [x[:256], x[256:]])
    measured = evaluate.reconstruction_metrics(loaded.params, loaded.sae, [x[:256], x[256:]])
    assert np.isfinite(measured["explained_variance"])
    assert report["explained_variance_topk"] == measured["explained_variance"]
    assert report["explained_variance_jumprelu"] == measured["explained_variance"]
    assert report["l0_topk"] == pytest.approx(measured["l0"])


def test_the_comparison_counts_codes_as_a_plain_encode_does(small_data, tmp_path):
    """The one pass that measures both SAEs and their agreement, against each SAE's codes
    from a plain `sae.encode` of every token."""
    from jaxsae import sae

    loaded = _topk_sae(tmp_path / "t", 24, 3, 3)
    x = np.array(open_source(DataConfig(path=str(small_data))).read(0, 512))
    other = {**loaded.params, "b_enc": loaded.params["b_enc"] + np.linspace(-0.3, 0.3, 24,
                                                                            dtype=np.float32)}
    report = convert.compare(loaded, other, loaded.sae, [x[:200], x[200:]])
    on_a = np.asarray(sae.encode(loaded.params, x, loaded.sae)) > 0
    on_b = np.asarray(sae.encode(other, x, loaded.sae)) > 0
    assert 0 < (on_a & on_b).sum() < on_a.sum()
    assert report["recall_of_topk_codes"] == pytest.approx((on_a & on_b).sum() / on_a.sum())
    assert report["precision"] == pytest.approx((on_a & on_b).sum() / on_b.sum())
    assert report["l0_jumprelu"] == pytest.approx(on_b.sum() / len(x))
    np.testing.assert_allclose(report["firing_frequency"], on_b.mean(0))
