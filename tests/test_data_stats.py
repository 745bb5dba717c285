"""Normalisation (unit mean squared norm), outlier dropping, and `jaxsae data inspect`."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from jaxsae import sae, tensorfile
from jaxsae import train as train_mod
from jaxsae.checkpoint import Checkpointer
from jaxsae.config import CheckpointConfig, DataConfig, SAEConfig
from jaxsae.data.inspect import format_summary, inspect
from jaxsae.data.shards import ShardSet, ShardWriter
from jaxsae.data.stats import estimate, sample_evenly
from jaxsae.errors import ConfigError, DataError
from jaxsae.export import load_sae
from tests.conftest import small_config, train_until_crash, watched_loader

D_IN = 16


@pytest.fixture(scope="module")
def outlier_data(tmp_path_factory):
    """Superposition-like data at norm ~3 with every 50th token an 'attention sink' 100x larger."""
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((48, D_IN))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = (rng.random((16384, 48)) < 3 / 48) * 3.0
    x = (codes @ directions).astype(np.float32)
    x[::50] = 300.0 * directions[0]  # norm 300, about 100x the median
    out = tmp_path_factory.mktemp("outliers") / "data"
    with ShardWriter(out, D_IN, shard_tokens=4096) as w:
        w.write(x)
    return out, x


def test_estimate_scale_and_threshold(outlier_data):
    path, x = outlier_data
    source = ShardSet(path)
    cfg = DataConfig(path=str(path), normalize="unit_mean_squared_norm", drop_norm_above=10.0,
                     stats_tokens=16384)
    stats = estimate(source, source.n_tokens, cfg)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert stats.median_norm == pytest.approx(np.median(norms), rel=1e-6)
    assert stats.drop_above == pytest.approx(10 * stats.median_norm)
    kept = norms[norms <= stats.drop_above]
    assert len(kept) == len(norms) - len(norms[::50])
    assert stats.scale == pytest.approx(np.sqrt(D_IN / np.mean(kept**2)), rel=1e-6)
    keep = stats.keep_fn()(x)
    np.testing.assert_array_equal(keep, norms <= stats.drop_above)
    plain = estimate(source, source.n_tokens, DataConfig(path=str(path)))
    assert plain.scale == 1.0 and plain.drop_above is None and plain.keep_fn() is None


def test_a_statistics_sample_beyond_memory_names_data_stats_tokens(outlier_data, monkeypatch):
    """(fault testing: data.stats_tokens: 1e9, on 3M tokens beyond a 1.5 GiB memory limit,
    ended in "out of memory ...: the sizes asked for (sae.d_sae, optim.batch_size, ...)",
    none of which sizes the sample.) The refusal names data.stats_tokens, in one line."""
    path, _ = outlier_data
    source = ShardSet(path)

    def full(*args, **kwargs):
        raise MemoryError("Unable to allocate 732. MiB for an array")

    monkeypatch.setattr("jaxsae.data.stats.sample_evenly", full)
    with pytest.raises(ConfigError, match=r"^data\.stats_tokens: 16,384 tokens sampled for the "
                                          r"data's statistics need more memory than this machine "
                                          r"has \(Unable to allocate 732\. MiB.*the default, "
                                          r"65,536"):
        estimate(source, source.n_tokens, DataConfig(path=str(path), stats_tokens=10**9))


def test_a_range_no_larger_than_the_sample_is_read_whole(outlier_data):
    """The statistics of a range holding no more tokens than the sample are those of all its
    tokens (fault testing: 64 pieces of n // 64 tokens left up to 63 out, 63 of 127 in a
    small --tokens window, so eval's median_norm was not the evaluated tokens')."""
    path, x = outlier_data
    source = ShardSet(path)
    for start, stop in [(0, 127), (1000, 2500), (5, 16384)]:
        np.testing.assert_array_equal(sample_evenly(source, stop, 65536, start=start),
                                      x[start:stop])
    assert len(sample_evenly(source, 16384, 1000)) == 64 * (1000 // 64)  # (spread: as before)
    cfg = DataConfig(path=str(path), normalize="unit_mean_squared_norm", stats_tokens=16384)
    stats = estimate(source, 1500, cfg)
    assert stats.median_norm == np.median(np.linalg.norm(x[:1500].astype(np.float64), axis=1))


def test_tokens_whose_squared_norm_overflows_are_refused_before_training(tmp_path):
    """(fault testing: such data trained in normalised units; the evaluation in raw units was
    inf and reported as a diverged training that a lower learning rate would fix)"""
    x = np.random.default_rng(0).standard_normal((4096, D_IN)).astype(np.float32)
    x[3000] *= 1e19  # a norm of some 1e19 x 4: its square is beyond float32
    with ShardWriter(tmp_path / "data", D_IN, shard_tokens=2048) as w:
        w.write(x)
    source = ShardSet(tmp_path / "data")
    cfg = DataConfig(path=str(tmp_path / "data"), normalize="unit_mean_squared_norm",
                     stats_tokens=4096)
    with pytest.raises(DataError, match=r"shard-00001\.npy: row 952: a token of norm "
                                        r"\d\S*e\+19, whose square overflows float32 "
                                        r"\(norms from 1\.84e\+19\)"):
        estimate(source, 4096, cfg)
    dropped = estimate(source, 4096, DataConfig(path=cfg.path, drop_norm_above=10.0,
                                                stats_tokens=4096))  # left out: trains
    assert dropped.drop_above == pytest.approx(10 * dropped.median_norm)


def test_held_out_tokens_are_checked_before_training(tmp_path):
    """NaN or an overflowing norm among the held-out tokens is refused naming its file and
    row, a transcoder's target by the target's file (fault testing: the input's was named)."""
    from jaxsae.data.source import PairedSource
    from jaxsae.data.stats import check_held_out

    x = np.random.default_rng(0).standard_normal((4096, D_IN)).astype(np.float32)
    for name in ("x", "y"):
        with ShardWriter(tmp_path / name, D_IN, shard_tokens=2048) as w:
            w.write(x)
    y = np.load(tmp_path / "y" / "shard-00001.npy")
    y[1000] *= 1e20
    np.save(tmp_path / "y" / "shard-00001.npy", y)
    paired = PairedSource(ShardSet(tmp_path / "x"), ShardSet(tmp_path / "y"))
    cfg = DataConfig(path=str(tmp_path / "x"))
    check_held_out(paired, 3500, cfg)  # (row 3048 is a training token)
    with pytest.raises(DataError, match=r"y/shard-00001\.npy: row 1000: a norm whose square "
                                        r"overflows float32 .*among the 2,000 tokens held out"):
        check_held_out(paired, 2096, cfg)
    check_held_out(paired, 2096, DataConfig(path=cfg.path, drop_norm_above=10.0))
    y[1000] = np.nan
    np.save(tmp_path / "y" / "shard-00001.npy", y)
    paired = PairedSource(ShardSet(tmp_path / "x"), ShardSet(tmp_path / "y"))
    with pytest.raises(DataError, match=r"y/shard-00001\.npy: non-finite values \(NaN or inf\) "
                                        r"in row 1000 \(1 token of .*\(among the 2,000 tokens"):
        check_held_out(paired, 2096, cfg)


def test_a_zero_median_norm_refuses_dropping_and_is_no_multiple(tmp_path):
    """Mostly-zero tokens: 10x a zero median would drop every other token (fault testing: a
    run trained on zeros and reported L0 0), and max / median was printed as 2.6e30."""
    x = np.zeros((4096, D_IN), np.float32)
    x[::4, 0] = 1.0
    with ShardWriter(tmp_path / "zeros", D_IN, shard_tokens=4096) as w:
        w.write(x)
    source = ShardSet(tmp_path / "zeros")
    with pytest.raises(DataError, match=r"data\.drop_norm_above: the median token norm"):
        estimate(source, source.n_tokens, DataConfig(path=str(tmp_path / "zeros"),
                                                     drop_norm_above=10.0))
    assert estimate(source, source.n_tokens, DataConfig(path=str(tmp_path / "zeros")))
    assert inspect(tmp_path / "zeros", progress=False)["norm"]["max_over_median"] is None


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("tied", [False, True])
def test_folding_the_scale_keeps_codes_and_rescales_outputs(activation, tied, rng):
    cfg = SAEConfig(d_sae=32, activation=activation, k=4, tied=tied, decoder_norm="free")
    params = sae.init_params(jax.random.PRNGKey(0), D_IN, cfg)
    params = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
              for k, v in params.items()}
    x = np.abs(rng.standard_normal((20, D_IN))).astype(np.float32) * 7.0
    scale = 0.37
    folded = sae.fold_input_scale(params, scale)
    codes = sae.encode(params, x * scale, cfg)
    assert float(np.sum(codes > 0)) > 0
    np.testing.assert_allclose(sae.encode(folded, x, cfg), codes, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.decode(folded, codes), sae.decode(params, codes) / scale,
                               rtol=1e-5, atol=1e-5)


