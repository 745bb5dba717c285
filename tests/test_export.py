"""SAELens-format export and import: round trips per activation, the files, and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxsae import __version__, tensorfile
from jaxsae.config import SAEConfig
from jaxsae.export import (
    CFG_FILE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    ExportError,
    export_sae,
    load_sae,
)
from jaxsae.outputs import OutputError
from jaxsae.sae import encode, init_params, pre_activations

D_IN = 6
D_SAE = 16
K = 3


def make_sae(activation: str = "relu", *, tied: bool = False, seed: int = 0):
    """Parameters with random biases, thresholds and an encoder that is not W_dec.T."""
    cfg = SAEConfig(d_sae=D_SAE, activation=activation, k=K, tied=tied, decoder_norm="free",
                    init_decoder_norm=0.5)
    params = dict(init_params(jax.random.PRNGKey(seed), D_IN, cfg))
    rng = np.random.default_rng(seed)
    params["b_enc"] = jnp.asarray(rng.normal(0, 0.1, D_SAE), jnp.float32)
    params["b_dec"] = jnp.asarray(rng.normal(0, 0.3, D_IN), jnp.float32)
    if not tied:
        params["W_enc"] = params["W_enc"] + jnp.asarray(rng.normal(0, 0.2, (D_IN, D_SAE)),
                                                        jnp.float32)
    if "threshold" in params:
        params["threshold"] = jnp.asarray(rng.uniform(0.0, 0.3, D_SAE), jnp.float32)
    return params, cfg


def inputs(seed: int = 1, n: int = 64) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(0, 1.5, (n, D_IN)), jnp.float32)


CASES = [
    ("relu", False, "standard"),
    ("topk", False, "topk"),
    ("jumprelu", False, "jumprelu"),
    ("batchtopk", False, "jumprelu"),
    ("relu", True, "standard"),
    ("jumprelu", True, "jumprelu"),
]


@pytest.mark.parametrize(("activation", "tied", "architecture"), CASES)
def test_round_trip_gives_the_same_codes(tmp_path, activation, tied, architecture):
    params, cfg = make_sae(activation, tied=tied)
    out = export_sae(params, cfg, tmp_path / "sae")
    assert out == tmp_path / "sae"
    loaded = load_sae(out)
    assert loaded.d_in == D_IN
    assert loaded.sae.d_sae == D_SAE
    assert loaded.cfg_json["architecture"] == architecture
    assert loaded.sae.activation == {"standard": "relu"}.get(architecture, architecture)

    x = inputs()
    want = np.asarray(encode(params, x, cfg, train=False))
    got = np.asarray(encode(loaded.params, x, loaded.sae))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # The comparison means something: some latents fire, most do not.
    fired = want > 0
    assert 0 < fired.sum() < fired.size
    if activation in ("jumprelu", "batchtopk"):
        pre = np.asarray(pre_activations(params, x))
        gated = (pre > 0) & (pre <= np.asarray(params["threshold"]))
        assert gated.any()  # positive pre-activations that the threshold removes
    if activation == "topk":
        assert loaded.sae.k == K
        per_token = fired.sum(axis=1)
        assert per_token.max() == K  # (fewer only where fewer than K pre-activations are > 0)
        assert np.mean(per_token == K) > 0.9


@pytest.mark.parametrize(("activation", "tied", "architecture"), CASES)
def test_weights_file(tmp_path, activation, tied, architecture):
    params, cfg = make_sae(activation, tied=tied)
    out = export_sae(params, cfg, tmp_path / "sae")
    weights = tensorfile.read(out / WEIGHTS_FILE)
    expected = {"W_enc", "W_dec", "b_enc", "b_dec"}
    if architecture == "jumprelu":
        expected.add("threshold")
    assert set(weights) == expected
    assert all(w.dtype == np.float32 for w in weights.values())
    w_enc = np.asarray(params["W_dec"]).T if tied else np.asarray(params["W_enc"])
    np.testing.assert_array_equal(weights["W_enc"], w_enc)
    assert weights["W_enc"].shape == (D_IN, D_SAE)
    for name in expected - {"W_enc"}:
        np.testing.assert_array_equal(weights[name], np.asarray(params[name]), err_msg=name)
    header, _ = tensorfile.read_header(out / WEIGHTS_FILE)
    assert header["__metadata__"] == {"format": "pt"}


def test_batchtopk_exports_its_inference_threshold(tmp_path):
    params, cfg = make_sae("batchtopk")
    loaded = load_sae(export_sae(params, cfg, tmp_path / "sae"))
    assert loaded.cfg_json["architecture"] == "jumprelu"
    assert "k" not in loaded.cfg_json
    np.testing.assert_array_equal(loaded.params["threshold"], np.asarray(params["threshold"]))
    x = inputs(3)
    pre = np.asarray(pre_activations(params, x))
    manual = np.where(pre > np.asarray(params["threshold"]), np.maximum(pre, 0), 0)
    np.testing.assert_allclose(np.asarray(encode(loaded.params, x, loaded.sae)), manual,
                               atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_cfg_json(tmp_path, activation):
    params, cfg = make_sae(activation)
    out = export_sae(params, cfg, tmp_path / "sae", metadata={"hook_name": "blocks.3.hook"},
                     training={"steps": 12})
    c = json.loads((out / CFG_FILE).read_text())
    assert c["architecture"] == {"relu": "standard", "topk": "topk"}.get(activation, "jumprelu")
    assert c["d_in"] == D_IN
    assert c["d_sae"] == D_SAE
    assert c["dtype"] == "float32"
    assert c["normalize_activations"] == "none"
    assert c["apply_b_dec_to_input"] is True
    assert isinstance(c["metadata"]["sae_lens_version"], str) and c["metadata"]["sae_lens_version"]
    assert c["metadata"]["hook_name"] == "blocks.3.hook"
    assert c["jaxsae"]["activation"] == activation
    assert c["jaxsae"]["steps"] == 12
    assert c["jaxsae"]["version"] == __version__  # (which jaxsae wrote it)
    if activation == "topk":
        assert c["k"] == K
    else:
        assert "k" not in c


def test_sparsity_file(tmp_path):
    params, cfg = make_sae()
    firing = np.log10(np.linspace(1e-4, 0.5, D_SAE)).astype(np.float32)
    out = export_sae(params, cfg, tmp_path / "a", log10_firing=firing)
    sparsity = tensorfile.read(out / SPARSITY_FILE)
    assert set(sparsity) == {"sparsity"}
    assert sparsity["sparsity"].shape == (D_SAE,)
    assert sparsity["sparsity"].dtype == np.float32
    np.testing.assert_array_equal(sparsity["sparsity"], firing)

    # none measured, none written (it was -10 for every latent: all dead, to SAELens users)
    unmeasured = export_sae(params, cfg, tmp_path / "b")
    assert not (unmeasured / SPARSITY_FILE).exists()
    assert load_sae(unmeasured).sae.d_sae == D_SAE


def test_unit_decoder_rows_read_back_as_unit_from_bfloat16(small_data, tmp_path):
    """bfloat16 moves a unit row's norm by up to ~0.004 (0.0024 here, d_in 16): still unit,
    for import (decoder_norm) and init_from, where float32 weights must be within 1e-3."""
    from jaxsae.errors import ConfigError
    from jaxsae.export import check_init_from, initial_params
    from jaxsae.sae import unit_rows

    rng = np.random.default_rng(0)
    W_dec = rng.standard_normal((4096, 16)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {"W_enc": W_dec.T.copy(), "b_enc": np.zeros(4096, np.float32), "W_dec": W_dec,
              "b_dec": np.zeros(16, np.float32)}
    cfg = SAEConfig(d_sae=4096, activation="relu", decoder_norm="unit")
    loaded = load_sae(export_sae(params, cfg, tmp_path / "bf16", dtype="bfloat16"))
    assert loaded.stored_dtype == np.dtype(ml_dtypes.bfloat16)
    assert not unit_rows(loaded.params["W_dec"])  # at float32's tolerance: not unit
    assert unit_rows(loaded.params["W_dec"], loaded.stored_dtype)
    assert initial_params(tmp_path / "bf16", cfg, 16)["W_dec"].shape == (4096, 16)
    # a sparsify directory stored in bfloat16 (as sparsify trains): unit too
    from jaxsae import sparsify
    eleuther = sparsify.export_sparsify(params, SAEConfig(d_sae=4096, activation="topk", k=3,
                                                          decoder_norm="unit"), tmp_path / "e")
    weights = eleuther / sparsify.WEIGHTS_FILE
    tensorfile.write(weights, {k: v.astype(ml_dtypes.bfloat16)
                               for k, v in tensorfile.read(weights).items()})
    assert sparsify.read_sparsify(eleuther)[1].decoder_norm == "unit"
    # a run may start from it (init_from) as from its SAELens export
    topk = SAEConfig(d_sae=4096, activation="topk", k=3, decoder_norm="unit")
    check_init_from(eleuther, topk)
    np.testing.assert_array_equal(initial_params(eleuther, topk, 16)["W_dec"],
                                  W_dec.astype(ml_dtypes.bfloat16).astype(np.float32))
    import yaml

    from jaxsae.export import import_config
    config = yaml.safe_load(import_config(eleuther, tmp_path / "run", small_data).read_text())
    assert config["sae"]["decoder_norm"] == "unit"
    # rows 2 % longer are not unit in either dtype (bfloat16's band is ±0.8 %, at any
    # scale): refused when some are (all of them: a scale, made unit with the codes scaled
    # to match, test_a_start_at_another_scale_...)
    params["W_dec"] = W_dec * np.where(np.arange(4096) % 2, 1.02, 1.0)[:, None]
    for dtype in ("float32", "bfloat16"):
        loaded = load_sae(export_sae(params, cfg, tmp_path / dtype, dtype=dtype,
                                     overwrite=True))
        assert not unit_rows(loaded.params["W_dec"], loaded.stored_dtype)
        with pytest.raises(ConfigError, match=r"init_from: .* decoder rows of norm"):
            initial_params(tmp_path / dtype, cfg, 16)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_bfloat16_export(tmp_path, activation):
    params, cfg = make_sae(activation)
    out = export_sae(params, cfg, tmp_path / "sae", dtype="bfloat16")
    assert json.loads((out / CFG_FILE).read_text())["dtype"] == "bfloat16"
    raw = tensorfile.read(out / WEIGHTS_FILE)
    assert all(w.dtype == np.dtype(ml_dtypes.bfloat16) for w in raw.values())
    loaded = load_sae(out)
    for name, value in loaded.params.items():
        assert value.dtype == np.float32
        rounded = np.asarray(params[name]).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(value, rounded, err_msg=name)
        np.testing.assert_allclose(value, np.asarray(params[name]), rtol=2**-8, atol=1e-6)
    x = inputs()
    want = np.asarray(encode(params, x, cfg))
    got = np.asarray(encode(loaded.params, x, loaded.sae))
    if activation == "relu":
        np.testing.assert_allclose(got, want, atol=0.05)
    else:  # a latent at its threshold may flip; all others agree to bf16 precision
        same = (got > 0) == (want > 0)
        assert same.mean() > 0.98
        np.testing.assert_allclose(got[same], want[same], atol=0.05)


def test_export_rejects_unknown_dtype(tmp_path):
    params, cfg = make_sae()
    with pytest.raises(ExportError, match="float16"):
        export_sae(params, cfg, tmp_path / "sae", dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_an_existing_directory(tmp_path):
    parent = tmp_path / "runs"
    first, first_cfg = make_sae("topk", seed=0)
    out = export_sae(first, first_cfg, parent / "sae")
    (out / "stale.txt").write_text("from before")
    (out / "nested").mkdir()
    (out / "nested" / "x.bin").write_bytes(b"1")

    second, second_cfg = make_sae("relu", seed=5)
    with pytest.raises(OutputError, match=r"holds files jaxsae did not write \(nested/, "
                                          r"stale.txt\)"):
        export_sae(second, second_cfg, out)  # files the user added: never replaced silently
    export_sae(second, second_cfg, out, overwrite=True, log10_firing=np.zeros(D_SAE))
    assert sorted(p.name for p in out.iterdir()) == sorted([CFG_FILE, WEIGHTS_FILE,
                                                            SPARSITY_FILE])
    assert [p.name for p in parent.iterdir()] == ["sae"]  # no temporary or old directories
    loaded = load_sae(out)
    assert loaded.cfg_json["architecture"] == "standard"
    np.testing.assert_array_equal(loaded.params["W_enc"], np.asarray(second["W_enc"]))


def test_failed_export_leaves_the_old_directory_and_no_temporaries(tmp_path):
    params, cfg = make_sae("jumprelu")
    out = export_sae(params, cfg, tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other, other_cfg = make_sae("relu", seed=9)
    with pytest.raises(ValueError):
        export_sae(other, other_cfg, out, log10_firing=np.array(["not a number"]))
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_creates_missing_parents(tmp_path):
    params, cfg = make_sae()
    out = export_sae(params, cfg, tmp_path / "a" / "b" / "sae")
    assert load_sae(out).sae.d_sae == D_SAE


def test_export_directory_has_normal_permissions(tmp_path):
    params, cfg = make_sae()
    old = os.umask(0o022)
    try:
        out = export_sae(params, cfg, tmp_path / "sae")
        (tmp_path / "reference").mkdir()
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == (tmp_path / "reference").stat().st_mode & 0o777


# ---------------------------------------------------------------------------------------------
# Loading directories written elsewhere, and refusals


def write_export(path: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    (path / CFG_FILE).write_text(json.dumps(cfg))
    tensorfile.write(path / WEIGHTS_FILE, tensors)
    return path


def sae_lens_tensors(seed: int = 0, *, threshold: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {
        "W_enc": rng.normal(0, 0.5, (D_IN, D_SAE)).astype(np.float32),
        "W_dec": rng.normal(0, 0.5, (D_SAE, D_IN)).astype(np.float32),
        "b_enc": rng.normal(0, 0.1, D_SAE).astype(np.float32),
        "b_dec": rng.normal(0, 0.3, D_IN).astype(np.float32),
    }
    if threshold:
        t["threshold"] = rng.uniform(0, 0.3, D_SAE).astype(np.float32)
    return t


def test_load_without_b_dec_centring_folds_it_into_b_enc(tmp_path):
    t = sae_lens_tensors()
    path = write_export(tmp_path / "sae", {"architecture": "standard", "d_in": D_IN,
                                          "d_sae": D_SAE, "apply_b_dec_to_input": False}, t)
    loaded = load_sae(path)
    x = np.asarray(inputs())
    manual = np.maximum(x @ t["W_enc"] + t["b_enc"], 0)  # SAELens without centring
    np.testing.assert_allclose(np.asarray(encode(loaded.params, jnp.asarray(x), loaded.sae)),
                               manual, atol=1e-5)


@pytest.mark.parametrize(("cfg", "message"), [
    ({"d_in": D_IN, "d_sae": D_SAE}, "missing 'architecture'"),
    ({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE}, "missing 'k'"),
    ({"architecture": "topk", "k": D_SAE + 1, "d_in": D_IN, "d_sae": D_SAE}, "'k' must be"),
    ({"architecture": "standard", "d_in": 0, "d_sae": D_SAE}, "'d_in' must be a positive"),
    ({"architecture": "standard", "d_in": D_IN, "d_sae": True}, "'d_sae' must be a positive"),
    ({"architecture": 3, "d_in": D_IN, "d_sae": D_SAE}, "unknown architecture 3"),
])
def test_load_refuses_an_incomplete_cfg(tmp_path, cfg, message):
    path = write_export(tmp_path / "sae", cfg, sae_lens_tensors())
    with pytest.raises(ExportError, match=message):
        load_sae(path)


@pytest.mark.parametrize(("content", "message"), [
    (b"\x89PNG\r\n\x1a\n\x00\xff", "not a text file"),
    (b"[1, 2, 3]", "expected a JSON object, got a JSON list"),
    (b'"standard"', "expected a JSON object, got a JSON str"),
])
def test_load_refuses_a_cfg_that_is_not_an_object(tmp_path, content, message):
    path = exported(tmp_path)
    (path / CFG_FILE).write_bytes(content)
    with pytest.raises(ExportError, match=message):
        load_sae(path)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("W_dec", np.ones((D_SAE, D_IN), np.int32), "W_dec is int32, expected floating point"),
    ("b_enc", np.full(D_SAE, np.nan, np.float32), "b_enc has 16 non-finite values"),
    ("W_enc", np.where(np.eye(D_IN, D_SAE) > 0, np.inf, 0).astype(np.float32),
     "W_enc has 6 non-finite values"),
])
def test_load_refuses_weights_that_are_not_finite_floats(tmp_path, name, value, message):
    path = exported(tmp_path, "relu")
    edit_weights(path, **{name: value})
    with pytest.raises(ExportError, match=message):
        load_sae(path)


def exported(tmp_path, activation="jumprelu") -> Path:
    params, cfg = make_sae(activation)
    return export_sae(params, cfg, tmp_path / "sae")


def edit_cfg(path: Path, **changes) -> None:
    c = json.loads((path / CFG_FILE).read_text())
    c.update(changes)
    (path / CFG_FILE).write_text(json.dumps(c))


def edit_weights(path: Path, drop: str | None = None, **replace) -> None:
    t = {k: np.array(v) for k, v in tensorfile.read(path / WEIGHTS_FILE).items()}  # copies
    if drop:
        del t[drop]
    t.update(replace)
    tensorfile.write(path / WEIGHTS_FILE, t)


def test_load_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ExportError, match="nope: does not exist"):
        load_sae(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="afile: not a directory"):
        load_sae(tmp_path / "afile")


def test_load_refuses_missing_cfg(tmp_path):
    path = exported(tmp_path)
    (path / CFG_FILE).unlink()
    with pytest.raises(ExportError, match=r"missing cfg\.json"):
        load_sae(path)


def test_load_refuses_missing_weights(tmp_path):
    path = exported(tmp_path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ExportError, match=r"missing sae_weights\.safetensors"):
        load_sae(path)


def test_load_refuses_cfg_that_is_not_json(tmp_path):
    path = exported(tmp_path)
    (path / CFG_FILE).write_text("{architecture: jumprelu")
    with pytest.raises(ExportError, match="not valid JSON"):
        load_sae(path)


@pytest.mark.parametrize(("name", "value", "shape"), [
    ("W_enc", np.zeros((D_SAE, D_IN), np.float32),
     r"W_enc has shape \[16, 6\], expected \[6, 16\]"),
    ("W_dec", np.zeros((D_SAE, D_IN + 1), np.float32), r"W_dec has shape \[16, 7\]"),
    ("b_enc", np.zeros(D_SAE - 1, np.float32), r"b_enc has shape \[15\], expected \[16\]"),
    ("threshold", np.zeros((1, D_SAE), np.float32), r"threshold has shape \[1, 16\]"),
])
def test_load_refuses_a_wrong_shape(tmp_path, name, value, shape):
    path = exported(tmp_path)
    edit_weights(path, **{name: value})
    with pytest.raises(ExportError, match=shape) as err:
        load_sae(path)
    assert str(path / WEIGHTS_FILE) in str(err.value)


@pytest.mark.parametrize("name", ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"])
def test_load_refuses_a_missing_tensor(tmp_path, name):
    path = exported(tmp_path)
    edit_weights(path, drop=name)
    with pytest.raises(ExportError, match=f"missing tensor '{name}'"):
        load_sae(path)


def test_load_refuses_unknown_architecture(tmp_path):
    path = exported(tmp_path)
    edit_cfg(path, architecture="temporal")
    with pytest.raises(ExportError, match="unknown architecture 'temporal'"):
        load_sae(path)


@pytest.mark.parametrize(("changes", "what"), [
    ({"d_in": None}, "'d_in'"),
    ({"d_sae": "16"}, "'d_sae'"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    *(({"apply_b_dec_to_input": v}, rf"apply_b_dec_to_input must be true or false, got {v!r}")
      for v in ("false", "no", 2, None)),
])
def test_load_refuses_bad_cfg_values(tmp_path, changes, what):
    path = exported(tmp_path)
    edit_cfg(path, **changes)
    with pytest.raises(ExportError, match=what):
        load_sae(path)


def test_a_topk_sae_with_rescaled_activations_loads_folded(tmp_path):
    """SAELens's TopK default, rescale_acts_by_decoder_norm: the top k of the pre-activations
    times each decoder row's norm n, the codes over n decoded (fault testing: refused, so every
    TopK SAE a SAELens run saved was). Folded: the same codes and reconstructions."""
    params, cfg = make_sae("topk")
    rng = np.random.default_rng(3)
    W_dec = np.asarray(params["W_dec"]) * rng.uniform(0.2, 3.0, (D_SAE, 1))  # not unit rows
    params = {**params, "W_dec": jnp.asarray(W_dec, jnp.float32)}
    path = export_sae(params, cfg, tmp_path / "sae")
    edit_cfg(path, rescale_acts_by_decoder_norm=True)
    loaded = load_sae(path)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(inputs(), np.float64)
    n = np.linalg.norm(p["W_dec"], axis=1)
    hidden = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]) * n  # SAELens's, in float64
    kth = np.sort(hidden, axis=1)[:, -K][:, None]
    codes = np.where((hidden >= kth) & (hidden > 0), hidden, 0.0)
    recon = (codes / n) @ p["W_dec"] + p["b_dec"]
    got = np.asarray(encode(jax.tree.map(jnp.asarray, loaded.params), inputs(), loaded.sae))
    np.testing.assert_allclose(got, codes, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got @ loaded.params["W_dec"] + loaded.params["b_dec"], recon,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(loaded.params["W_dec"], axis=1), 1.0, atol=1e-6)
    edit_cfg(path, rescale_acts_by_decoder_norm="yes")
    with pytest.raises(ExportError, match="rescale_acts_by_decoder_norm' must be true or false"):
        load_sae(path)


def test_load_refuses_a_truncated_weights_file(tmp_path):
    path = exported(tmp_path)
    file = path / WEIGHTS_FILE
    os.truncate(file, file.stat().st_size - 8)
    with pytest.raises(ExportError, match="truncated"):
        load_sae(path)


def _sparsify_export(out: Path) -> Path:
    """A TopK SAE of 8 latents in 4 dimensions, exported in sparsify's format to `out`."""
    from jaxsae import sparsify

    W = np.eye(8, 4, dtype=np.float32)
    params = {"W_enc": W.T.copy(), "b_enc": np.zeros(8, np.float32), "W_dec": W,
              "b_dec": np.zeros(4, np.float32)}
    return sparsify.export_sparsify(params, SAEConfig(d_sae=8, activation="topk", k=2), out)


