"""SAE parameters, activations and decoder constraints against plain NumPy references."""

from __future__ import annotations

import itertools
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import kernels, sae
from jaxsae.activations.batchtopk import batchtopk
from jaxsae.activations.jumprelu import jumprelu
from jaxsae.activations.topk import topk
from jaxsae.config import SAEConfig

D_IN, D_SAE, BATCH, K = 12, 48, 32, 6
RTOL = 1e-5


def assert_close(actual, expected, rtol=RTOL):
    """Relative tolerance, with an absolute floor of rtol * max|expected| (for near-zeros)."""
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def relu(a):
    return np.maximum(a, 0.0)


def random_params(rng: np.random.Generator, cfg: SAEConfig, d_in: int = D_IN) -> sae.Params:
    """Parameters with the right names and shapes, all entries random (not the init values)."""
    params = {
        "W_dec": rng.normal(size=(cfg.d_sae, d_in)),
        "b_enc": 0.1 * rng.normal(size=cfg.d_sae),
        "b_dec": 0.1 * rng.normal(size=d_in),
    }
    if not cfg.tied:
        params["W_enc"] = rng.normal(size=(d_in, cfg.d_sae)) / np.sqrt(d_in)
    if cfg.activation in ("jumprelu", "batchtopk"):
        params["threshold"] = rng.uniform(0.05, 0.5, size=cfg.d_sae)
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def np_pre_acts(params, x):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    w_enc = p["W_enc"] if "W_enc" in p else p["W_dec"].T
    return (np.asarray(x, np.float64) - p["b_dec"]) @ w_enc + p["b_enc"]


def np_topk(pre, k):
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=1)[:, :k]
    rows = np.arange(pre.shape[0])[:, None]
    out[rows, idx] = relu(pre[rows, idx])
    return out


def np_batchtopk(pre, k):
    values = relu(pre)
    keep, threshold = np_batch_top(values, pre.shape[0] * k)
    return values * keep, threshold


@pytest.fixture
def x(rng):
    return jnp.asarray(rng.normal(size=(BATCH, D_IN)), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Initialisation and parameter names

ALL_CONFIGS = [
    SAEConfig(d_sae=D_SAE, activation=a, k=K, tied=t, decoder_norm=n)
    for a, t, n in itertools.product(("relu", "topk", "batchtopk", "jumprelu"), (False, True),
                                     ("unit", "free"))
]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: f"{c.activation}-{c.tied}-"
                         f"{c.decoder_norm}")
def test_init_params_shapes_and_names(cfg):
    params = sae.init_params(jax.random.PRNGKey(1), D_IN, cfg)
    assert sorted(params) == sorted(sae.param_names(cfg))
    shapes = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN),
              "b_dec": (D_IN,), "threshold": (D_SAE,)}
    for name, value in params.items():
        assert value.shape == shapes[name], name
        assert value.dtype == jnp.float32, name
    assert ("W_enc" in params) is (not cfg.tied)
    assert ("threshold" in params) is (cfg.activation in ("jumprelu", "batchtopk"))
    # (a ReLU on unit rows starts where about d_in latents fire: `sae.init_l0: auto`)
    shifted = cfg.activation == "relu" and cfg.decoder_norm == "unit"
    assert np.ptp(np.asarray(params["b_enc"])) == 0 and bool(params["b_enc"][0] < 0) is shifted
    np.testing.assert_array_equal(params["b_dec"], 0.0)
    if not cfg.tied:
        np.testing.assert_array_equal(params["W_enc"], params["W_dec"].T)
    norms = np.linalg.norm(np.asarray(params["W_dec"]), axis=1)
    expected = 1.0 if cfg.decoder_norm == "unit" else cfg.init_decoder_norm
    np.testing.assert_allclose(norms, expected, rtol=1e-6)
    if cfg.activation == "jumprelu":
        np.testing.assert_array_equal(params["threshold"], np.float32(cfg.jumprelu_init_threshold))
    if cfg.activation == "batchtopk":
        np.testing.assert_array_equal(params["threshold"], 0.0)


def test_init_params_depends_on_key():
    cfg = SAEConfig(d_sae=D_SAE, decoder_norm="unit")
    a = sae.init_params(jax.random.PRNGKey(0), D_IN, cfg)
    b = sae.init_params(jax.random.PRNGKey(0), D_IN, cfg)
    c = sae.init_params(jax.random.PRNGKey(1), D_IN, cfg)
    np.testing.assert_array_equal(a["W_dec"], b["W_dec"])
    assert not np.allclose(a["W_dec"], c["W_dec"])
    # Random directions: not all rows alike.
    assert np.std(np.asarray(a["W_dec"])) > 0.1


def test_free_norm_init_respects_init_decoder_norm():
    cfg = SAEConfig(d_sae=D_SAE, decoder_norm="free", init_decoder_norm=0.37)
    params = sae.init_params(jax.random.PRNGKey(2), D_IN, cfg)
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 0.37, rtol=1e-6)


@pytest.mark.parametrize("decoder_norm,init_l0,d_in,d_sae", [
    ("unit", "auto", 64, 2048), ("unit", 100, 64, 2048), ("free", 8, 64, 512),
    ("unit", 64, 64, 96), ("unit", "auto", 64, 96), ("unit", "auto", 64, 48)])
    # (d_in > d_sae / 2: a bias above 0 when asked for, 0 by `auto`)
