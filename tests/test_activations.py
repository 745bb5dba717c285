"""The activation registry and the activations added through it: Gated and matching pursuit
against plain numpy references, the target-L0 term, export round trips."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import activations, penalties, sae
from jaxsae.activations.matching_pursuit import pursue
from jaxsae.checks import check_run
from jaxsae.config import SAEConfig, config_from_dict
from jaxsae.errors import ConfigError
from jaxsae.export import export_sae, load_sae

D_IN, D_SAE, BATCH = 8, 24, 16


def _params(cfg: SAEConfig, seed: int = 0) -> dict[str, jax.Array]:
    """Random parameters of every kind the activation has (non-zero biases and gates)."""
    key = jax.random.PRNGKey(seed)
    params = sae.init_params(key, D_IN, cfg)
    return {k: v + 0.1 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
            if k != "W_dec" else v for i, (k, v) in enumerate(sorted(params.items()))}


def _x(seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(0, 1, (BATCH, D_IN)), jnp.float32)


def test_the_registry_describes_every_activation():
    assert {"relu", "topk", "batchtopk", "jumprelu", "gated", "matching_pursuit"} <= set(
        activations.registered())
    assert activations.for_architecture("jumprelu").name == "jumprelu"  # not batchtopk
    assert set(activations.starting_from("jumprelu")) == {"jumprelu", "batchtopk"}
    assert activations.get("matching_pursuit").has_k and not activations.get("gated").has_k
    with pytest.raises(ConfigError, match=r"sae.activation: must be one of .*got 'gelu'"):
        activations.get("gelu")


def test_gated_codes_match_the_formula():
    cfg = SAEConfig(d_sae=D_SAE, activation="gated", decoder_norm="free")
    p = {k: np.asarray(v, np.float64) for k, v in _params(cfg).items()}
    assert sorted(p) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]
    x = np.asarray(_x(), np.float64)
    gate = (x - p["b_dec"]) @ p["W_enc"] + p["b_gate"]
    magnitude = (x - p["b_dec"]) @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"]
    want = (gate > 0) * np.maximum(magnitude, 0)
    out = sae.forward(_params(cfg), _x(), cfg, train=True)
    np.testing.assert_allclose(out.acts, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.penalized_acts, np.maximum(gate, 0), rtol=1e-5, atol=1e-5)
    assert (want > 0).any() and (want == 0).any()


def test_gated_aux_trains_the_gate_through_a_frozen_decoder():
    tree = {"data": {"path": "x"}, "sae": {"d_sae": D_SAE, "activation": "gated"},
            "loss": [{"term": "mse"}, {"term": "l1"}, {"term": "gated_aux"}]}
    cfg = config_from_dict(tree)
    check_run(cfg)
    params = _params(cfg.sae)

    def aux(p):
        out = sae.forward(p, _x(), cfg.sae, train=True)
        return penalties.get_term("gated_aux").fn(out, p, step=jnp.asarray(0))[0]

    value = float(aux(params))
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    gate = np.maximum((np.asarray(_x(), np.float64) - p64["b_dec"]) @ p64["W_enc"]
                      + p64["b_gate"], 0)
    recon = gate @ p64["W_dec"] + p64["b_dec"]
    np.testing.assert_allclose(value, np.mean(np.sum((recon - np.asarray(_x())) ** 2, 1)),
                               rtol=1e-5)
    grads = jax.grad(aux)(params)
    assert float(jnp.abs(grads["W_dec"]).max()) == 0  # b_dec still learns: it centres x
    assert float(jnp.abs(grads["b_gate"]).max()) > 0 and float(jnp.abs(grads["W_enc"]).max()) > 0
    with pytest.raises(ConfigError, match=r"gated_aux.*needs a gate"):
        check_run(config_from_dict({**tree, "sae": {"d_sae": D_SAE}}))


def _pursuit_reference(W: np.ndarray, centred: np.ndarray, steps: int) -> np.ndarray:
    acts = np.zeros((len(centred), len(W)))
    for b, r in enumerate(centred.copy()):
        for _ in range(steps):
            j = int(np.argmax(np.maximum(W @ r, 0)))
            v = max(float(r @ W[j]), 0.0)
            acts[b, j] += v
            r = r - v * W[j]
    return acts


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_matching_pursuit_codes_match_a_greedy_reference(steps):
    cfg = SAEConfig(d_sae=D_SAE, activation="matching_pursuit", k=steps)
    params = _params(cfg)
    assert sorted(params) == ["W_dec", "b_dec"]
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    want = _pursuit_reference(p["W_dec"], np.asarray(_x(), np.float64) - p["b_dec"], steps)
    out = sae.forward(params, _x(), cfg, train=True)
    np.testing.assert_allclose(out.acts, want, rtol=1e-4, atol=1e-5)
    assert ((want > 0).sum(1) <= steps).all()
    # A traced number of steps (sweeps over k) equals that many steps.
    if steps > 1:
        live = pursue(params["W_dec"], _x() - params["b_dec"], steps, live=jnp.asarray(1))
        np.testing.assert_allclose(live, _pursuit_reference(
            p["W_dec"], np.asarray(_x(), np.float64) - p["b_dec"], 1), rtol=1e-4, atol=1e-5)


def test_matching_pursuit_learns_through_every_step():
    cfg = SAEConfig(d_sae=D_SAE, activation="matching_pursuit", k=3)
    params = _params(cfg)

    def mse(p):
        out = sae.forward(p, _x(), cfg, train=True)
        return jnp.mean(jnp.sum(jnp.square(out.x_hat - out.x), -1))

    grads = jax.grad(mse)(params)
    eps = 1e-3
    bumped = {**params, "b_dec": params["b_dec"].at[0].add(eps)}
    numeric = (float(mse(bumped)) - float(mse(params))) / eps
    np.testing.assert_allclose(float(grads["b_dec"][0]), numeric, rtol=0.05, atol=1e-3)


def test_matching_pursuit_refusals():
    tree = {"data": {"path": "x"}, "sae": {"d_sae": D_SAE, "activation": "matching_pursuit",
                                           "k": 4}, "loss": [{"term": "mse"}]}
    check_run(config_from_dict(tree))
    with pytest.raises(ConfigError, match=r"sae.decoder_norm: matching_pursuit needs unit"):
        check_run(config_from_dict({**tree, "sae": {**tree["sae"], "decoder_norm": "free"}}))
    # (fault testing: tied trained, with nothing to tie, and its export said tied)
    with pytest.raises(ConfigError, match=r"^sae.tied: matching_pursuit has no encoder"):
        check_run(config_from_dict({**tree, "sae": {**tree["sae"], "tied": True}}))
    with pytest.raises(ConfigError, match=r"data.normalize"):
        check_run(config_from_dict({**tree, "data": {"path": "x",
                                                     "normalize": "unit_mean_squared_norm"}}))


@pytest.mark.parametrize("activation", ["gated", "matching_pursuit"])
def test_export_round_trip_keeps_the_codes(activation, tmp_path):
    cfg = SAEConfig(d_sae=D_SAE, activation=activation, k=3)
    params = _params(cfg)
    loaded = load_sae(export_sae(params, cfg, tmp_path / "sae"))
    assert loaded.sae.activation == activation
    assert loaded.cfg_json["architecture"] == activation
    np.testing.assert_allclose(sae.encode(loaded.params, _x(), loaded.sae),
                               sae.encode(params, _x(), cfg), rtol=1e-6, atol=1e-6)


def test_target_l0_is_the_quadratic_penalty():
    tree = {"data": {"path": "x"}, "sae": {"d_sae": D_SAE, "activation": "jumprelu",
                                           "jumprelu_bandwidth": 0.1},
            "loss": [{"term": "mse"}, {"term": "target_l0", "target": 4, "coefficient": 2}]}
    cfg = config_from_dict(tree)
    check_run(cfg)
    params = _params(cfg.sae)
    out = sae.forward(params, _x(), cfg.sae, train=True)
    value, metrics = penalties.get_term("target_l0").fn(out, params, step=jnp.asarray(0),
                                                         **penalties.resolve(cfg.loss[1]).params)
    counts = np.sum(np.asarray(out.pre_acts) > np.asarray(params["threshold"]), 1)
    l0 = float(np.mean(counts))
    np.testing.assert_allclose(float(value), np.mean(2 / 4 * (counts - 4.0) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["l0"]), l0, rtol=1e-6)
    with pytest.raises(ConfigError, match=r"loss\[1\].target: required"):
        check_run(config_from_dict({**tree, "loss": [{"term": "mse"}, {"term": "target_l0"}]}))
    with pytest.raises(ConfigError, match=r"target_l0.*learned thresholds"):
        check_run(config_from_dict({**tree, "sae": {"d_sae": D_SAE}}))


@pytest.mark.parametrize("target", [6.0, 12.0])
def test_target_l0_holds_the_trained_l0_near_its_target(small_data, tmp_path, target):
    """JumpReLU with target_l0 on superposition data (3 of 48 features active per token):
    the evaluated L0 lands within 15 % of the target, on either side of the true L0."""
    from jaxsae.train import train
    from tests.conftest import small_config

    cfg = small_config(small_data, tmp_path / "run",
                       sae={"d_sae": 64, "activation": "jumprelu", "jumprelu_bandwidth": 0.05,
                            "jumprelu_init_threshold": 0.1, "decoder_norm": "unit"},
                       loss=[{"term": "mse"}, {"term": "target_l0", "target": target,
                                                "coefficient": 1, "bandwidth": 0.05}],
                       optim={"lr": 1e-2, "batch_size": 256, "total_tokens": 256 * 250,
                              "warmup_steps": "auto", "decay_fraction": 0.1},
                       checkpoint={"every_steps": 1000}, log={"every_steps": 50})
    result = train(cfg, progress=False, log=lambda message: None)
    assert result.eval["l0"] == pytest.approx(target, rel=0.15)
    assert result.eval["explained_variance"] > 0.8


@pytest.mark.parametrize(("sae_cfg", "loss"), [
    ({"activation": "gated"}, [{"term": "mse"}, {"term": "l1", "coefficient": 0.1},
                               {"term": "gated_aux"}]),
    ({"activation": "matching_pursuit", "k": 3, "decoder_norm": "unit"}, [{"term": "mse"}]),
], ids=["gated", "matching_pursuit"])
def test_new_activations_train_export_and_import(small_data, tmp_path, sae_cfg, loss, capsys):
    """Through the command line: train, export, import (the written config trains)."""
    import json

    import yaml

    from jaxsae import cli
    from tests.conftest import small_config_dict

    tree = small_config_dict(small_data, tmp_path / "run", sae={"d_sae": 64, **sae_cfg},
                             loss=loss)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    metrics = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss.mse"] < metrics[0]["loss.mse"]
    loaded = load_sae(tmp_path / "run" / "sae")
    assert loaded.sae.activation == sae_cfg["activation"]
    assert cli.main(["import", str(tmp_path / "run" / "sae"), "--out", str(tmp_path / "ft"),
                     "--data", str(small_data), "optim.total_tokens=2048"]) == 0
    written = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert written["sae"]["activation"] == sae_cfg["activation"]
    assert [t["term"] for t in written["loss"]] == [t["term"] for t in loss]
    assert written["data"]["normalize"] == "none"  # the scale the source trained at
    assert cli.main(["train", str(tmp_path / "ft" / "config.yaml"), "--no-progress",
                     "log.curves=false"]) == 0  # (curves: drawn where tested)


def test_an_import_fine_tunes_at_the_scale_its_source_trained_at():
    """The loss coefficients an import takes are at the scale its source trained at: SAELens's
    files say none (normalize_activations, the only value read), jaxsae's own exports say
    which (before 0.2.0 they did not, and normalisation was off by default)."""
    from jaxsae.export import training_settings

    def normalize(**own):
        return training_settings({"architecture": "standard", "d_in": 8, "d_sae": 16,
                                  **({"jaxsae": own} if own else {})})["normalize"]

    assert normalize() == "none"
    assert normalize(activation="relu") == "none"
    assert normalize(activation="relu", normalize="unit_mean_squared_norm",
                     loss=[{"term": "mse"}]) == "unit_mean_squared_norm"
    assert normalize(activation="relu", normalize="bogus") == "none"


def test_a_saelens_jumprelu_trained_with_the_quadratic_penalty_imports_with_it():
    from jaxsae.export import training_settings

    details = {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": 25, "l0_coefficient": 2.0,
               "jumprelu_bandwidth": 0.05}
    settings = training_settings({"architecture": "jumprelu", "d_in": 8, "d_sae": 16,
                                  "metadata": {"training_architecture_details": details}})
    assert settings["loss"] == [{"term": "mse"}, {"term": "l0", "coefficient": 2.0,
                                                  "mode": "quadratic", "target_l0": 25.0,
                                                  "bandwidth": 0.05}]
    assert settings["sae"]["jumprelu_bandwidth"] == 0.05


def test_a_saelens_standard_sae_trained_with_an_lp_norm_imports_with_it():
    """SAELens penalises the p-norm of each token's f·‖W_dec‖, (Σ vᵖ)^(1/p) (fault testing:
    `lp_norm` was read into `p` alone, Σ vᵖ, another objective for p < 1)."""
    from jaxsae.export import training_settings

    def loss(**fields):
        return training_settings({"architecture": "standard", "d_in": 8, "d_sae": 16,
                                  "l1_coefficient": 3.0, **fields})["loss"]

    assert loss(lp_norm=0.5) == [{"term": "mse"}, {"term": "l1", "coefficient": 3.0, "p": 0.5,
                                                   "norm": True}]
    assert loss(lp_norm=1.0) == loss() == [{"term": "mse"}, {"term": "l1", "coefficient": 3.0}]


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "gated"])
def test_an_import_of_a_jaxsae_export_trains_the_sae_it_was(activation, tmp_path):
    """(fault testing: a tied run's export was imported as an untied run, its encoder then
    trained apart from the decoder; a JumpReLU's `sae.jumprelu_bandwidth` was not in the
    export, and the import fine-tuned at the default 0.001 instead of the 0.05 trained.)
    The import's sae section is the source's: tied, and the threshold's bandwidth."""
    from jaxsae.export import training_settings

    cfg = SAEConfig(d_sae=D_SAE, activation=activation, tied=True, jumprelu_bandwidth=0.05)
    loaded = load_sae(export_sae(_params(cfg), cfg, tmp_path / "sae"))
    settings = training_settings(loaded.cfg_json)["sae"]
    assert settings["tied"] is True
    assert settings.get("jumprelu_bandwidth") == (0.05 if activation == "jumprelu" else None)
    untied = dataclasses.replace(cfg, tied=False)
    loaded = load_sae(export_sae(_params(untied), untied, tmp_path / "untied"))
    assert training_settings(loaded.cfg_json)["sae"].get("tied", False) is False
