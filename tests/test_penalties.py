"""Loss terms and the registry against plain NumPy references (values and gradients)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import penalties, sae
from jaxsae.checks import check_run
from jaxsae.config import SAEConfig, TermConfig, config_from_dict
from jaxsae.errors import ConfigError

D_IN, D_SAE, BATCH, K = 10, 40, 24, 5
RTOL = 1e-5


def assert_close(actual, expected, rtol=RTOL):
    """Relative tolerance, with an absolute floor of rtol * max|expected| (for near-zeros)."""
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def random_params(rng: np.random.Generator, cfg: SAEConfig) -> sae.Params:
    params = {
        "W_dec": rng.normal(size=(cfg.d_sae, D_IN)) * rng.uniform(0.5, 2.0, size=(cfg.d_sae, 1)),
        "b_enc": 0.1 * rng.normal(size=cfg.d_sae),
        "b_dec": 0.1 * rng.normal(size=D_IN),
    }
    if not cfg.tied:
        params["W_enc"] = rng.normal(size=(D_IN, cfg.d_sae)) / np.sqrt(D_IN)
    if cfg.activation in ("jumprelu", "batchtopk"):
        params["threshold"] = rng.uniform(0.05, 0.5, size=cfg.d_sae)
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def f64(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def encoder(p):
    return p["W_enc"] if "W_enc" in p else p["W_dec"].T


def term_value(name, params, x, cfg, step=0, tokens_since_fired=None, **hparams):
    out = sae.forward(params, x, cfg, train=True, tokens_since_fired=tokens_since_fired)
    value, metrics = penalties.get_term(name).fn(out, params, step=jnp.asarray(step), **hparams)
    return value, metrics


def term_grad(name, params, x, cfg, tokens_since_fired=None, **hparams):
    def loss(p):
        return term_value(name, p, x, cfg, tokens_since_fired=tokens_since_fired, **hparams)[0]

    return jax.grad(loss)(params)


def encoder_grads(p, x, dpre):
    """Gradients reaching the encoder side from dL/dpre_acts [batch, d_sae]."""
    xc = x - p["b_dec"]
    grads = {"b_enc": dpre.sum(axis=0), "b_dec": -(dpre @ encoder(p).T).sum(axis=0)}
    if "W_enc" in p:
        grads["W_enc"] = xc.T @ dpre
        grads["W_dec"] = np.zeros_like(p["W_dec"])
    else:
        grads["W_dec"] = dpre.T @ xc
    if "threshold" in p:
        grads["threshold"] = np.zeros_like(p["threshold"])
    return grads


def check_grads(actual, expected):
    assert set(actual) == set(expected)
    for name in expected:
        assert_close(actual[name], expected[name])


@pytest.fixture
def x(rng):
    return jnp.asarray(rng.normal(size=(BATCH, D_IN)), jnp.float32)


# ---------------------------------------------------------------------------------------------
# mse and l1


@pytest.mark.parametrize("tied", [False, True])
def test_mse(rng, x, tied):
    cfg = SAEConfig(d_sae=D_SAE, activation="relu", tied=tied)
    params = random_params(rng, cfg)
    p, xs = f64(params), np.asarray(x, np.float64)
    pre = (xs - p["b_dec"]) @ encoder(p) + p["b_enc"]
    acts = np.maximum(pre, 0)
    r = acts @ p["W_dec"] + p["b_dec"] - xs
    value, metrics = term_value("mse", params, x, cfg)
    assert value.shape == () and metrics == {}
    assert_close(value, np.mean(np.sum(r**2, axis=1)))

    d_xhat = 2 * r / BATCH
    dpre = (d_xhat @ p["W_dec"].T) * (pre > 0)
    expected = encoder_grads(p, xs, dpre)
    expected["W_dec"] = expected["W_dec"] + acts.T @ d_xhat
    expected["b_dec"] = expected["b_dec"] + d_xhat.sum(axis=0)
    check_grads(term_grad("mse", params, x, cfg), expected)


@pytest.mark.parametrize("tied", [False, True])
def test_l1(rng, x, tied):
    cfg = SAEConfig(d_sae=D_SAE, activation="relu", tied=tied, decoder_norm="free")
    params = random_params(rng, cfg)
    p, xs = f64(params), np.asarray(x, np.float64)
    norms = np.linalg.norm(p["W_dec"], axis=1)
    assert norms.std() > 0.1  # decoder norms matter
    pre = (xs - p["b_dec"]) @ encoder(p) + p["b_enc"]
    acts = np.maximum(pre, 0)
    value, metrics = term_value("l1", params, x, cfg)
    assert value.shape == () and metrics == {}
    assert_close(value, np.mean(np.sum(acts * norms, axis=1)))

    dpre = np.broadcast_to(norms / BATCH, pre.shape) * (pre > 0)
    expected = encoder_grads(p, xs, dpre)
    expected["W_dec"] = (expected["W_dec"]
                         + (acts.sum(axis=0) / BATCH / norms)[:, None] * p["W_dec"])
    check_grads(term_grad("l1", params, x, cfg), expected)


def test_l1_with_topk_codes(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="topk", k=K)
    params = random_params(rng, cfg)
    out = sae.forward(params, x, cfg, train=True)
    acts = np.asarray(out.acts, np.float64)
    norms = np.linalg.norm(np.asarray(params["W_dec"], np.float64), axis=1)
    value, _ = penalties.l1(out, params, step=jnp.asarray(0))
    assert_close(value, np.mean(acts @ norms))


# ---------------------------------------------------------------------------------------------
# auxk


def np_auxk(params, x, cfg, tsf, k_aux, dead_tokens):
    """Value and parameter gradients of the AuxK loss, written out in NumPy."""
    p, xs = f64(params), np.asarray(x, np.float64)
    pre = (xs - p["b_dec"]) @ encoder(p) + p["b_enc"]
    out = sae.forward(params, x, cfg, train=True)  # main codes: held fixed by the loss
    residual = xs - np.asarray(out.x_hat, np.float64)
    k = min(k_aux or D_IN // 2, D_SAE)
    dead = np.asarray(tsf) >= dead_tokens
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0.0, {name: np.zeros_like(v) for name, v in p.items()}, n_dead
    masked = np.where(dead, pre, -np.inf)
    idx = np.argsort(-masked, axis=1)[:, : min(k, n_dead)]
    rows = np.arange(BATCH)[:, None]
    aux = np.zeros_like(pre)
    aux[rows, idx] = np.maximum(pre[rows, idx], 0)
    err = aux @ p["W_dec"] - residual
    spread = np.mean(np.sum((residual - residual.mean(axis=0)) ** 2, axis=1))
    scale = min(1.0, n_dead / k)
    value = scale * np.mean(np.sum(err**2, axis=1)) / spread

    d_rhat = scale * 2 * err / (BATCH * spread)
    selected = np.zeros_like(pre, bool)
    selected[rows, idx] = True
    dpre = (d_rhat @ p["W_dec"].T) * selected * (pre > 0)
    grads = encoder_grads(p, xs, dpre)
    grads["W_dec"] = grads["W_dec"] + aux.T @ d_rhat
    return value, grads, n_dead


@pytest.mark.parametrize(
    ("activation", "tied", "n_dead", "k_aux"),
    [
        ("topk", False, 12, 4),  # many dead: scale 1
        ("topk", False, 3, 8),  # fewer dead than k_aux: scale 3/8
        ("batchtopk", False, 20, None),  # default k_aux = d_in // 2
        ("topk", True, 9, 6),
        ("topk", False, 35, 2),  # dead latents in every block width up to d_sae
    ],
)
def test_auxk(rng, x, activation, tied, n_dead, k_aux):
    cfg = SAEConfig(d_sae=D_SAE, activation=activation, k=K, tied=tied)
    params = random_params(rng, cfg)
    dead_tokens = 1000
    tsf = np.zeros(D_SAE, np.int32)
    dead_idx = rng.choice(D_SAE, size=n_dead, replace=False)
    tsf[dead_idx] = dead_tokens + rng.integers(0, 50, size=n_dead)
    tsf[dead_idx[0]] = dead_tokens  # exactly at the limit counts as dead
    tsf[np.setdiff1d(np.arange(D_SAE), dead_idx)[0]] = dead_tokens - 1  # just below: alive
    tsf = jnp.asarray(tsf)
    hp = {"dead_tokens": dead_tokens} | ({"k_aux": k_aux} if k_aux else {})

    expected_value, expected_grads, expected_n_dead = np_auxk(params, x, cfg, tsf, k_aux,
                                                              dead_tokens)
    assert expected_n_dead == n_dead
    value, metrics = term_value("auxk", params, x, cfg, tokens_since_fired=tsf, **hp)
    assert int(metrics["n_dead"]) == n_dead
    assert float(value) > 0
    assert_close(value, expected_value)
    grads = term_grad("auxk", params, x, cfg, tokens_since_fired=tsf, **hp)
    check_grads(grads, expected_grads)
    assert np.abs(np.asarray(grads["b_enc"])[tsf < dead_tokens]).max() == 0.0  # alive: no grad


@pytest.mark.parametrize("most", [20, 35])
def test_auxk_in_a_sweep_takes_the_block_of_the_most_dead(rng, x, most):
    """In a sweep (vmap over SAEs) AuxK's block is sized for the member with the most dead
    latents (20 of 40 at k_aux 8: the 32-wide block, its top 8 a token; 35: all of d_sae);
    the other member, with 3 dead (latent 0 among them, which the block's padding repeats),
    gets its own loss and gradients, as alone."""
    cfg = SAEConfig(d_sae=D_SAE, activation="topk", k=K)
    params = random_params(rng, cfg)
    dead_tokens, k_aux = 1000, 8
    tsf = np.zeros((2, D_SAE), np.int32)
    tsf[0, rng.choice(D_SAE, size=most, replace=False)] = dead_tokens
    tsf[1, [0, 7, 19]] = dead_tokens

    def member(p, t):
        def loss(q):
            out = sae.forward(q, x, cfg, train=True, tokens_since_fired=t, sweep_axis="sweep")
            return penalties.auxk(out, q, step=jnp.asarray(0), k_aux=k_aux,
                                  dead_tokens=dead_tokens)[0]
        return jax.value_and_grad(loss)(p)

    stacked = jax.tree.map(lambda v: jnp.stack([v, v]), params)
    values, grads = jax.jit(jax.vmap(member, axis_name="sweep"))(stacked, jnp.asarray(tsf))
    for i in range(2):
        want_value, want_grads, _ = np_auxk(params, x, cfg, jnp.asarray(tsf[i]), k_aux,
                                            dead_tokens)
        assert_close(values[i], want_value)
        check_grads(jax.tree.map(lambda g, i=i: g[i], grads), want_grads)


def test_auxk_is_zero_without_dead_latents(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="topk", k=K)
    params = random_params(rng, cfg)
    tsf = jnp.full((D_SAE,), 999, jnp.int32)
    value, metrics = term_value("auxk", params, x, cfg, tokens_since_fired=tsf, k_aux=4,
                               dead_tokens=1000)
    assert float(value) == 0.0 and int(metrics["n_dead"]) == 0
    grads = term_grad("auxk", params, x, cfg, tokens_since_fired=tsf, k_aux=4, dead_tokens=1000)
    for name, g in grads.items():
        assert np.isfinite(np.asarray(g)).all(), name
        np.testing.assert_array_equal(g, 0.0)


def test_auxk_scale_with_few_dead(rng, x):
    """With n_dead < k_aux the normalised error is scaled by n_dead / k_aux."""
    cfg = SAEConfig(d_sae=D_SAE, activation="topk", k=K)
    params = random_params(rng, cfg)
    tsf = np.zeros(D_SAE, np.int32)
    tsf[:2] = 10
    out = sae.forward(params, x, cfg, train=True, tokens_since_fired=jnp.asarray(tsf))
    v8, _ = penalties.auxk(out, params, step=jnp.asarray(0), k_aux=8, dead_tokens=10)
    v2, _ = penalties.auxk(out, params, step=jnp.asarray(0), k_aux=2, dead_tokens=10)
    # Both select the same two dead latents; only the scale differs (2/8 vs 1).
    assert_close(v8, 0.25 * float(v2))


def test_only_one_matches_plain_gradient():
    """only_one: value and gradient of the chosen loss (scaled by the outer cotangent), the
    others not taken; also under jit and under vmap (a sweep) with one index for all."""
    p = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
    a = jnp.array([0.5, 1.0, 2.0])
    losses = [lambda q, y: jnp.zeros(()),
              lambda q, y: jnp.sum(jnp.sin(q["w"] * y)) + q["b"] ** 2,
              lambda q, y: jnp.sum(q["w"] ** 3 * y) * q["b"]]

    def outer(q, index, y):
        return 3.0 * penalties.only_one(index, losses, q, y)

    for index, loss in enumerate(losses):
        value, grads = jax.jit(jax.value_and_grad(outer))(p, jnp.asarray(index), a)
        want_value, want_grads = jax.value_and_grad(lambda q, loss=loss: 3.0 * loss(q, a))(p)
        assert_close(value, float(want_value))
        for name in p:
            np.testing.assert_allclose(grads[name], np.asarray(want_grads[name]), rtol=1e-6,
                                       err_msg=f"loss {index} {name}")
    stacked = jax.tree.map(lambda v: jnp.stack([v, 2 * v]), p)
    batched = jax.vmap(jax.grad(outer), in_axes=(0, None, None))(stacked, jnp.asarray(2), a)
    for i, member in enumerate([p, jax.tree.map(lambda v: 2 * v, p)]):
        want = jax.grad(lambda q: 3.0 * losses[2](q, a))(member)
        np.testing.assert_allclose(batched["w"][i], want["w"], rtol=1e-6)
        np.testing.assert_allclose(batched["b"][i], want["b"], rtol=1e-6)


@pytest.mark.parametrize("extra", [{}, {"sweep": {"loss.1.coefficient": [0.5, 2.0]}},
                                   {"freeze": ["b_dec", "W_enc"]}])
def test_the_step_adds_auxk_in_its_branch_as_autodiff_would(monkeypatch, tmp_path, extra):
    """The training step takes AuxK's value and gradient after the rest, inside the branch its
    dead latents choose (total_loss_deferring, add_deferred). Against the same steps with
    AuxK left to plain autodiff (only_one's custom VJP, total_loss): the same loss, AuxK value,
    gradient norm and parameters, with no dead latent, then with some in each block width."""
    from jaxsae.build import build

    tree = {"data": {"path": str(tmp_path)}, "run_dir": str(tmp_path / "run"),
            "sae": {"d_sae": 64, "activation": "topk", "k": 4},
            "loss": [{"term": "mse"},
                     {"term": "auxk", "coefficient": 0.25, "k_aux": 4, "dead_tokens": 100}],
            "optim": {"batch_size": 32, "total_tokens": 32 * 20}}
    cfg = config_from_dict({**tree, **extra})
    plain = penalties.total_loss

    def undeferred(*args):
        return (*plain(*args), [])

    results = {}
    for name in ("deferred", "autodiff"):
        if name == "autodiff":
            monkeypatch.setattr(penalties, "total_loss_deferring", undeferred)
        built = build(cfg, 8)
        state = built.init()
        batches = np.random.default_rng(0).standard_normal((4, 32, 8)).astype(np.float32)
        logged = []
        for i, dead in enumerate([0, 3, 12, 64]):  # none; the k, 4k and d_sae blocks
            since = np.zeros(state.tokens_since_fired.shape, np.int32)
            since[..., :dead] = 1000
            state = dataclasses.replace(state, tokens_since_fired=jnp.asarray(since))
            state, metrics = built.step(state, jnp.asarray(batches[i]))
            logged.append({k: np.asarray(metrics[k]) for k in ("loss", "loss.auxk", "grad_norm")})
        results[name] = logged, jax.device_get(state.params)
    assert np.all(results["deferred"][0][-1]["loss.auxk"] > 0)
    assert np.all(results["deferred"][0][0]["loss.auxk"] == 0)
    for step, (got, want) in enumerate(zip(*(results[n][0] for n in results), strict=True)):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"{step} {key}")
    for key, want in results["autodiff"][1].items():
        np.testing.assert_allclose(results["deferred"][1][key], want, rtol=1e-5, atol=1e-7,
                                   err_msg=key)


# ---------------------------------------------------------------------------------------------
# l0


@pytest.mark.parametrize("bandwidth", [0.001, 0.3])
def test_l0(rng, x, bandwidth):
    cfg = SAEConfig(d_sae=D_SAE, activation="jumprelu")
    params = random_params(rng, cfg)
    p = f64(params)
    pre32 = np.asarray(sae.pre_activations(params, x))
    theta = np.asarray(params["threshold"])
    fired = pre32 > theta
    assert 0 < fired.mean() < 1
    value, metrics = term_value("l0", params, x, cfg, bandwidth=bandwidth)
    assert metrics == {}
    assert_close(value, np.mean(np.sum(fired, axis=1)))

    grads = term_grad("l0", params, x, cfg, bandwidth=bandwidth)
    window = np.abs(pre32.astype(np.float64) - theta) < bandwidth / 2
    expected = {name: np.zeros_like(v) for name, v in p.items()}
    expected["threshold"] = -window.sum(axis=0) / bandwidth / BATCH
    if bandwidth > 0.1:
        assert window.any()
    check_grads(grads, expected)


# ---------------------------------------------------------------------------------------------
# Total loss, coefficients and labels


def test_total_loss_is_weighted_sum(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="relu", decoder_norm="free")
    params = random_params(rng, cfg)
    terms = (
        TermConfig("mse"),
        TermConfig("l1", coefficient=5.0, warmup_steps=10),
        TermConfig("l1", coefficient=0.5, warmup_steps=4),
    )
    out = sae.forward(params, x, cfg, train=True)
    mse = float(penalties.mse(out, params, step=jnp.asarray(0))[0])
    l1 = float(penalties.l1(out, params, step=jnp.asarray(0))[0])
    assert mse > 0 and l1 > 0
    for step in (0, 1, 2, 5, 10, 11, 1000):
        total, metrics = penalties.total_loss(terms, out, params, jnp.asarray(step, jnp.int32))
        c1 = 5.0 * min(1.0, step / 10)
        c2 = 0.5 * min(1.0, step / 4)
        expected = mse + c1 * l1 + c2 * l1
        np.testing.assert_allclose(float(total), expected, rtol=1e-6)
        assert set(metrics) == {"loss.mse", "loss.l1_1", "loss.l1_2"}
        assert float(metrics["loss.mse"]) == mse
        assert float(metrics["loss.l1_1"]) == l1 and float(metrics["loss.l1_2"]) == l1
        assert_close(penalties.coefficient(terms[1], jnp.asarray(step)), c1, rtol=1e-6)
        assert_close(penalties.coefficient(terms[2], jnp.asarray(step)), c2, rtol=1e-6)
    total0, _ = penalties.total_loss(terms, out, params, jnp.asarray(0))
    assert float(total0) == mse  # both l1 terms still at coefficient 0


def test_total_loss_is_differentiable_and_matches_term_grads(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="relu")
    params = random_params(rng, cfg)
    terms = (TermConfig("mse"), TermConfig("l1", coefficient=3.0, warmup_steps=4))
    step = jnp.asarray(2)

    def total(p):
        out = sae.forward(p, x, cfg, train=True)
        return penalties.total_loss(terms, out, p, step)[0]

    grads = jax.grad(total)(params)
    g_mse = term_grad("mse", params, x, cfg)
    g_l1 = term_grad("l1", params, x, cfg)
    for name in params:
        assert_close(grads[name], np.asarray(g_mse[name]) + 1.5 * np.asarray(g_l1[name]))


def test_coefficient_without_warmup_is_constant():
    term = TermConfig("l1", coefficient=2.5)
    for step in (0, 3, 10_000):
        assert float(penalties.coefficient(term, jnp.asarray(step))) == 2.5


def test_total_loss_metrics_include_term_extras(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="topk", k=K)
    params = random_params(rng, cfg)
    tsf = jnp.asarray(np.r_[np.full(7, 100), np.zeros(D_SAE - 7)], jnp.int32)
    out = sae.forward(params, x, cfg, train=True, tokens_since_fired=tsf)
    terms = (TermConfig("mse"), TermConfig("auxk", coefficient=0.25,
                                           params={"k_aux": 4, "dead_tokens": 100}))
    total, metrics = penalties.total_loss(terms, out, params, jnp.asarray(3))
    assert int(metrics["auxk.n_dead"]) == 7
    expected = float(metrics["loss.mse"]) + 0.25 * float(metrics["loss.auxk"])
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("names", "labels"),
    [
        (["mse"], ["mse"]),
        (["mse", "l1"], ["mse", "l1"]),
        (["mse", "l1", "l1"], ["mse", "l1_1", "l1_2"]),
        (["l1", "mse", "l1"], ["l1_0", "mse", "l1_2"]),
        (["mse", "mse", "l1"], ["mse_0", "mse_1", "l1"]),
    ],
)
def test_term_labels(names, labels):
    assert penalties.term_labels([TermConfig(n) for n in names]) == labels


# ---------------------------------------------------------------------------------------------
# The registry


def test_builtin_terms_are_registered():
    assert {"mse", "l1", "auxk", "l0"} <= set(penalties.registered())
    assert penalties.get_term("mse").hparams == {}
    assert penalties.get_term("l1").hparams == {
        "p": float, "weight_by_decoder_norm": bool, "tanh_scale": float | None, "norm": bool}
    assert penalties.get_term("auxk").hparams == {"k_aux": int | None, "dead_tokens": int}
    assert penalties.get_term("l0").hparams == {
        "mode": Literal["step", "tanh", "quadratic"], "bandwidth": float, "tanh_scale": float,
        "target_l0": float | None}


def test_get_term_unknown_name():
    with pytest.raises(ConfigError, match=r"loss\[3\]\.term: unknown loss term 'l3'.*mse"):
        penalties.get_term("l3", key="loss[3].term")
    with pytest.raises(ConfigError, match="'nope'"):
        penalties.get_term("nope")


CUSTOM = "test_penalties_custom_term"


@pytest.fixture
def custom_term():
    assert CUSTOM not in penalties.registered()
    calls = []

    @penalties.register(CUSTOM)
    def custom(
        out: sae.ForwardOutput,
        params: sae.Params,
        *,
        step: jax.Array,
        scale: float = 1.0,
        power: int = 2,
        mode: str = "sum",
    ) -> tuple[jax.Array, penalties.Metrics]:
        calls.append((scale, power, mode))
        value = scale * jnp.mean(jnp.sum(jnp.abs(out.acts) ** power, axis=-1))
        return value, {"power": jnp.asarray(power)}

    try:
        yield calls
    finally:
        penalties._REGISTRY.pop(CUSTOM, None)


def custom_config_tree(**term):
    return {
        "data": {"path": "/nonexistent"},
        "sae": {"d_sae": D_SAE, "activation": "relu"},
        "loss": [{"term": "mse"}, {"term": CUSTOM, **term}],
        "optim": {"batch_size": BATCH, "total_tokens": BATCH * 10, "warmup_steps": 1},
    }


def test_registered_term_is_selectable_from_config(custom_term, rng, x):
    spec = penalties.get_term(CUSTOM)
    assert spec.hparams == {"scale": float, "power": int, "mode": str}
    cfg = config_from_dict(custom_config_tree(coefficient=0.5, scale=2, power=3.0, mode="max"))
    term = penalties.resolve(cfg.loss[1])  # the term types its own hyper-parameters
    assert term.term == CUSTOM and term.coefficient == 0.5
    assert term.params == {"scale": 2.0, "power": 3, "mode": "max"}
    assert type(term.params["scale"]) is float and type(term.params["power"]) is int

    sae_cfg = SAEConfig(d_sae=D_SAE)
    params = random_params(rng, sae_cfg)
    out = sae.forward(params, x, sae_cfg, train=True)
    total, metrics = penalties.total_loss(cfg.loss, out, params, jnp.asarray(0))
    assert custom_term == [(2.0, 3, "max")]
    acts = np.asarray(out.acts, np.float64)
    assert_close(metrics[f"loss.{CUSTOM}"], 2.0 * np.mean(np.sum(acts**3, axis=1)))
    assert int(metrics[f"{CUSTOM}.power"]) == 3
    np.testing.assert_allclose(
        float(total), float(metrics["loss.mse"]) + 0.5 * float(metrics[f"loss.{CUSTOM}"]),
        rtol=1e-6)
    # Defaults apply when YAML sets nothing.
    assert config_from_dict(custom_config_tree()).loss[1].params == {}


@pytest.mark.parametrize(
    ("term", "fragments"),
    [
        ({"scale": "big"}, r"loss\[1\]\.scale: expected a finite number"),
        ({"scale": True}, r"loss\[1\]\.scale"),
        ({"power": 2.5}, r"loss\[1\]\.power: expected an integer"),
        ({"power": False}, r"loss\[1\]\.power"),
        ({"mode": 3}, r"loss\[1\]\.mode: expected a string"),
        ({"scal": 1.0}, r"loss\[1\]\.scal: unknown key \(did you mean 'scale'\?\)"),
    ],
)
def test_registered_term_hparams_are_type_checked(custom_term, term, fragments):
    with pytest.raises(ConfigError, match=fragments):
        check_run(config_from_dict(custom_config_tree(**term)))


def test_register_twice_is_refused_but_a_new_definition_replaces(custom_term):
    with pytest.raises(ValueError, match=rf"'{CUSTOM}' is already registered \(by "
                                         r"\S*test_penalties\.custom_term\.<locals>\."
                                         r"custom\); only a new definition of that one"):
        penalties.register(CUSTOM)(lambda out, params, *, step: (jnp.zeros(()), {}))
    with pytest.raises(ValueError, match="already registered"):
        penalties.register("mse")(lambda out, params, *, step: (jnp.zeros(()), {}))
    # (fault testing: a notebook cell run again had to restart the kernel) the same function
    # defined again, as a re-run cell or a reloaded module defines it, replaces it
    original = penalties.get_term(CUSTOM).fn

    def custom(out, params, *, step, scale: float = 3.0):
        return scale * jnp.zeros(()), {}

    custom.__qualname__ = original.__qualname__
    penalties.register(CUSTOM)(custom)
    assert penalties.get_term(CUSTOM).fn is custom
    penalties.register(CUSTOM)(original)  # (as the fixture left it)


def test_custom_term_check_hook(rng):
    name = CUSTOM + "_checked"

    def check(cfg, term, key):
        if cfg.sae.tied:
            raise ConfigError(f"{key}: needs an untied SAE")

    try:
        penalties.register(name, check=check)(
            lambda out, params, *, step: (jnp.zeros(()), {}))
        tree = custom_config_tree()
        tree["loss"][1]["term"] = name
        check_run(config_from_dict(tree))
        tree["sae"]["tied"] = True
        with pytest.raises(ConfigError, match=r"loss\[1\]: needs an untied SAE"):
            check_run(config_from_dict(tree))
    finally:
        penalties._REGISTRY.pop(name, None)
    assert name not in penalties.registered()


def test_required_hyperparameter_is_a_config_error():
    @penalties.register("test_needs_target")
    def needs_target(out, params, *, step, target: float):
        return jnp.zeros(()), {}

    try:
        with pytest.raises(ConfigError, match=r"loss\[1\]\.target: required"):
            check_run(config_from_dict({"data": {"path": "x"},
                                        "loss": [{"term": "mse"}, {"term": "test_needs_target"}]}))
        cfg = config_from_dict({"data": {"path": "x"}, "loss": [
            {"term": "mse"}, {"term": "test_needs_target", "target": 2}]})
        assert penalties.resolve(cfg.loss[1]).params == {"target": 2.0}
    finally:
        del penalties._REGISTRY["test_needs_target"]


@pytest.mark.parametrize(("loss", "sweep", "match"), [
    ([{"term": "l1"}], None, r"^loss: no reconstruction term \(mse or matryoshka\) with a "
                             r"coefficient > 0, so the decoder would never learn"),
    ([{"term": "mse", "coefficient": 0.0}, {"term": "l1"}], None, r"^loss: no reconstruction"),
    ([{"term": "mse"}, {"term": "l1"}], {"loss.mse.coefficient": [1.0, 0.0]},
     r"^sweep SAE 1 \(loss\.mse\.coefficient=0\.0\): loss: no reconstruction"),
])
def test_a_loss_with_no_reconstruction_term_is_refused(loss, sweep, match):
    """(fault testing: a loss of l1 alone trained and exported a collapsed SAE, EV -0.53)"""
    with pytest.raises(ConfigError, match=match):
        check_run(config_from_dict({"data": {"path": "x"}, "loss": loss, "sweep": sweep}))
    # a Matryoshka loss reconstructs (its last prefix the whole dictionary)
    check_run(config_from_dict({"data": {"path": "x"}, "sae": {"d_sae": 64}, "loss": [
        {"term": "matryoshka", "prefixes": [16, 64]}, {"term": "l1"}]}))