def test_normalised_run_exports_an_sae_for_raw_activations(outlier_data, tmp_path):
    path, x = outlier_data
    cfg = small_config(path, tmp_path / "run", data={"normalize": "unit_mean_squared_norm"})
    result = train_mod.train(cfg, progress=False)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", CheckpointConfig())
    saved, _ = ckpt.restore_meta(ckpt.latest_step())
    ckpt.close()
    scale = saved["data_stats"]["scale"]
    norms_sq = np.sum(x.astype(np.float64) ** 2, axis=1)
    assert scale == pytest.approx(np.sqrt(D_IN / norms_sq.mean()), rel=0.05)
    # The exported SAE takes raw activations and reconstructs them in raw units.
    loaded = load_sae(result.sae_dir)
    raw = x[-2048:]
    codes = sae.encode(loaded.params, raw, loaded.sae)
    recon = np.asarray(sae.decode(loaded.params, codes))
    ev = 1 - np.sum((recon - raw) ** 2) / np.sum((raw - raw.mean(0)) ** 2)
    assert ev == pytest.approx(result.eval["explained_variance"], abs=1e-4)
    weights = {k: np.asarray(v) for k, v in tensorfile.read(
        result.sae_dir / "sae_weights.safetensors").items()}
    assert not np.allclose(weights["W_enc"], weights["W_dec"].T)  # scale folded in