def test_a_sparsify_directory_of_integer_weights_is_refused_naming_the_tensor(tmp_path):
    """(fault testing: a traceback from the unit-row check, exit 1)"""
    from jaxsae import sparsify

    out = _sparsify_export(tmp_path / "e")
    weights = out / sparsify.WEIGHTS_FILE
    tensorfile.write(weights, {k: (v * 10).astype(np.int32)
                               for k, v in tensorfile.read(weights).items()})
    with pytest.raises(ExportError, match=r"sae\.safetensors: encoder\.weight is int32, "
                                          "expected floating point weights"):
        sparsify.read_sparsify(out)


def test_a_sparsify_directory_missing_a_part_is_named_as_sparsify(tmp_path):
    """(fault testing: without its weights file or its k, a sparsify directory was read as a
    SAELens one and refused for a cfg.json 'missing architecture')"""
    from jaxsae import sparsify

    out = _sparsify_export(tmp_path / "e")
    (out / sparsify.WEIGHTS_FILE).unlink()
    with pytest.raises(ExportError, match=r"e/sae\.safetensors"):
        load_sae(out)
    cfg = json.loads((out / "cfg.json").read_text())
    del cfg["k"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"cfg\.json: 'k' must be a positive integer, got None"):
        load_sae(out)


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_latents": None, "expansion_factor": None},
     "'expansion_factor' must be a positive integer, got None"),
    ({"num_latents": 0, "expansion_factor": "2"},
     "'expansion_factor' must be a positive integer, got '2'"),
    ({"num_latents": "8"}, r"'num_latents' must be a positive integer \(0: sized by "
                           r"expansion_factor\), got '8'"),
    ({"num_latents": [8]}, r"'num_latents' must be .*, got \[8\]"),
    ({"num_latents": 8.5}, r"'num_latents' must be .*, got 8\.5"),
    ({"num_latents": True}, r"'num_latents' must be .*, got True"),
    ({"num_latents": -8}, r"'num_latents' must be .*, got -8"),
    ({"d_in": True}, "'d_in' must be a positive integer, got True"),
    ({"k": 2.0}, "'k' must be a positive integer, got 2.0"),
    ({"normalize_decoder": "no"}, "'normalize_decoder' must be true or false, got 'no'"),
])
def test_a_sparsify_cfg_json_of_bad_sizes_is_refused_naming_the_key(tmp_path, changes,
                                                                    message):
    """(fault testing: an expansion_factor null gave a traceback, "4" an SAE expected to be
    '4444444444444444' latents wide blamed on the weights; normalize_decoder "no" was true)"""
    from jaxsae import sparsify

    out = _sparsify_export(tmp_path / "e")
    cfg = json.loads((out / "cfg.json").read_text())
    (out / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 0, "expansion_factor": 2}))
    assert sparsify.read_sparsify(out)[1].d_sae == 8  # (0: sized by expansion_factor)
    (out / "cfg.json").write_text(json.dumps({**cfg, **changes}))
    with pytest.raises(ExportError, match=r"e/cfg\.json: " + message):
        load_sae(out)