def test_init_l0_starts_the_encoder_where_that_many_latents_fire(decoder_norm, init_l0, d_in,
                                                                 d_sae):
    """`sae.init_l0`: the encoder's bias starts where about that many latents fire on inputs
    of the given norm; with `auto` (l0 = d_in) and unit rows the first reconstruction's part
    along x is about x (not d_sae / (2 d_in) times it). Measured on random inputs against the
    plain formula's prediction."""
    cfg = SAEConfig(d_sae=d_sae, decoder_norm=decoder_norm, init_l0=init_l0)
    norm = 7.0
    params = sae.init_params(jax.random.PRNGKey(3), d_in, cfg, input_norm=norm)
    x = np.random.default_rng(0).normal(size=(4000, d_in))
    x *= norm / np.linalg.norm(x, axis=1, keepdims=True)
    pre = x @ np.asarray(params["W_enc"], np.float64) + np.asarray(params["b_enc"], np.float64)
    want = min(d_in, d_sae / 2) if init_l0 == "auto" else init_l0
    assert np.ptp(np.asarray(params["b_enc"])) == 0
    if init_l0 == "auto" and d_sae <= 2 * d_in:  # (never more than half the latents)
        np.testing.assert_array_equal(params["b_enc"], 0.0)
    # (a random direction's share of x is Gaussian only for large d_in: "about")
    assert np.mean(np.sum(pre > 0, axis=1)) == pytest.approx(want, rel=0.15)
    if init_l0 == "auto" and d_sae >= 8 * d_in:  # (the wide dictionaries it is for; the
        # share is Gaussian for large d_in only: 0.95 expected at d_in 64, 0.85 at 32)
        recon = np.maximum(pre, 0) @ np.asarray(params["W_dec"], np.float64)
        gain = np.mean(np.sum(recon * x, axis=1)) / norm**2
        assert gain == pytest.approx(1.0, abs=0.15)
    # null: a bias of 0, half the latents firing
    plain = sae.init_params(jax.random.PRNGKey(3), d_in, SAEConfig(
        d_sae=d_sae, decoder_norm=decoder_norm, init_l0=None))
    np.testing.assert_array_equal(plain["b_enc"], 0.0)
    np.testing.assert_array_equal(plain["W_enc"], params["W_enc"])


@pytest.mark.parametrize("sections,why", [
    ({"sae": {"activation": "topk", "init_l0": 10}}, "only for activation relu, not topk"),
    ({"sae": {"init_l0": 0}}, "must be auto, null or in 1..d_sae - 1 (4095), got 0"),
    ({"sae": {"init_l0": 10}, "init_from": "/x"}, "init_from starts from its weights")])
def test_init_l0_is_refused_where_it_cannot_act(sections, why):
    from jaxsae.config import config_from_dict
    from jaxsae.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^sae\.init_l0: .*" + re.escape(why)):
        config_from_dict({"data": {"path": "/d"}, **sections})


def test_tied_encode_uses_decoder_transpose(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, tied=True)
    params = random_params(rng, cfg)
    assert "W_enc" not in params
    np.testing.assert_array_equal(sae.encoder_weight(params), params["W_dec"].T)
    assert_close(sae.pre_activations(params, x), np_pre_acts(params, x))
    assert_close(sae.encode(params, x, cfg), relu(np_pre_acts(params, x)))
    # Equal to the untied SAE whose encoder is W_dec.T.
    untied = {**params, "W_enc": params["W_dec"].T}
    np.testing.assert_allclose(sae.encode(params, x, cfg),
                               sae.encode(untied, x, SAEConfig(d_sae=D_SAE)), rtol=1e-6)