def test_held_out_tokens_all_dropped_are_refused_before_training(outlier_data, tmp_path):
    """(fault testing: data whose last data.eval_tokens tokens all lie above
    data.drop_norm_above trained to its last step, then its evaluation refused "every one of
    the 10 tokens evaluated has a norm above ...", and so did every rerun.) The run is
    refused before training, naming the keys, and leaves no run directory."""
    _, x = outlier_data
    x = x.copy()
    x[-16:] = x[0]  # (a sink: norm 300, 100x the median)
    with ShardWriter(tmp_path / "data", D_IN, shard_tokens=4096) as w:
        w.write(x)
    cfg = small_config(tmp_path / "data", tmp_path / "run",
                       data={"eval_tokens": 16, "drop_norm_above": 10.0})
    with pytest.raises(ConfigError, match=r"^data\.drop_norm_above: every one of the 16 tokens "
                                          r"held out for the evaluation at the end of the run "
                                          r"\(data\.eval_tokens\) has a norm above .*checked "
                                          r"before training"):
        train_mod.train(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_dropping_outliers_is_logged_and_resumes_exactly(outlier_data, tmp_path, monkeypatch):
    path, x = outlier_data
    sections = {"data": {"drop_norm_above": 10.0, "normalize": "unit_mean_squared_norm"}}
    straight = small_config(path, tmp_path / "straight", **sections)
    train_mod.train(straight, progress=False)
    lines = [json.loads(v) for v in (tmp_path / "straight" / "metrics.jsonl").read_text()
             .splitlines()]
    assert lines[-1]["dropped_tokens"] > 0
    # The final evaluation leaves out the tokens training dropped (every 50th is a sink).
    ev = json.loads((tmp_path / "straight" / "eval.json").read_text())
    held_out = x[-2048:]
    kept = held_out[np.linalg.norm(held_out, axis=1) < 100]
    assert ev["dropped_tokens"] == 2048 - len(kept) > 0 and ev["tokens"] == len(kept)
    loaded = load_sae(tmp_path / "straight" / "sae")
    recon = np.asarray(sae.decode(loaded.params, sae.encode(loaded.params, kept, loaded.sae)))
    want = 1 - np.sum((recon - kept) ** 2) / np.sum((kept - kept.mean(0)) ** 2)
    assert ev["explained_variance"] == pytest.approx(want, abs=1e-4)

    seen = []
    crashed = small_config(path, tmp_path / "crashed", **sections)
    train_until_crash(crashed, 13, on_batch=seen.append)
    train_mod.train(crashed, progress=False, make_loader=watched_loader(on_batch=seen.append))
    big = np.linalg.norm(np.concatenate(seen), axis=1).max()
    assert big < 10 * np.median(np.linalg.norm(x, axis=1))  # no sink reached training
    a = tensorfile.read(tmp_path / "straight" / "sae" / "sae_weights.safetensors")
    b = tensorfile.read(tmp_path / "crashed" / "sae" / "sae_weights.safetensors")
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    # (fault testing: the resumed run's dropped_tokens started from 0 again)
    logged = [[(line["step"], line["dropped_tokens"]) for line in map(json.loads, (
        tmp_path / run / "metrics.jsonl").read_text().splitlines())] for run in ("straight",
                                                                                "crashed")]
    assert logged[0] == logged[1]


def test_inspect_summary_and_refusal(outlier_data, tmp_path, monkeypatch):
    path, x = outlier_data
    summary = inspect(path, progress=False)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert (summary["format"], summary["tokens"], summary["d_in"], summary["dtype"]) == (
        "shards", len(x), D_IN, "float32")
    assert summary["files"] == 4
    assert summary["norm"]["max"] == pytest.approx(norms.max(), rel=1e-5)
    assert summary["norm"]["mean"] == pytest.approx(norms.mean(), rel=1e-5)
    assert summary["norm"]["median"] == pytest.approx(np.median(norms), rel=1e-3)
    assert summary["unlisted"] == [] and "unlisted" not in format_summary(summary)
    assert summary["norm"]["quantile_tokens"] == len(x) and "evenly" not in format_summary(
        summary)
    # (fault testing: beyond 2^21 tokens the median and p99 are a strided sample's, and were
    # printed as if they were all the tokens')
    monkeypatch.setattr("jaxsae.data.inspect._SAMPLE", 4096)
    summary = inspect(path, progress=False)
    sample = norms[::len(x) // 4096]
    assert summary["norm"]["quantile_tokens"] == len(sample)
    assert summary["norm"]["p99"] == pytest.approx(np.quantile(sample, 0.99), rel=1e-6)
    assert summary["norm"]["max"] == pytest.approx(norms.max(), rel=1e-5)  # (all tokens)
    assert f"(of {len(sample):,} tokens evenly spaced)" in format_summary(summary)
    # (fault testing: a shard file the manifest does not list was passed over in silence)
    extra = shutil.copytree(path, tmp_path / "extra")
    shutil.copy(extra / "shard-00000.npy", extra / "shard-00009.npy")
    summary = inspect(extra, progress=False)
    assert summary["unlisted"] == ["shard-00009.npy"] and summary["tokens"] == len(x)
    assert ("unlisted    shard-00009.npy (not in manifest.json: never read)"
            in format_summary(summary))
    # (fault testing: a token of norm 1e30, whose squared error is inf in float32, was "valid"
    # and training then stopped at a non-finite loss without naming it)
    huge = x.copy()
    huge[[5000, 9000], 2] = 1e30
    with ShardWriter(tmp_path / "huge", D_IN, shard_tokens=4096) as w:
        w.write(huge)
    summary = inspect(tmp_path / "huge", progress=False)
    assert summary["overflowing_tokens"] == 2
    assert summary["first_overflowing"] == f"{tmp_path / 'huge' / 'shard-00001.npy'}, row 904"
    text = format_summary(summary)
    assert "2 token(s) of a norm whose square overflows float32" in text
    assert "x the median" in text and "e+" in text.split("x the median")[0][-12:]
    bad = x.copy()
    bad[5000:5003, 1] = np.inf
    with ShardWriter(tmp_path / "bad", D_IN, shard_tokens=4096) as w:
        w.write(bad)
    with pytest.raises(DataError, match=r"shard-00001\.npy: non-finite values in rows 904\.\.906"):
        inspect(tmp_path / "bad", progress=False)


def test_inspect_counts_zero_tokens_and_refuses_data_of_nothing_but_zeros(tmp_path):
    """(fault testing: activations of scale 1e-9 written as float16 underflowed to all zeros,
    and inspect called them valid)"""
    from jaxsae.data.inspect import format_summary

    x = np.random.default_rng(0).normal(size=(1000, D_IN)).astype(np.float32)
    x[10:13] = 0
    with ShardWriter(tmp_path / "some", D_IN) as w:
        w.write(x)
    summary = inspect(tmp_path / "some", progress=False)
    assert summary["zero_tokens"] == 3
    assert "zero tokens 3 (0.30%), all their values 0" in format_summary(summary)
    with ShardWriter(tmp_path / "tiny", D_IN, dtype="float16") as w:
        w.write(x * 1e-9)
    with pytest.raises(DataError, match=r"tiny: every one of its 1,000 tokens is all zeros "
                                        r"\(float16 rounds"):
        inspect(tmp_path / "tiny", progress=False)
    # nor does training take them (it trained, and exported, an SAE of nothing)
    with pytest.raises(DataError, match=r"tiny: every one of the [0-9,]+ tokens sampled for the "
                                        r"data's statistics is all zeros: nothing to train on"):
        estimate(ShardSet(tmp_path / "tiny"), 1000, DataConfig(path=str(tmp_path / "tiny")))