def test_an_sae_whose_weights_header_points_before_its_data_is_refused(tmp_path):
    """(fault testing: b_dec at data_offsets [-64, 0] was imported as the header's JSON text)"""
    from jaxsae import sparsify

    out = _sparsify_export(tmp_path / "e")
    weights = out / sparsify.WEIGHTS_FILE
    header, start = tensorfile.read_header(weights)
    header["b_dec"]["data_offsets"] = [-16, 0]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    weights.write_bytes(len(blob).to_bytes(8, "little") + blob + weights.read_bytes()[start:])
    with pytest.raises(ExportError, match=r"sae\.safetensors: tensor 'b_dec': data_offsets "
                                          r"\[-16, 0\] lie outside the file's data"):
        load_sae(out)


def test_importing_sparsify_onto_data_of_another_width_names_the_directory(small_data,
                                                                           tmp_path):
    """(fault testing: the refusal named the temporary conversion, gone by then)"""
    from jaxsae.export import import_config

    out = _sparsify_export(tmp_path / "e")
    with pytest.raises(ExportError, match=rf"d_in 16 does not match {out} \(d_in 4\)"):
        import_config(out, tmp_path / "run", small_data)


def test_a_tied_start_says_only_of_an_encoder_of_its_own(tmp_path):
    """init_from with sae.tied takes the decoder alone and says so when the file's encoder is
    not its decoder's transpose; jaxsae's own tied exports are tied, also with an input scale
    folded in (W_enc = s² W_dec.T; fault testing: the note was said of every normalised tied
    export once normalising became the default)."""
    from jaxsae.export import initial_params
    from jaxsae.sae import fold_input_scale

    tied = SAEConfig(d_sae=16, activation="relu", tied=True, decoder_norm="unit")
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(0), 8, tied).items()}
    params["b_dec"] = np.full(8, 0.5, np.float32)
    export_sae(fold_input_scale(params, 3.0), tied, tmp_path / "tied")
    said = []
    start = initial_params(tmp_path / "tied", tied, 8, scale=3.0, log=said.append)
    assert said == []
    np.testing.assert_allclose(start["W_dec"], params["W_dec"], rtol=1e-6)
    np.testing.assert_allclose(start["b_dec"], params["b_dec"], rtol=1e-6)
    untied = SAEConfig(d_sae=16, activation="relu", decoder_norm="unit")
    own = {**params, "W_enc": params["W_dec"].T * 2}
    export_sae(own, untied, tmp_path / "untied")
    initial_params(tmp_path / "untied", tied, 8, log=said.append)
    assert len(said) == 1 and "has an encoder of its own (up to " in said[0]