@pytest.mark.parametrize(
    ("activation", "tied", "names"),
    [
        ("relu", False, {"W_enc", "b_enc", "W_dec", "b_dec"}),
        ("relu", True, {"b_enc", "W_dec", "b_dec"}),
        ("topk", False, {"W_enc", "b_enc", "W_dec", "b_dec"}),
        ("jumprelu", False, {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
        ("jumprelu", True, {"b_enc", "W_dec", "b_dec", "threshold"}),
        ("batchtopk", False, {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    ],
)
def test_param_names(activation, tied, names):
    cfg = SAEConfig(d_sae=D_SAE, activation=activation, tied=tied)
    assert set(sae.param_names(cfg)) == names
    assert len(sae.param_names(cfg)) == len(names)


def test_is_trainable():
    for activation in ("relu", "topk", "jumprelu", "batchtopk"):
        cfg = SAEConfig(d_sae=D_SAE, activation=activation)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert sae.is_trainable(name, cfg)
    assert sae.is_trainable("threshold", SAEConfig(activation="jumprelu"))
    assert not sae.is_trainable("threshold", SAEConfig(activation="batchtopk"))


# ---------------------------------------------------------------------------------------------
# Activations


def test_relu_encode(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="relu")
    params = random_params(rng, cfg)
    pre = np_pre_acts(params, x)
    assert (pre > 0).any() and (pre < 0).any()
    assert_close(sae.pre_activations(params, x), pre)
    assert_close(sae.encode(params, x, cfg), relu(pre))
    assert_close(sae.encode(params, x, cfg, train=True), relu(pre))


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_one_input_encodes_as_a_batch_of_one(rng, x, activation):
    """(fault testing: encode(params, x[0], cfg), the first call after load_sae, failed deep
    inside with "axis 1 is out of bounds")"""
    cfg = SAEConfig(d_sae=D_SAE, activation=activation, k=K)
    params = random_params(rng, cfg)
    one = np.asarray(sae.encode(params, x[3], cfg))
    assert one.shape == (D_SAE,)
    np.testing.assert_allclose(one, np.asarray(sae.encode(params, x, cfg))[3], rtol=1e-5,
                               atol=1e-5)  # (a matmul of one row rounds its own way)


def test_topk_function_keeps_k_per_row(rng):
    pre = rng.normal(size=(BATCH, D_SAE)).astype(np.float32)
    out = np.asarray(topk(jnp.asarray(pre), K))
    assert (np.count_nonzero(out, axis=1) == K).all()
    np.testing.assert_array_equal(out, np_topk(pre.astype(np.float64), K).astype(np.float32))


def test_topk_applies_relu_when_fewer_than_k_positive(rng):
    pre = -np.abs(rng.normal(size=(4, D_SAE))).astype(np.float32)
    pre[:, :2] = [1.5, 0.5]
    out = np.asarray(topk(jnp.asarray(pre), K))
    expected = np.zeros_like(pre)
    expected[:, :2] = [1.5, 0.5]
    np.testing.assert_array_equal(out, expected)


def test_topk_encode(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="topk", k=K)
    params = random_params(rng, cfg)
    pre = np_pre_acts(params, x)
    assert ((pre > 0).sum(axis=1) >= K).all()  # so every row keeps exactly K
    acts = np.asarray(sae.encode(params, x, cfg))
    assert (np.count_nonzero(acts, axis=1) == K).all()
    assert_close(acts, np_topk(pre, K))
    assert_close(sae.encode(params, x, cfg, train=True), np_topk(pre, K))


def test_batchtopk_keeps_batch_times_k(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="batchtopk", k=K)
    params = random_params(rng, cfg)
    pre32 = np.asarray(sae.pre_activations(params, x))
    assert (pre32 > 0).sum() > BATCH * K
    acts, threshold = batchtopk(jnp.asarray(pre32), K)
    expected, expected_threshold = np_batchtopk(pre32, K)
    assert np.count_nonzero(np.asarray(acts)) == BATCH * K
    np.testing.assert_array_equal(np.asarray(acts), expected)
    assert float(threshold) == expected_threshold
    # Rows may keep different numbers of latents: only the batch total is fixed.
    assert len(set(np.count_nonzero(np.asarray(acts), axis=1))) > 1
    # Through activate / forward in training mode.
    out = sae.forward(params, x, cfg, train=True)
    np.testing.assert_array_equal(np.asarray(out.acts), expected)
    assert float(out.batch_threshold) == expected_threshold


def test_batchtopk_with_fewer_positives_than_target_keeps_all_positives(rng):
    pre = rng.normal(size=(8, 16)).astype(np.float32)
    k = 12  # target 96 of 128 entries; about 64 are positive
    assert (pre > 0).sum() < 8 * k
    acts, threshold = batchtopk(jnp.asarray(pre), k)
    np.testing.assert_array_equal(np.asarray(acts), relu(pre))
    assert float(threshold) == pre[pre > 0].min()  # the smallest kept value, not 0
    acts, threshold = batchtopk(jnp.asarray(-np.abs(pre)), k)  # none kept: 0
    assert float(threshold) == 0.0 and not np.asarray(acts).any()


@pytest.mark.parametrize("sparse", [False, True])
def test_batchtopk_threshold_of_a_batch_with_few_positives(rng, x, sparse):
    """(fault testing: a batch with fewer than batch·k positive pre-activations gave the
    inference threshold's average a 0, SAELens averaging the smallest kept value.) Its
    threshold is its smallest kept value, on the dense and the sparse path alike; a batch
    that keeps nothing leaves θ as it was."""
    cfg = SAEConfig(d_sae=D_SAE, activation="batchtopk", k=K)
    params = random_params(rng, cfg)
    params["b_enc"] = params["b_enc"].at[3:].set(-100.0)  # three latents can fire
    pre = np_pre_acts(params, x)
    assert 0 < (pre > 0).sum() < BATCH * K
    out = sae.forward(params, x, cfg, train=True, sparse=sparse)
    assert (out.top_index is not None) is sparse
    smallest = np.asarray(sae.pre_activations(params, x))[pre > 0].min()
    assert float(out.batch_threshold) == smallest
    new = sae.after_update(params, out, jnp.asarray(0), cfg)
    np.testing.assert_array_equal(new["threshold"], np.full(D_SAE, smallest, np.float32))
    params["b_enc"] = params["b_enc"].at[:].set(-100.0)  # none can
    out = sae.forward(params, x, cfg, train=True, sparse=sparse)
    assert float(out.batch_threshold) == 0.0
    for step in (0, 5000):
        kept = sae.after_update(new, out, jnp.asarray(step), cfg)
        np.testing.assert_array_equal(kept["threshold"], new["threshold"])
    # after batches that kept nothing, θ still at its start (0), the first that keeps
    # something sets it whole (review: at step 1 it was averaged with the start's 0)
    fresh = {**params, "threshold": jnp.zeros(D_SAE, jnp.float32)}
    first = dummy_output(params, x, cfg, 0.75)
    np.testing.assert_array_equal(sae.after_update(fresh, first, jnp.asarray(1), cfg)
                                  ["threshold"], np.full(D_SAE, 0.75, np.float32))


@pytest.mark.parametrize("k", [1, 7, 100, 511, 512])
def test_kth_largest_nonnegative(rng, k):
    values = relu(rng.normal(size=(16, 32))).astype(np.float32)  # about half are zero
    expected = np.sort(values.ravel())[::-1][k - 1]
    got = kernels.kth_largest_nonnegative(jnp.asarray(values), k)
    assert got.dtype == jnp.float32
    assert float(got) == expected
    value, reaching = kernels.kth_largest_and_count(jnp.asarray(values), k)
    assert float(value) == expected and int(reaching) == int((values >= expected).sum())
    if k > (values > 0).sum():
        assert float(got) == 0.0


def test_kth_largest_nonnegative_fewer_positives_than_k():
    values = jnp.asarray([[0.0, 3.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.0]], jnp.float32)
    assert float(kernels.kth_largest_nonnegative(values, 3)) == 0.5
    assert float(kernels.kth_largest_nonnegative(values, 4)) == 0.0
    assert float(kernels.kth_largest_nonnegative(values, 8)) == 0.0
    assert float(kernels.kth_largest_nonnegative(jnp.zeros((3, 3)), 1)) == 0.0


def test_kth_largest_nonnegative_wide_range():
    values = np.asarray([1e-30, 2e-30, 1e30, 3.0, 7.5e5, np.finfo(np.float32).tiny, 0.0],
                        np.float32)
    ordered = np.sort(values)[::-1]
    for k in range(1, len(values) + 1):
        assert float(kernels.kth_largest_nonnegative(jnp.asarray(values), k)) == ordered[k - 1]


@pytest.mark.parametrize("n,density,size", [(1000, 0.05, 64), (1000, 0.05, 10), (1000, 0.0, 8),
                                             (257, 1.0, 300), (1, 1.0, 1), (4096, 0.5, 2048)])
def test_first_true_is_nonzero(n, density, size):
    """The compaction behind BatchTopK's selection against jnp.nonzero: fewer, more and no
    True entries than `size`, all True, a single entry."""
    mask = np.random.default_rng(n + size).random(n) < density
    position, count = jax.jit(kernels.first_true, static_argnums=1)(jnp.asarray(mask), size)
    (want,) = jnp.nonzero(jnp.asarray(mask), size=size, fill_value=0)
    np.testing.assert_array_equal(np.asarray(position), np.asarray(want))
    assert position.dtype == jnp.int32
    assert int(count) == int(mask.sum())


def test_batchtopk_inference_uses_threshold(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="batchtopk", k=K)
    params = random_params(rng, cfg)
    pre = np.asarray(sae.pre_activations(params, x))
    threshold = np.asarray(params["threshold"])
    expected = relu(pre) * (pre > threshold)
    assert 0 < np.count_nonzero(expected) < np.count_nonzero(relu(pre))
    np.testing.assert_array_equal(np.asarray(sae.encode(params, x, cfg, train=False)), expected)
    out = sae.forward(params, x, cfg, train=False)
    np.testing.assert_array_equal(np.asarray(out.acts), expected)
    assert float(out.batch_threshold) == 0.0


def test_jumprelu_encode(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="jumprelu")
    params = random_params(rng, cfg)
    pre = np.asarray(sae.pre_activations(params, x))
    threshold = np.asarray(params["threshold"])
    expected = relu(pre) * (pre > threshold)
    assert 0 < np.count_nonzero(expected) < np.count_nonzero(relu(pre))
    np.testing.assert_array_equal(np.asarray(sae.encode(params, x, cfg)), expected)


# ---------------------------------------------------------------------------------------------
# Straight-through gradients

EPS = 0.4  # wide window so many entries fall inside it


def ste_inputs(rng):
    z = rng.normal(size=(BATCH, D_SAE)).astype(np.float32)
    theta = rng.uniform(-0.3, 0.6, size=D_SAE).astype(np.float32)  # some negative thresholds
    g = rng.normal(size=(BATCH, D_SAE)).astype(np.float32)
    return z, theta, g


def in_window(z, theta, eps):
    return np.abs(z.astype(np.float64) - theta) < eps / 2


def test_jumprelu_forward_and_gradients(rng):
    z, theta, g = ste_inputs(rng)
    out = jumprelu(jnp.asarray(z), jnp.asarray(theta), EPS)
    np.testing.assert_array_equal(np.asarray(out), relu(z) * (z > theta))

    def loss(z_, theta_):
        return jnp.sum(jumprelu(z_, theta_, EPS) * g)

    dz, dtheta = jax.grad(loss, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(theta))
    window = in_window(z, theta, EPS)
    assert 0.1 < window.mean() < 0.9
    np.testing.assert_array_equal(np.asarray(dz), g * ((z > theta) & (z > 0)))
    expected = np.sum(-(theta.astype(np.float64) / EPS) * window * g, axis=0)
    assert dtheta.shape == (D_SAE,)
    assert_close(dtheta, expected)


def test_jumprelu_gradient_through_forward(rng, x):
    """The threshold of a JumpReLU SAE gets the straight-through gradient inside forward()."""
    cfg = SAEConfig(d_sae=D_SAE, activation="jumprelu", jumprelu_bandwidth=EPS)
    params = random_params(rng, cfg)
    g = rng.normal(size=(BATCH, D_SAE)).astype(np.float32)

    def loss(p):
        return jnp.sum(sae.forward(p, x, cfg, train=True).acts * g)

    grads = jax.grad(loss)(params)
    z = np.asarray(sae.pre_activations(params, x))
    theta = np.asarray(params["threshold"])
    expected = np.sum(-(theta.astype(np.float64) / EPS) * in_window(z, theta, EPS) * g, axis=0)
    assert_close(grads["threshold"], expected)
    passes = (z > theta) & (z > 0)
    assert_close(grads["b_enc"], np.sum(g * passes, axis=0))


def test_step_ste_forward_and_gradient(rng):
    z, theta, g = ste_inputs(rng)
    out = kernels.step_ste(jnp.asarray(z), jnp.asarray(theta), EPS)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), (z > theta).astype(np.float32))

    def loss(z_, theta_):
        return jnp.sum(kernels.step_ste(z_, theta_, EPS) * g)

    dz, dtheta = jax.grad(loss, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(theta))
    np.testing.assert_array_equal(np.asarray(dz), 0.0)
    expected = np.sum(-(1.0 / EPS) * in_window(z, theta, EPS) * g, axis=0)
    assert_close(dtheta, expected)
    # With g = 1: minus the count of entries in the window, over epsilon.
    ones = jax.grad(lambda t: jnp.sum(kernels.step_ste(jnp.asarray(z), t, EPS)))(jnp.asarray(theta))
    assert_close(ones, -in_window(z, theta, EPS).sum(axis=0) / EPS)


# ---------------------------------------------------------------------------------------------
# Decoder constraints and the BatchTopK threshold


def test_project_decoder_grad_removes_parallel_component(rng):
    cfg = SAEConfig(d_sae=D_SAE, decoder_norm="unit")
    params = sae.init_params(jax.random.PRNGKey(3), D_IN, cfg)
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    projected = sae.project_decoder_grad(params, grads, cfg)
    W, g, p = (np.asarray(a, np.float64) for a in (params["W_dec"], grads["W_dec"],
                                                   projected["W_dec"]))
    assert np.abs(np.sum(g * W, axis=1)).max() > 0.1  # there was a parallel component
    np.testing.assert_allclose(np.sum(p * W, axis=1), 0.0, atol=1e-5)
    # Only the parallel part is removed.
    expected = g - np.sum(g * W, axis=1, keepdims=True) / np.sum(W * W, axis=1,
                                                                  keepdims=True) * W
    assert_close(p, expected)
    for name in ("W_enc", "b_enc", "b_dec"):
        np.testing.assert_array_equal(projected[name], grads[name])


def test_project_decoder_grad_non_unit_rows(rng):
    cfg = SAEConfig(d_sae=D_SAE, decoder_norm="unit")
    params = random_params(rng, cfg)  # rows not of unit norm: still projected per row
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    p = np.asarray(sae.project_decoder_grad(params, grads, cfg)["W_dec"], np.float64)
    W = np.asarray(params["W_dec"], np.float64)
    np.testing.assert_allclose(np.sum(p * W, axis=1), 0.0, atol=1e-5)


def test_project_decoder_grad_is_identity_for_free(rng):
    cfg = SAEConfig(d_sae=D_SAE, decoder_norm="free")
    params = sae.init_params(jax.random.PRNGKey(3), D_IN, cfg)
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    projected = sae.project_decoder_grad(params, grads, cfg)
    assert set(projected) == set(grads)
    for name in grads:
        np.testing.assert_array_equal(projected[name], grads[name])


def dummy_output(params, x, cfg, batch_threshold):
    out = sae.forward(params, x, cfg, train=True)
    return out.replace(batch_threshold=jnp.asarray(batch_threshold, jnp.float32))


def test_after_update_renormalises_unit_rows(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, decoder_norm="unit")
    params = random_params(rng, cfg)
    assert np.abs(np.linalg.norm(params["W_dec"], axis=1) - 1).max() > 0.1
    out = sae.forward(params, x, cfg, train=True)
    new = sae.after_update(params, out, jnp.asarray(5), cfg)
    W = np.asarray(params["W_dec"], np.float64)
    np.testing.assert_allclose(np.linalg.norm(new["W_dec"], axis=1), 1.0, rtol=1e-6)
    assert_close(new["W_dec"], W / np.linalg.norm(W, axis=1, keepdims=True))
    for name in ("W_enc", "b_enc", "b_dec"):
        np.testing.assert_array_equal(new[name], params[name])


def test_after_update_leaves_free_rows(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, decoder_norm="free")
    params = random_params(rng, cfg)
    out = sae.forward(params, x, cfg, train=True)
    new = sae.after_update(params, out, jnp.asarray(5), cfg)
    for name in params:
        np.testing.assert_array_equal(new[name], params[name])


def test_after_update_batchtopk_threshold_first_step_is_exact(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="batchtopk", k=K, batchtopk_threshold_momentum=0.01)
    params = random_params(rng, cfg)
    params["threshold"] = sae.init_params(jax.random.PRNGKey(0), D_IN, cfg)["threshold"]
    out = sae.forward(params, x, cfg, train=True)
    assert float(out.batch_threshold) > 0
    new = sae.after_update(params, out, jnp.asarray(0), cfg)
    np.testing.assert_array_equal(new["threshold"], np.full(D_SAE, out.batch_threshold))
    # Whatever the previous value, step 0 replaces it (to rounding: old + (new - old)).
    params["threshold"] = jnp.asarray(rng.uniform(0.0, 3.0, size=D_SAE), jnp.float32)
    new = sae.after_update(params, out, jnp.asarray(0), cfg)
    np.testing.assert_allclose(new["threshold"], float(out.batch_threshold), rtol=1e-6)


def test_after_update_batchtopk_threshold_ema(rng, x):
    momentum = 0.05
    cfg = SAEConfig(d_sae=D_SAE, activation="batchtopk", k=K,
                    batchtopk_threshold_momentum=momentum)
    params = random_params(rng, cfg)
    old = np.asarray(params["threshold"], np.float64)
    out = dummy_output(params, x, cfg, 0.75)
    for step in (100, 1000):  # past the first 1 / momentum steps: a plain EMA
        new = sae.after_update(params, out, jnp.asarray(step), cfg)
        assert_close(new["threshold"], old + momentum * (0.75 - old))


def test_after_update_batchtopk_threshold_averages_first_batches(rng, x):
    # Documented: the first 1/momentum batches are averaged exactly, then an EMA takes over.
    cfg = SAEConfig(d_sae=D_SAE, activation="batchtopk", k=K, batchtopk_threshold_momentum=0.1)
    params = random_params(rng, cfg)
    batch_thresholds = rng.uniform(0.1, 1.0, size=6)
    for step, bt in enumerate(batch_thresholds):
        params = sae.after_update(params, dummy_output(params, x, cfg, bt), jnp.asarray(step),
                                  cfg)
    assert_close(params["threshold"], np.full(D_SAE, batch_thresholds.mean()))


def test_after_update_keeps_jumprelus_threshold_non_negative(rng, x):
    """(fault testing: an L0 target above what the pre-activations allow drove θ below 0,
    where the penalties count latents z > θ that never fire.) θ < 0 is set to 0; the rest
    stays."""
    cfg = SAEConfig(d_sae=D_SAE, activation="jumprelu", decoder_norm="free")
    params = random_params(rng, cfg)
    theta = rng.uniform(-1.0, 1.0, size=D_SAE).astype(np.float32)
    params["threshold"] = jnp.asarray(theta)
    new = sae.after_update(params, dummy_output(params, x, cfg, 0.0), jnp.asarray(3), cfg)
    np.testing.assert_array_equal(new["threshold"], np.maximum(theta, 0))
    assert (theta < 0).any() and (theta > 0).any()


def test_after_update_other_activations_keep_threshold(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="jumprelu", decoder_norm="free")
    params = random_params(rng, cfg)
    out = dummy_output(params, x, cfg, 0.9)
    new = sae.after_update(params, out, jnp.asarray(0), cfg)
    np.testing.assert_array_equal(new["threshold"], params["threshold"])


# ---------------------------------------------------------------------------------------------
# forward()


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("tied", [False, True])
def test_forward_fields(rng, x, activation, tied):
    cfg = SAEConfig(d_sae=D_SAE, activation=activation, k=K, tied=tied)
    params = random_params(rng, cfg)
    tsf = jnp.arange(D_SAE, dtype=jnp.int32) * 7
    key = jax.random.PRNGKey(42)
    out = sae.forward(params, x, cfg, train=True, tokens_since_fired=tsf, key=key)
    assert out.x.shape == (BATCH, D_IN)
    assert out.pre_acts.shape == (BATCH, D_SAE)
    assert out.acts.shape == (BATCH, D_SAE)
    assert out.x_hat.shape == (BATCH, D_IN)
    assert out.decoder_norms.shape == (D_SAE,)
    assert out.tokens_since_fired.shape == (D_SAE,)
    assert out.batch_threshold.shape == ()
    np.testing.assert_array_equal(out.x, x)
    np.testing.assert_array_equal(out.tokens_since_fired, tsf)
    np.testing.assert_array_equal(jax.random.key_data(out.key), jax.random.key_data(key))
    assert_close(out.pre_acts, np_pre_acts(params, x))
    acts = np.asarray(out.acts, np.float64)
    W = np.asarray(params["W_dec"], np.float64)
    assert_close(out.x_hat, acts @ W + np.asarray(params["b_dec"], np.float64))
    # The sparse TopK decode sums the k rows in another order than the dense matmul.
    np.testing.assert_allclose(out.x_hat, sae.decode(params, out.acts), rtol=1e-5, atol=1e-5)
    assert_close(out.decoder_norms, np.linalg.norm(W, axis=1))
    assert (acts >= 0).all() and (acts > 0).any()
    if activation != "batchtopk":
        assert float(out.batch_threshold) == 0.0


def test_forward_defaults(rng, x):
    cfg = SAEConfig(d_sae=D_SAE)
    params = random_params(rng, cfg)
    out = sae.forward(params, x, cfg, train=False)
    np.testing.assert_array_equal(out.tokens_since_fired, np.zeros(D_SAE, np.int32))
    assert out.key.shape == jax.random.PRNGKey(0).shape


def test_forward_is_jittable(rng, x):
    cfg = SAEConfig(d_sae=D_SAE, activation="batchtopk", k=K)
    params = random_params(rng, cfg)
    eager = sae.forward(params, x, cfg, train=True)
    jitted = jax.jit(lambda p, v: sae.forward(p, v, cfg, train=True))(params, x)
    np.testing.assert_allclose(jitted.x_hat, eager.x_hat, rtol=1e-5, atol=1e-6)
    assert float(jitted.batch_threshold) == pytest.approx(float(eager.batch_threshold), rel=1e-6)


SPARSE_CASES = {
    # (activation, tied, k, d_in, extra loss terms, traced k): k and d_in cover the unrolled
    # chunks of the k-sums and the d_in chunk widths; the prefixes, every block of the scatter
    # decode; a traced k (below sae.k), a sweep over k.
    "topk tied traced k": ("topk", True, 5, 12, [], True),
    "topk k 8 d_in 40": ("topk", False, 8, 40, [], False),
    "topk tied k 21": ("topk", True, 21, 48, [], False),
    "topk matryoshka traced k": ("topk", False, 5, 12,
                                 [{"term": "matryoshka", "prefixes": [4, 16, 64]}], True),
    "batchtopk traced k": ("batchtopk", False, 5, 12, [], True),
    "batchtopk tied d_in 40": ("batchtopk", True, 8, 40, [], False),
    "batchtopk matryoshka traced k": ("batchtopk", False, 6, 12,
                                      [{"term": "matryoshka", "prefixes": [8, 24, 64],
                                        "weights": [0.5, 1.0, 2.0]}], True),
    "batchtopk matryoshka sampled tied": ("batchtopk", True, 6, 12,
                                          [{"term": "matryoshka", "sample": {"n": 4}}], False),
}


# The other kernel implementations (jaxsae.kernels) on the cases that reach every operation:
# gathered and scattered decodes, tied and untied, flat BatchTopK codes, a traced k; d_in 16
# so that the Pallas kernels take them (they need d_in divisible by 16).
_OTHER_KERNELS = [(case, impl) for impl in ("xla", "pallas")
                  for case in ("topk tied traced k", "topk matryoshka traced k",
                               "batchtopk matryoshka sampled tied")]


@pytest.mark.parametrize(("case", "impl"), [(case, "cpu") for case in SPARSE_CASES]
                         + _OTHER_KERNELS, ids=lambda v: v)
def test_sparse_path_equals_dense_path(case, impl):
    """The sparse TopK / BatchTopK paths (selected entries, gathered or scattered rows,
    scatter-add gradients, the sparse AuxK, prefix losses from sparse codes) against the dense
    path (`sparse=False`): codes, every gradient, the batch threshold, L0 and firing; with a
    traced k below sae.k (a sweep over k) too. Inputs vary in scale by row, so BatchTopK
    tokens keep from 0 to dozens of latents. Each kernel implementation (`impl`)."""
    from jaxsae import penalties
    from jaxsae.config import config_from_dict

    activation, tied, k, d_in, extra, traced_k = SPARSE_CASES[case]
    if impl != "cpu":
        d_in = 16
    cfg = config_from_dict({"data": {"path": "x"},
                            "sae": {"d_sae": 64, "activation": activation, "k": k, "tied": tied,
                                    "decoder_norm": "free"},
                            "loss": [{"term": "mse"}, {"term": "auxk", "dead_tokens": 1},
                                     {"term": "l1", "coefficient": 0.1}, *extra]})
    key = jax.random.PRNGKey(3)
    params = sae.init_params(key, d_in, cfg.sae)
    params = {k: v + 0.05 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
              for i, (k, v) in enumerate(params.items())}
    scale = jnp.exp(jax.random.normal(jax.random.fold_in(key, 98), (32, 1)))
    x = scale * jnp.abs(jax.random.normal(jax.random.fold_in(key, 99), (32, d_in)))
    dead = jnp.where(jnp.arange(64) % 3 == 0, 10, 0)  # some dead latents: auxk is non-zero
    live = jnp.asarray(k - 2) if traced_k else None
    ends = penalties.prefix_ends(cfg)

    def loss(p, sparse: bool):
        with kernels.using(impl):
            out = sae.forward(p, x, cfg.sae, train=True, tokens_since_fired=dead,
                              prefix_ends=ends, k=live, sparse=sparse)
            assert (out.top_index is not None) is sparse
            return penalties.total_loss(cfg.loss, out, p, jnp.asarray(0))[0], out

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l_sparse, out_s), g_sparse = grad(params, True)
    (l_dense, out_d), g_dense = grad(params, False)
    np.testing.assert_allclose(out_s.acts, out_d.acts, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_s.fired(), out_d.fired())
    np.testing.assert_array_equal(out_s.l0(), out_d.l0())
    if activation == "batchtopk":
        assert out_s.top_rows is not None
        assert float(jnp.sum(out_d.l0())) == 32 * (k - 2 if traced_k else k)
        assert int(jnp.max(out_d.l0())) > 2 * k  # tokens far from k: the flat layout is used
        np.testing.assert_array_equal(out_s.batch_threshold, out_d.batch_threshold)
    np.testing.assert_allclose(out_s.block_recons, out_d.block_recons, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_s.x_hat, out_d.x_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_sparse, l_dense, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(g_sparse[name], g_dense[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def np_batch_top(values: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """The reference: the mask of the n largest positive entries of the flattened array
    (all positives when fewer), equal values taken in row-major order (a stable sort), and
    the n-th largest positive value (0 when fewer)."""
    flat = values.ravel()
    order = np.argsort(-flat, kind="stable")[:n]
    order = order[flat[order] > 0]
    keep = np.zeros(flat.shape, bool)
    keep[order] = True
    threshold = float(flat[order[-1]]) if len(order) == n else 0.0
    return keep.reshape(values.shape), threshold


@pytest.mark.parametrize(("rows", "width", "k"), [(32, 256, 4), (16, 96, 3), (8, 40, 2),
                                                   (64, 512, 8), (6, 7, 2)])
def test_batch_top_k_entries_against_numpy(rows, width, k):
    """The flat BatchTopK selection (chunk maxima across the batch, then the candidates)
    against a full sort: rows of very different scales (some keep none, one keeps most),
    negative entries, widths not divisible by 16 (narrower chunks), and a traced k."""
    rng = np.random.default_rng(rows * width + k)
    values = rng.standard_normal((rows, width)).astype(np.float32)
    values *= np.exp(2 * rng.standard_normal((rows, 1))).astype(np.float32)
    values[0] = np.abs(values[0]) * 50  # one token holds most of the batch's largest values
    values[1] = -np.abs(values[1])  # one token has no positive value
    select = jax.jit(kernels.batch_top_k_entries, static_argnames="slots")
    for live in (k, jnp.asarray(max(k - 1, 1))):
        n = rows * int(live)
        row, col, valid, threshold = select(jnp.asarray(values), live, slots=rows * (k + 1))
        want, want_threshold = np_batch_top(values, n)
        got = np.zeros_like(want)
        got[np.asarray(row)[np.asarray(valid)], np.asarray(col)[np.asarray(valid)]] = True
        np.testing.assert_array_equal(got, want)
        assert int(np.sum(valid)) == n  # no duplicate entries, none lost
        assert float(threshold) == want_threshold
        order = np.asarray(row)[np.asarray(valid)]
        assert (np.diff(order) >= 0).all()  # row order


def test_ties_are_cut_in_row_major_order():
    """`kernels._cut_ties` (rows ranked, then the one row where the cut falls) against a
    prefix count over the flattened array: many ties, any n, 1-D and 2-D."""
    rng = np.random.default_rng(0)
    cut = jax.jit(kernels._cut_ties)
    for trial in range(60):
        shape = [(8, 16), (1, 50), (37,), (5, 3), (64, 40)][trial % 5]
        values = rng.integers(0, 4, size=shape).astype(np.float32)
        threshold = float(rng.integers(0, 4))
        above = int((values > threshold).sum())
        n = int(rng.integers(above, values.size + 1))
        flat, tie = values.ravel(), values.ravel() == threshold
        want = (flat > threshold) | (tie & (np.cumsum(tie) <= n - above))
        got = np.asarray(cut(jnp.asarray(values), threshold, n))
        np.testing.assert_array_equal(got.ravel(), want, err_msg=f"{shape}, n {n}")


def test_batch_top_k_entries_with_few_positives_and_ties():
    """Fewer positives than batch·k: all are kept, threshold 0. Copies of a token tie at the
    threshold: exactly batch·k are kept, the ties in row-major order, as the dense path and a
    stable sort keep them; so too when more chunk maxima tie than there are slots (a batch
    of one value)."""
    values = np.full((8, 32), -1.0, np.float32)
    values[2, 5], values[6, 31], values[7, 0] = 3.0, 1.0, 2.0
    select = jax.jit(kernels.batch_top_k_entries, static_argnames="slots")
    row, col, valid, threshold = select(jnp.asarray(values), 2, slots=24)
    assert float(threshold) == 0.0 and int(np.sum(valid)) == 3
    assert sorted(zip(np.asarray(row)[:3].tolist(), np.asarray(col)[:3].tolist(),
                      strict=True)) == [(2, 5), (6, 31), (7, 0)]
    rng = np.random.default_rng(0)
    token = rng.standard_normal(64).astype(np.float32)
    copies = np.tile(token, (8, 1))  # 8 copies: every value appears 8 times
    five = np.concatenate([np.tile(token, (5, 1)), copies[:3] - 9.0])  # 5 copies and noise
    for values, k in ((copies, 3), (five, 3), (five, 7), (np.ones((8, 64), np.float32), 3)):
        row, col, valid, threshold = select(jnp.asarray(values), k, slots=8 * k)
        want, want_threshold = np_batch_top(values, 8 * k)
        assert int(want.sum()) == 8 * k and (values >= want_threshold).sum() >= 8 * k
        got = np.zeros_like(want)
        got[np.asarray(row)[np.asarray(valid)], np.asarray(col)[np.asarray(valid)]] = True
        np.testing.assert_array_equal(got, want)
        assert int(np.sum(valid)) == 8 * k
        assert float(threshold) == want_threshold
        acts, dense_threshold = batchtopk(jnp.asarray(values), k)
        np.testing.assert_array_equal(np.asarray(acts) != 0, want)
        assert float(dense_threshold) == want_threshold
    assert (five >= np_batch_top(five, 21)[1]).sum() > 21  # the ties overshoot batch·k


def _primitives(jaxpr) -> list[str]:
    """The names of every primitive in `jaxpr`, its sub-jaxprs' included."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            names += _primitives(sub)
    return names


def test_the_tie_cut_decides_for_the_whole_sweep():
    """Under a sweep's vmap the tie cut stays a branch, taken when some SAE of the sweep needs
    it (a per-SAE predicate turned the `cond` into a select that ran the cut at every step);
    each SAE keeps its own codes either way."""
    rng = np.random.default_rng(1)
    plain = rng.standard_normal((8, 64)).astype(np.float32)  # no ties
    copies = np.tile(rng.standard_normal(64).astype(np.float32), (8, 1))  # ties overshoot
    k = 3
    dense = jax.jit(jax.vmap(lambda v: batchtopk(v, k, sweep_axis="sweep"), axis_name="sweep"))
    listed = jax.jit(jax.vmap(lambda v: kernels.batch_top_k_entries(v, k, slots=8 * k,
                                                                    sweep_axis="sweep"),
                              axis_name="sweep"))
    for pair in ((plain, copies), (plain, plain)):
        stacked = jnp.asarray(np.stack(pair))
        acts, thresholds = dense(stacked)
        rows, cols, valid, _ = listed(stacked)
        for member, values in enumerate(pair):
            want, want_threshold = np_batch_top(values, 8 * k)
            np.testing.assert_array_equal(np.asarray(acts[member]) != 0, want)
            assert float(thresholds[member]) == want_threshold
            got = np.zeros_like(want)
            ok = np.asarray(valid[member])
            got[np.asarray(rows[member])[ok], np.asarray(cols[member])[ok]] = True
            np.testing.assert_array_equal(got, want)
        for f in (dense, listed):
            assert "cond" in _primitives(jax.make_jaxpr(f)(stacked).jaxpr)


def test_scatter_decode_and_its_gradients():
    """scatter_decode (entries of any rows) against the dense decode of the same codes, and
    take_pre_acts with rows against the dense pre-activations: values and every gradient."""
    rng = np.random.default_rng(5)
    batch, d_in, d_sae = 12, 20, 40
    row = jnp.asarray(rng.integers(0, batch, (7, 5)), jnp.int32)
    index = jnp.asarray(rng.permutation(batch * d_sae)[:35].reshape(7, 5) % d_sae, jnp.int32)
    # entries with distinct (row, latent) pairs
    pairs = set()
    for i in range(7):
        for j in range(5):
            while (int(row[i, j]), int(index[i, j])) in pairs:
                index = index.at[i, j].set((index[i, j] + 1) % d_sae)
            pairs.add((int(row[i, j]), int(index[i, j])))
    x = jnp.asarray(rng.standard_normal((batch, d_in)), jnp.float32)
    b_dec = jnp.asarray(rng.standard_normal(d_in), jnp.float32)
    W_enc = jnp.asarray(rng.standard_normal((d_in, d_sae)), jnp.float32)
    b_enc = jnp.asarray(rng.standard_normal(d_sae), jnp.float32)
    W_dec = jnp.asarray(rng.standard_normal((d_sae, d_in)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((batch, d_in)), jnp.float32)

    def sparse(x, b_dec, W_enc, b_enc, W_dec):
        pre = jax.lax.stop_gradient((x - b_dec) @ W_enc + b_enc)
        values = kernels.take_pre_acts(x, b_dec, W_enc, b_enc, pre, index, row)
        recon = kernels.scatter_decode(values, W_dec, index, row, batch)
        return jnp.sum(jnp.square(recon - target))

    def dense(x, b_dec, W_enc, b_enc, W_dec):
        mask = jnp.zeros((batch, d_sae)).at[row, index].set(1.0)
        codes = ((x - b_dec) @ W_enc + b_enc) * mask
        return jnp.sum(jnp.square(codes @ W_dec - target))

    args = (x, b_dec, W_enc, b_enc, W_dec)
    np.testing.assert_allclose(jax.jit(sparse)(*args), dense(*args), rtol=1e-5)
    grad = partial(jax.grad, argnums=tuple(range(5)))
    for got, want in zip(jax.jit(grad(sparse))(*args), jax.jit(grad(dense))(*args),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("width", "k"), [(512, 8), (12288 // 8, 32), (160, 5), (96, 4)])
def test_top_k_indices_matches_lax_top_k(width, k):
    """The two-stage top-k (chunk maxima first) against jax.lax.top_k: same indices, same
    order; rows with negative values, a -inf-masked half, and large runs in one chunk."""
    rng = np.random.default_rng(width + k)
    values = rng.standard_normal((64, width)).astype(np.float32)
    values[1] -= 10.0
    values[2, : width // 2] = -np.inf
    values[3, :32] += 100.0  # the top entries side by side
    n = width // 16  # chunk j holds entries j, j + n, ..., j + 15n: crowd them into chunks 0, 1
    values[4, 0::n] += 100.0
    values[4, 1::n] += 100.0
    want = np.asarray(jax.lax.top_k(jnp.asarray(values), k)[1])
    got = np.asarray(jax.jit(kernels.top_k_indices, static_argnums=1)(jnp.asarray(values), k))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("sections,shifted", [
    ({}, True),  # relu: unit rows (auto), started where about d_in latents fire
    ({"sae": {"decoder_norm": "free"}}, False),  # free rows: the start as it was
    ({"sae": {"activation": "jumprelu"}}, False),  # free rows too
    ({"sae": {"activation": "topk"}}, False),  # unit rows, but no ReLU bias to set
    ({"sae": {"init_l0": None}}, False)])
def test_init_l0_auto_acts_on_a_relu_with_unit_rows_only(sections, shifted):
    """`sae.init_l0: auto` (the default) is accepted with every activation and init_from, and
    moves the encoder bias only of a ReLU on unit decoder rows (`sae.initial_l0`)."""
    from jaxsae.config import config_from_dict

    cfg = config_from_dict({"data": {"path": "/d"}, **sections}).sae
    assert (sae.initial_l0(cfg, 64) is not None) is shifted
    params = sae.init_params(jax.random.PRNGKey(0), 64, cfg)
    assert bool(np.all(np.asarray(params["b_enc"]) < 0)) is shifted
    config_from_dict({"data": {"path": "/d"}, "init_from": "/x", **sections})  # (accepted)


def test_row_norms_are_norms_with_a_zero_gradient_at_a_zero_row():
    """`sae.row_norms`: jnp.linalg.norm's values, bit for bit, and a gradient of 0 (not NaN)
    at a row of zeros (a start with a zero decoder row stopped on a NaN gradient)."""
    from jaxsae.sae import row_norms

    W = jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.float32)
    W = W.at[2].set(0.0)
    np.testing.assert_array_equal(row_norms(W), jnp.linalg.norm(W, axis=1))
    grad = jax.grad(lambda w: jnp.sum(row_norms(w)))(W)
    assert np.all(np.isfinite(grad)) and np.all(grad[2] == 0)
    np.testing.assert_allclose(grad[0], W[0] / jnp.linalg.norm(W[0]), rtol=1e-6)
    assert not np.all(np.isfinite(jax.grad(lambda w: jnp.sum(jnp.linalg.norm(w, axis=1)))(W)))
