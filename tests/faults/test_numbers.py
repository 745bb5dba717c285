"""Numbers jaxsae reports or writes: none it did not measure (an undefined ratio is null, not
0), none computed from a NaN or inf it let through, and no file written that no reader takes
(a shard or an export holding NaN / inf)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxsae import cli, tensorfile
from jaxsae.export import WEIGHTS_FILE, ExportError, export_sae
from jaxsae.sae import SAEConfig
from tests.conftest import logging_to, small_config_dict
from tests.faults.conftest import refused, write_config


def _shards(directory: Path, x: np.ndarray) -> Path:
    """A one-shard directory written by hand (the writer refuses non-finite values)."""
    directory.mkdir()
    np.save(directory / "shard-00000.npy", x)
    (directory / "manifest.json").write_text(json.dumps({
        "format": "jaxsae.shards", "version": 1, "d_in": x.shape[1], "dtype": "float32",
        "shards": [{"file": "shard-00000.npy", "n_tokens": len(x)}]}))
    return directory


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_token_in_the_statistics_sample_is_refused(bad, tmp_path, capsys):
    """(fault testing: an inf made the input scale 0 and the exported SAE all inf, a NaN made
    it 1.0, turning normalisation off; both runs reported success)"""
    x = np.random.default_rng(0).normal(size=(4096, 8)).astype(np.float32) * 7
    x[100, 5] = bad
    data = _shards(tmp_path / "data", x)
    tree = small_config_dict(data, tmp_path / "run")
    tree["data"].update(eval_tokens=512, normalize="unit_mean_squared_norm")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    refused(["train", str(config), "--no-progress"], capsys, unchanged=[data],
            match=f"{data / 'shard-00000.npy'}: row 100: NaN or inf in a token sampled")
    assert not (tmp_path / "run").exists()
    # with optim.skip_nonfinite the statistics are those of the finite tokens
    assert cli.main(["train", str(config), "optim.skip_nonfinite=true", "--no-progress"]) == 0
    trained = np.delete(x[:-512], 100, 0).astype(np.float64)  # (all sampled, bar row 100)
    scale = np.sqrt(8 / np.mean(np.sum(np.square(trained), 1)))
    assert f"input scale {scale:.4g}" in capsys.readouterr().out


def test_a_diverged_sae_is_not_exported(small_data, tmp_path, capsys, monkeypatch):
    """(fault testing: with optim.skip_nonfinite, lr 1e30 skipped every step but the first,
    whose finite but huge weights were exported and reported as a success). The refusal comes
    before the ground-truth pass, whose numbers of a diverged SAE overflow."""
    def truth_pass(*args, **kwargs):
        raise AssertionError("the ground-truth pass ran for a diverged SAE")

    monkeypatch.setattr("jaxsae.evaluate.truth_reports", truth_pass)
    config = write_config(tmp_path / "c.yaml", small_data, tmp_path / "run",
                          optim={"lr": 1e30, "skip_nonfinite": True})
    refused(["train", str(config), "--no-progress"], capsys, unchanged=[small_data],
            match="training diverged: the reconstruction error of the SAE on the evaluation "
                  "tokens is not finite; nothing is exported")
    assert not (tmp_path / "run" / "sae").exists()
    assert not (tmp_path / "run" / "eval.json").exists()
    assert (tmp_path / "run" / "checkpoints").is_dir()  # (kept: an earlier step may export)


def test_a_gradient_that_overflows_names_the_largest_term(small_data, tmp_path, capsys):
    """(fault testing: an l1 coefficient of 1e30 stopped the run with "Lower optim.lr or
    check the data", naming neither the term nor its coefficient)"""
    config = write_config(tmp_path / "c.yaml", small_data, tmp_path / "run")
    line = refused(["train", str(config), "loss.l1.coefficient=1e30", "--no-progress"],
                   capsys, unchanged=[small_data], match="Lower optim.lr or "
                   "loss.l1.coefficient or check the data")
    assert "at step 1 (the gradient non-finite" in line and "the largest term: l1 = " in line
    # swept, the key to lower is the sweep's (an override of it is refused; a review)
    line = refused(["train", str(config), "sweep.loss.l1.coefficient=[0.1, 1e30]",
                    "--no-progress"], capsys, unchanged=[small_data],
                   match="Lower optim.lr or sweep.loss.l1.coefficient or check the data")
    assert "of sweep SAE 1 (loss.l1.coefficient=1e+30)" in line


def test_the_steps_each_sae_of_a_sweep_skipped_are_said(small_data, tmp_path, capsys):
    """(fault testing: with optim.skip_nonfinite, an SAE of a sweep that skipped 31 of its 32
    steps was reported as "trained 32 steps", its sweep.csv row like any other's)"""
    import csv

    config = write_config(tmp_path / "c.yaml", small_data, tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["train", str(config), "sweep.loss.l1.coefficient=[0.1, 1e38]",
                     "optim.skip_nonfinite=true", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trained 24 steps (loss.l1.coefficient=0.1)" in out
    with open(tmp_path / "run" / "sweep.csv", newline="") as f:
        skipped = [int(row["skipped_steps"]) for row in csv.DictReader(f)]
    assert skipped[0] == 0 and 0 < skipped[1] <= 24
    assert (f"trained {24 - skipped[1]} of 24 steps (loss.l1.coefficient=1e+38; {skipped[1]} "
            "skipped: a non-finite loss or gradient)") in out


def test_an_export_with_non_finite_weights_is_not_written(tmp_path):
    params = {"W_enc": np.ones((4, 8), np.float32), "b_enc": np.zeros(8, np.float32),
              "W_dec": np.ones((8, 4), np.float32), "b_dec": np.zeros(4, np.float32)}
    cfg = SAEConfig(d_sae=8, activation="relu")
    W_dec = params["W_dec"].copy()
    W_dec[3, 2] = np.inf
    with pytest.raises(ExportError, match="a: not written: W_dec has 1 non-finite values"):
        export_sae({**params, "W_dec": W_dec}, cfg, tmp_path / "a")
    assert not any(tmp_path.iterdir())


def test_synth_refuses_values_beyond_its_dtype_and_leaves_nothing(tmp_path, capsys):
    """(fault testing: float16 shards were written full of inf, with a numpy warning)"""
    out = tmp_path / "h"
    refused(["synth", "superposition", "--out", str(out), "--n-features", "16", "--d-in", "8",
             "--tokens", "1024", "--magnitude-mean", "1e5", "--dtype", "float16",
             "--no-progress"], capsys, unchanged=[],
            match=f"{out}: activations beyond float16's range (|x| > 65504) in what would be "
                  "shard-00000.npy; write them as float32")
    assert not any(tmp_path.iterdir())  # (no staging directory left either)
    # magnitudes beyond float32 itself: one line too (numpy's overflow warnings came first)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        refused(["synth", "superposition", "--out", str(out), "--n-features", "16", "--d-in",
                 "8", "--tokens", "1024", "--magnitude-mean", "1e300", "--no-progress"], capsys,
                unchanged=[], match="superposition: the settings drew non-finite values")
    assert not any(tmp_path.iterdir())


def test_a_damaged_npy_header_is_one_line(small_data, tmp_path, capsys):
    """(fault testing: numpy's header parse raised a tokenize error: a traceback, exit 1)"""
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    with open(data / "shard-00000.npy", "r+b") as f:
        f.seek(10)
        f.write(b"X" * 30)
    refused(["data", "inspect", str(data)], capsys, unchanged=[data],
            match=f"{data / 'shard-00000.npy'}: not a valid .npy file")


def test_a_ratio_of_nothing_is_null(run_copy, small_data, tmp_path, capsys):
    """(fault testing: uniqueness read 0.0 for an SAE none of whose latents fired: 0 / 0)"""
    sae = tmp_path / "silent"
    shutil.copytree(run_copy / "sae", sae)
    weights = {k: np.asarray(v) for k, v in tensorfile.read(sae / WEIGHTS_FILE).items()}
    tensorfile.write(sae / WEIGHTS_FILE, {**weights, "b_enc": np.full_like(weights["b_enc"],
                                                                            -1e3)})
    capsys.readouterr()
    assert cli.main(["eval", str(sae), "--data", str(small_data), "--truth", str(small_data),
                     "--tokens", "512"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["l0"] == 0 and result["dead_fraction"] == 1.0
    assert result["uniqueness"] is None and result["precision"] is None
    assert result["sb_l0"] == 0


@pytest.mark.parametrize(("override", "match"), [
    ("optim.total_tokens=1000000000000", "optim.total_tokens: 1,000,000,000,000 tokens make "
     "3,906,250,000 steps of optim.batch_size 256, more than the 2^31 - 1 a run can count"),
    ("optim.total_tokens=1e30", "optim.total_tokens: 1e+30 tokens make 3.906e+27 steps"),
    ("log.dead_window_tokens=2000000000", "log.dead_window_tokens: must be in 1..1073741824"),
    ("loss=[{term: mse}, {term: auxk, dead_tokens: 2000000000}]",
     "dead_tokens: must be in 1..1073741824"),
    ("sae.d_sae=1000000000000", "sae.d_sae: must be in 1..2^31 - 1"),
])
def test_sizes_beyond_what_a_run_can_hold_are_one_line(override, match, small_data, tmp_path,
                                                       capsys):
    """(fault testing: each was a traceback, exit 1; a dead window between 2^30 and 2^31
    tokens was silently never reached, the count saturating at 2^30)"""
    config = tmp_path / "config.yaml"
    tree = small_config_dict(small_data, tmp_path / "run")
    tree["sae"].update(activation="topk", k=4)
    config.write_text(yaml.safe_dump(tree))
    refused(["train", str(config), override, "--no-progress"], capsys, match=match,
            unchanged=[small_data])


def test_the_device_out_of_memory_is_one_line(small_data, tmp_path, capsys, monkeypatch):
    """(fault testing: sizes beyond the machine's memory ended in XLA's traceback, exit 1;
    train's named neither data.shuffle_buffer, whose windows the loader holds, nor
    data.stats_tokens, whose sample the statistics read at once)"""
    import jax

    from jaxsae import train

    def step_too_large(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating "
                                         "128000000000000 bytes.\nmore")

    monkeypatch.setattr(train, "train", step_too_large)
    config = write_config(tmp_path / "config.yaml", small_data, tmp_path / "run")
    refused(["train", str(config), "--no-progress"], capsys, unchanged=[config],
            match="out of memory on the CPU (RESOURCE_EXHAUSTED: Out of memory allocating "
                  "128000000000000 bytes.): the sizes asked for (sae.d_sae, optim.batch_size, "
                  "a sweep's SAEs or its sweep_chunk, data.shuffle_buffer, ...)")
    # XLA-CPU's YNNPACK kernels say it otherwise (fault testing: a traceback, exit 1); other
    # commands name their own flags (fault testing: eval and analyze named train's keys)
    from jaxsae.commands.analyze import Analyze
    from jaxsae.commands.eval import Eval

    def kernel_failed(self):
        raise jax.errors.JaxRuntimeError("INTERNAL: YNNPACK operation failed: error")

    def host_full(self):
        raise MemoryError("Unable to allocate 6.27 GiB for an array")
    monkeypatch.setattr(Eval, "run", kernel_failed)
    monkeypatch.setattr(Analyze, "run", host_full)
    sae = tmp_path / "sae"
    refused(["eval", str(sae), "--data", str(small_data)], capsys, unchanged=[config],
            match="out of memory on the CPU (INTERNAL: YNNPACK operation failed: error): the "
                  "sizes asked for (--batch-size, ...) need more memory than it has")
    refused(["eval", str(sae), "--model", "m.gguf", "--text", str(config)], capsys,
            unchanged=[config], match="the sizes asked for (--windows-per-batch, --context, "
                                      "...) need more memory")  # (a review: --batch-size)
    refused(["analyze", str(sae), "--data", str(small_data), "--out", str(tmp_path / "a")],
            capsys, unchanged=[config],
            match="out of memory (Unable to allocate 6.27 GiB for an array): the sizes asked "
                  "for (--batch-size, --cofire-tokens, ...) need more memory than this machine "
                  "has")


def test_an_undefined_explained_variance_is_null_in_cfg_json(run_copy, small_data, tmp_path,
                                                             capsys):
    """(fault testing: `export --data` of one token wrote `"eval_explained_variance": NaN`
    into cfg.json, which strict JSON readers refuse)"""
    from jaxsae.data.shards import ShardSet, ShardWriter

    one = ShardSet(small_data).read(0, 1)
    with ShardWriter(tmp_path / "one", one.shape[1]) as writer:
        writer.write(one)
    assert cli.main(["export", str(run_copy), "--out", str(tmp_path / "e"), "--data",
                     str(tmp_path / "one"), "--no-progress"]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in cfg.json")

    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text(), parse_constant=refuse)
    assert cfg["metadata"]["eval_explained_variance"] is None


@pytest.mark.parametrize("power", [62, -66])
def test_the_evaluation_holds_for_activations_of_any_magnitude(power):
    """Activations x·2^p evaluated by the same SAE scaled to them: the same explained variance
    and L0, the mse times 4^p (fault testing: squares near 1e19 overflowed float32, so a
    healthy run was reported diverged, and near 1e-20 they underflowed: mse 0, variance
    "undefined")."""
    import jax

    from jaxsae.evaluate import reconstruction_metrics
    from jaxsae.sae import fold_input_scale, init_params

    cfg = SAEConfig(d_sae=16, activation="relu", decoder_norm="unit")
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(0), 8, cfg).items()}
    params["b_enc"] = np.full(16, -0.1, np.float32)
    x = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    base = reconstruction_metrics(params, cfg, [x[:256], x[256:]])
    c = 2.0 ** power
    scaled = reconstruction_metrics(fold_input_scale(params, 1 / c), cfg,
                                    [x[:256] * c, x[256:] * c])
    assert scaled["explained_variance"] == base["explained_variance"]
    assert 0 < base["explained_variance"] < 1 and scaled["l0"] == base["l0"] > 0
    assert scaled["mse"] == pytest.approx(base["mse"] * c * c, rel=1e-6)


def test_an_error_far_larger_than_the_activations_is_measured():
    """A decoder 1e20 times too large: the explained variance is the float64 one, hugely
    negative (fault testing: the values' squares, summed in the error's unit, underflowed:
    null at 1e20, 9 % off at 1e18)."""
    import jax

    from jaxsae.evaluate import reconstruction_metrics
    from jaxsae.sae import encode, init_params

    cfg = SAEConfig(d_sae=16, activation="relu", decoder_norm="free")
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(0), 8, cfg).items()}
    params["b_enc"] = np.full(16, 0.1, np.float32)
    x = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    for factor in (1e18, 1e20):
        big = {**params, "W_dec": params["W_dec"] * np.float32(factor)}
        got = reconstruction_metrics(big, cfg, [x[:256], x[256:]])["explained_variance"]
        codes = np.asarray(encode(big, x, cfg), np.float64)
        error = codes @ big["W_dec"].astype(np.float64) + big["b_dec"] - x
        want = 1 - np.sum(error**2) / np.sum((x - x.mean(0)) ** 2)
        assert got == pytest.approx(want, rel=1e-4), factor