@pytest.mark.parametrize(("activation", "tied"), [("topk", False), ("batchtopk", False),
                                                  ("relu", False), ("relu", True)])
def test_a_start_at_another_scale_keeps_unit_rows_and_the_function(tmp_path, activation, tied):
    """An SAE trained with unit rows on inputs scaled by s exports rows 1/s long; started on
    data of another scale s2 (init_from, import), its rows are s2/s long: they are made unit
    and the codes scaled to match, the same function (fault testing: a default TopK SAE
    imported onto other data was refused, "use sae.decoder_norm: free")."""
    from jaxsae.evaluate import encode_decode
    from jaxsae.export import initial_params
    from jaxsae.sae import fold_input_scale

    cfg = SAEConfig(d_sae=16, activation=activation, k=3, tied=tied, decoder_norm="unit")
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(0), 8, cfg).items()}
    params["b_enc"] = np.full(16, -0.05, np.float32)
    params["b_dec"] = np.full(8, 0.3, np.float32)
    s, s2 = 0.5, 0.8
    export_sae(fold_input_scale(params, s), cfg, tmp_path / "sae")
    said = []
    start = initial_params(tmp_path / "sae", cfg, 8, scale=s2, log=said.append)
    np.testing.assert_allclose(np.linalg.norm(start["W_dec"], axis=1), 1.0, rtol=1e-6)
    assert len(said) == 1 and "made unit, the codes scaled to match" in said[0]
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    _, exported = encode_decode(load_sae(tmp_path / "sae").params, jnp.asarray(x), cfg)
    _, started = encode_decode(start, jnp.asarray(x * s2), cfg)
    np.testing.assert_allclose(np.asarray(started) / s2, np.asarray(exported), rtol=1e-4,
                               atol=1e-5)


