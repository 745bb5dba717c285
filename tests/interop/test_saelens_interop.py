"""Exports load in real SAELens with the same codes, and SAELens saves import into jaxsae.

SAELens runs in .venv-interop (torch 2.13.0 + sae-lens, built by scripts/test.sh); these tests
drive it through tests/interop/saelens_side.py and compare within 1e-5 (float32).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxsae import sae
from jaxsae.config import SAEConfig, load_config
from jaxsae.export import export_sae, import_config, initial_params, load_sae
from jaxsae.train import train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
D_IN, D_SAE = 16, 48


def _interop_python() -> str:
    python = os.environ.get("JAXSAE_INTEROP_PYTHON") or str(ROOT / ".venv-interop/bin/python")
    if not Path(python).exists():
        pytest.skip("no SAELens environment: scripts/test.sh builds .venv-interop")
    return python


def _saelens(job: dict, tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([_interop_python(), str(HERE / "saelens_side.py"),
                           str(tmp_path / "job.json")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return (np.abs(np.random.default_rng(0).standard_normal((64, D_IN))) * 2).astype(np.float32)


def _params(cfg: SAEConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {k: np.asarray(v) for k, v in
              sae.init_params(jax.random.PRNGKey(seed), D_IN, cfg).items()}
    params["b_enc"] = rng.normal(0, 0.2, D_SAE).astype(np.float32)
    params["b_dec"] = rng.normal(0, 0.2, D_IN).astype(np.float32)
    if "threshold" in params:
        params["threshold"] = rng.uniform(0.1, 0.6, D_SAE).astype(np.float32)
    for gate in ("b_gate", "r_mag", "b_mag"):
        if gate in params:
            params[gate] = rng.normal(0, 0.3, D_SAE).astype(np.float32)
    return params


EXPORTS = {
    # name: (config, SAELens class expected, input scale folded into the export)
    "relu": (SAEConfig(d_sae=D_SAE, activation="relu", decoder_norm="free"), "StandardSAE", 1.0),
    "topk": (SAEConfig(d_sae=D_SAE, activation="topk", k=5), "TopKSAE", 1.0),
    "batchtopk": (SAEConfig(d_sae=D_SAE, activation="batchtopk", k=5), "JumpReLUSAE", 1.0),
    "jumprelu": (SAEConfig(d_sae=D_SAE, activation="jumprelu"), "JumpReLUSAE", 1.0),
    "tied": (SAEConfig(d_sae=D_SAE, activation="relu", tied=True), "StandardSAE", 1.0),
    "normalised": (SAEConfig(d_sae=D_SAE, activation="relu", decoder_norm="free"),
                   "StandardSAE", 0.4),
    "gated": (SAEConfig(d_sae=D_SAE, activation="gated", decoder_norm="free"), "GatedSAE",
              1.0),
    "gated_normalised": (SAEConfig(d_sae=D_SAE, activation="gated"), "GatedSAE", 0.4),
    "matching_pursuit": (SAEConfig(d_sae=D_SAE, activation="matching_pursuit", k=6),
                         "MatchingPursuitSAE", 1.0),
}


def test_exports_give_the_same_codes_in_saelens(inputs, tmp_path):
    job = {"inputs": str(tmp_path / "x.npy"), "encode": []}
    np.save(tmp_path / "x.npy", inputs)
    expected = {}
    for i, (name, (cfg, _, scale)) in enumerate(EXPORTS.items()):
        params = _params(cfg, i)
        # What jaxsae computes during training: codes of scale·x, reconstruction in raw units.
        codes = np.asarray(sae.encode(params, inputs * scale, cfg))
        recon = np.asarray(sae.decode(params, codes)) / scale
        assert (codes > 0).any(), name
        export_sae(sae.fold_input_scale(params, scale), cfg, tmp_path / name)
        expected[name] = (codes, recon)
        job["encode"].append({"dir": str(tmp_path / name), "out": str(tmp_path / f"{name}.npz")})
    _saelens(job, tmp_path)
    _same_in_saelens(expected, {name: e[1] for name, e in EXPORTS.items()}, tmp_path)


def _same_in_saelens(expected: dict, classes: dict, tmp_path) -> None:
    """What SAELens computed for each export (saelens_side.py's .npz) against jaxsae's codes
    and outputs, and the class it loaded each as."""
    for name, (codes, recon) in expected.items():
        got = np.load(tmp_path / f"{name}.npz")
        assert str(got["kind"]) == classes[name], name
        np.testing.assert_allclose(got["codes"], codes, atol=1e-5, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(got["recon"], recon, atol=1e-5, rtol=1e-5, err_msg=name)


TRANSCODERS = {
    # name: (activation, skip, the SAELens class the export loads as)
    "relu": ("relu", False, "Transcoder"),
    "relu_skip": ("relu", True, "SkipTranscoder"),
    "jumprelu": ("jumprelu", False, "JumpReLUTranscoder"),
    "batchtopk_skip": ("batchtopk", True, "JumpReLUSkipTranscoder"),
}


def test_transcoder_exports_give_the_same_outputs_in_saelens(inputs, tmp_path):
    """Transcoders (d_in 16 -> d_out 24, with and without the skip bypass) export to the
    SAELens class of their architecture, which computes the same codes and outputs: the
    encoder reads x uncentred, the decoder writes the target's width, W_skip is added."""
    d_out = 24
    job = {"inputs": str(tmp_path / "x.npy"), "encode": []}
    np.save(tmp_path / "x.npy", inputs)
    expected = {}
    for i, (name, (activation, skip, _)) in enumerate(TRANSCODERS.items()):
        cfg = SAEConfig(d_sae=D_SAE, activation=activation, k=5, skip=skip, transcoder=True,
                        decoder_norm="free")
        rng = np.random.default_rng(i)
        params = {k: np.asarray(v) for k, v in
                  sae.init_params(jax.random.PRNGKey(i), D_IN, cfg, d_out).items()}
        assert params["W_dec"].shape == (D_SAE, d_out) and params["b_dec"].shape == (d_out,)
        params["b_enc"] = rng.normal(0, 0.2, D_SAE).astype(np.float32)
        params["b_dec"] = rng.normal(0, 0.2, d_out).astype(np.float32)
        if "threshold" in params:
            params["threshold"] = rng.uniform(0.1, 0.6, D_SAE).astype(np.float32)
        if skip:
            params["W_skip"] = rng.normal(0, 0.3, (d_out, D_IN)).astype(np.float32)
        codes = np.asarray(sae.encode(params, inputs, cfg))
        out = np.asarray(sae.decode(params, codes, inputs))
        assert (codes > 0).any() and out.shape == (len(inputs), d_out), name
        export_sae(params, cfg, tmp_path / name, metadata={  # as a run on cached pairs writes
            "hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out"})
        written = json.loads((tmp_path / name / "cfg.json").read_text())
        assert (written["d_in"], written["d_out"]) == (D_IN, d_out)
        assert written["apply_b_dec_to_input"] is False
        expected[name] = (codes, out)
        job["encode"].append({"dir": str(tmp_path / name), "out": str(tmp_path / f"{name}.npz")})
    _saelens(job, tmp_path)
    _same_in_saelens(expected, {name: t[2] for name, t in TRANSCODERS.items()}, tmp_path)


def test_bfloat16_export_loads_in_saelens(inputs, tmp_path):
    cfg = EXPORTS["relu"][0]
    params = _params(cfg, 7)
    export_sae(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    np.save(tmp_path / "x.npy", inputs)
    _saelens({"inputs": str(tmp_path / "x.npy"),
              "encode": [{"dir": str(tmp_path / "bf16"), "out": str(tmp_path / "bf16.npz")}]},
             tmp_path)
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in params.items()}
    want = np.asarray(sae.encode(rounded, inputs.astype(ml_dtypes.bfloat16).astype(np.float32),
                                 cfg))
    got = np.load(tmp_path / "bf16.npz")["codes"].astype(np.float32)
    np.testing.assert_allclose(got, want, atol=0.05, rtol=0.02)


def test_saelens_saves_import_with_the_same_codes(inputs, tmp_path, small_data):
    # (fault testing: rescale_acts_by_decoder_norm, SAELens's TopK training default, was
    # refused, so every TopK SAE a SAELens run saved was)
    makes = [{"arch": "standard"}, {"arch": "topk", "k": 6}, {"arch": "topk_rescaled", "k": 6},
             {"arch": "topk_trained", "k": 6}, {"arch": "jumprelu"}, {"arch": "gated"},
             {"arch": "gated_uncentred"},  # (fault testing: refused, though it folds exactly)
             {"arch": "matching_pursuit", "k": 5}]
    np.save(tmp_path / "x.npy", inputs)
    job = {"inputs": str(tmp_path / "x.npy"), "make": [
        {**m, "dir": str(tmp_path / m["arch"]), "out": str(tmp_path / f"{m['arch']}.npz"),
         "d_in": D_IN, "d_sae": D_SAE, "seed": i} for i, m in enumerate(makes)]}
    _saelens(job, tmp_path)
    for m in makes:
        loaded = load_sae(tmp_path / m["arch"])
        got = np.load(tmp_path / f"{m['arch']}.npz")
        codes = np.asarray(sae.encode(loaded.params, inputs, loaded.sae))
        assert (codes > 0).any(), m
        np.testing.assert_allclose(codes, got["codes"], atol=1e-5, rtol=1e-5, err_msg=m["arch"])
        np.testing.assert_allclose(np.asarray(sae.decode(loaded.params, codes)), got["recon"],
                                   atol=1e-5, rtol=1e-5, err_msg=m["arch"])
    # ... and a run starts from one (jaxsae import -> init_from).
    config = import_config(tmp_path / "topk", tmp_path / "run", small_data,
                           ["optim.batch_size=256", "optim.total_tokens=1024",
                            "optim.warmup_steps=1", "data.eval_tokens=2048"])
    assert config.read_text().startswith(f"# jaxsae train {config}")
    start = initial_params(tmp_path / "topk", load_config(config).sae, D_IN)
    np.testing.assert_array_equal(start["W_dec"], load_sae(tmp_path / "topk").params["W_dec"])
    result = train(load_config(config), progress=False)
    assert result.step == 4


@pytest.mark.parametrize("lp_norm", [1.0, 0.5])
def test_saelens_training_losses_are_jaxsaes_after_import(inputs, tmp_path, lp_norm):
    """The loss SAELens trains a standard SAE with (its own training_forward_pass: mse, and
    l1_coefficient times the lp_norm-norm of f·‖W_dec‖) is the loss `jaxsae import` gives the
    same SAE (fault testing: lp_norm < 1 was imported as Σ vᵖ, another objective)."""
    from jaxsae import penalties
    from jaxsae.config import config_from_dict
    from jaxsae.export import read_cfg, training_settings

    np.save(tmp_path / "x.npy", inputs)
    _saelens({"inputs": str(tmp_path / "x.npy"), "losses": [
        {"dir": str(tmp_path / "sae"), "out": str(tmp_path / "losses.json"), "d_in": D_IN,
         "d_sae": D_SAE, "seed": 3, "lp_norm": lp_norm, "l1_coefficient": 2.0}]}, tmp_path)
    want = json.loads((tmp_path / "losses.json").read_text())
    settings = training_settings(read_cfg(tmp_path / "sae"))
    assert settings["loss"][1] == {"term": "l1", "coefficient": 2.0,
                                   **({"p": lp_norm, "norm": True} if lp_norm != 1 else {})}
    cfg = config_from_dict({"data": {"path": "unused"}, "sae": {
        "d_sae": D_SAE, **settings["sae"], "decoder_norm": "free"}, "loss": settings["loss"]})
    loaded = load_sae(tmp_path / "sae")
    params = {k: jax.numpy.asarray(v) for k, v in loaded.params.items()}
    out = sae.forward(params, jax.numpy.asarray(inputs), cfg.sae, train=True)
    values = [float(penalties.get_term(t.term).fn(out, params, step=jax.numpy.asarray(0),
                                                   **t.params)[0]) * t.coefficient
              for t in cfg.loss]
    np.testing.assert_allclose(values, [want["mse_loss"], want["l1_loss"]], rtol=1e-5)