def _logger(tmp_path, **optim):
    from jaxsae.config import config_from_dict
    from jaxsae.hooks import MetricLogger

    tree = small_config_dict(tmp_path / "d", tmp_path / "r")
    tree["optim"].update(optim)
    lines = []
    return config_from_dict(tree), lines, lambda cfg, scale=1.0: MetricLogger(
        cfg, 0, [logging_to(lines)], dropped=lambda at: None, scale=scale)


def _metrics(finite=True, mse=10.0):
    import jax.numpy as jnp

    return {"loss": jnp.float32(mse if finite else np.nan), "loss.mse": jnp.float32(mse),
            "loss.l1": jnp.float32(1.0), "l0": jnp.float32(3.0), "mse": jnp.float32(mse),
            "explained_variance": jnp.float32(0.5), "dead_fraction": jnp.float32(0.0),
            "lr": jnp.float32(1e-3), "grad_norm": jnp.float32(1.0), "finite": jnp.bool_(finite),
            "skipped_steps": jnp.int32(0)}


def test_the_logged_mse_is_in_the_datas_units_for_any_scale(tmp_path):
    """(fault testing: dividing by the scale squared in float32 overflowed for data of norm
    ~1e-20, and every line said mse 0.0)"""
    cfg, lines, make = _logger(tmp_path)
    logger = make(cfg, scale=1e20)
    for step in range(cfg.log.every_steps):
        logger.record(step, _metrics(mse=10.0), {})
    assert lines[-1]["mse"] == pytest.approx(10.0 / 1e40, rel=1e-6)


def test_a_run_whose_every_step_is_skipped_stops(tmp_path):
    """optim.skip_nonfinite: a run that skips SKIPPED_IN_A_ROW steps in a row no longer trains
    and stops, saying why (fault testing: a diverged run skipped its remaining steps and
    checkpointed its non-finite state); a finite step between bad ones starts the count anew."""
    from jaxsae.errors import NonFiniteError
    from jaxsae.hooks import SKIPPED_IN_A_ROW

    cfg, _, make = _logger(tmp_path, skip_nonfinite=True, total_tokens=256 * 400)
    logger = make(cfg)
    for step in range(SKIPPED_IN_A_ROW - 1):
        logger.record(step, _metrics(finite=False), {})
    logger.record(SKIPPED_IN_A_ROW - 1, _metrics(finite=True), {})
    for step in range(SKIPPED_IN_A_ROW, 2 * SKIPPED_IN_A_ROW - 1):
        logger.record(step, _metrics(finite=False), {})
    with pytest.raises(NonFiniteError, match=r"^optim.skip_nonfinite: the last 100 steps \(to "
                                             r"step 200\) were all skipped"):
        logger.record(2 * SKIPPED_IN_A_ROW - 1, _metrics(finite=False), {})