def test_a_sparsify_export_says_its_rows_are_kept_unit_only_when_they_are(tmp_path):
    """A TopK SAE with unit rows trained on inputs scaled by s exports rows 1/s long;
    sparsify's training would renormalise rows its cfg.json calls normalised (fault testing:
    normalize_decoder was true for them)."""
    from jaxsae import sparsify
    from jaxsae.sae import fold_input_scale

    cfg = SAEConfig(d_sae=16, activation="topk", k=3, decoder_norm="unit")
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(0), 8, cfg).items()}
    for scale, unit in [(1.0, True), (0.5, False)]:
        out = sparsify.export_sparsify(fold_input_scale(params, scale), cfg,
                                       tmp_path / str(scale))
        assert json.loads((out / "cfg.json").read_text())["normalize_decoder"] is unit


def test_import_with_decoder_norm_auto_takes_the_sources_rows(small_data, tmp_path):
    """An override `sae.decoder_norm=auto` imports the source's rows as they are, as a run
    from init_from under auto does (fault testing: it wrote the ReLU's unit rows, which the
    config's train then refused for the source's rows of several lengths)."""
    import yaml

    from jaxsae.export import import_config

    rng = np.random.default_rng(0)
    W_dec = rng.standard_normal((32, 16)).astype(np.float32)
    W_dec *= rng.uniform(0.5, 1.5, (32, 1)).astype(np.float32) / np.linalg.norm(
        W_dec, axis=1, keepdims=True)
    params = {"W_enc": W_dec.T.copy(), "b_enc": np.zeros(32, np.float32), "W_dec": W_dec,
              "b_dec": np.zeros(16, np.float32)}
    export_sae(params, SAEConfig(d_sae=32, decoder_norm="free"), tmp_path / "free")
    config = import_config(tmp_path / "free", tmp_path / "run", small_data,
                           ["sae.decoder_norm=auto"])
    assert yaml.safe_load(config.read_text())["sae"]["decoder_norm"] == "free"


def test_rows_unit_to_unit_rows_are_of_one_length_at_any_scale():
    """Rows `unit_rows` calls unit, at its band's edges, can be made unit at another input
    scale (fault testing: 0.998992..1.001008 trained unscaled and was refused at scale 1.985);
    the norms' range shows the digits that tell them apart (it read "0.999..1")."""
    from jaxsae.export import _rows_made_unit, norm_range
    from jaxsae.sae import unit_band, unit_rows

    for dtype in (np.float32, ml_dtypes.bfloat16):
        band = unit_band(dtype) * (1 - 1e-6)  # (at the edge, inside it)
        norms = np.array([1 - band, 1.0, 1 + band])
        W = np.eye(3, 4) * norms[:, None]
        assert unit_rows(W, dtype)
        params = {"W_enc": np.zeros((4, 3)), "b_enc": np.zeros(3), "W_dec": W}
        for scale in (1.0, 1.985, 0.3):
            assert _rows_made_unit(params, norms * scale, dtype)
        assert not _rows_made_unit(params, np.array([1 - band, 1 + 1.01 * band]) * 1.985,
                                   dtype)
    assert norm_range(np.array([0.9992, 1.0, 1.0008])) == "0.9992..1.0008"
    assert norm_range(np.array([0.0355, 0.0475])) == "0.0355..0.0475"
