"""The structured loss terms against plain NumPy float64 references.

Each term's value is compared with a NumPy re-implementation of its docstring's formula, and
its gradients w.r.t. the parameters (jax.grad through `sae.forward`) with central finite
differences of that reference on randomly chosen coordinates, or, for the JumpReLU threshold
(a straight-through estimator that no finite difference sees), with the analytic STE gradient.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import penalties, sae
from jaxsae.checks import check_run
from jaxsae.config import Config, SAEConfig, config_from_dict
from jaxsae.errors import ConfigError

D_IN, D_SAE, BATCH, K = 12, 24, 32, 4
RTOL = 1e-5  # float32 values vs the float64 reference
FD_RTOL, FD_ATOL, FD_EPS = 1e-3, 1e-4, 1e-6


def assert_close(actual, expected, rtol=RTOL):
    """Relative tolerance, with an absolute floor of rtol * max|expected| (for near-zeros)."""
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def make_config(loss, **sae_fields) -> Config:
    """A parsed config holding the loss terms (so hyper-parameters go through the parser)."""
    tree = {"d_sae": D_SAE, "activation": "relu", "k": K, "decoder_norm": "free"} | sae_fields
    return config_from_dict({"data": {"path": "unused"}, "sae": tree, "loss": loss})


def random_params(rng: np.random.Generator, cfg: SAEConfig) -> sae.Params:
    directions = rng.normal(size=(cfg.d_sae, D_IN))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    params = {
        "W_dec": directions * rng.uniform(0.5, 2.0, size=(cfg.d_sae, 1)),
        "b_enc": 0.1 * rng.normal(size=cfg.d_sae),
        "b_dec": 0.1 * rng.normal(size=D_IN),
    }
    if not cfg.tied:
        params["W_enc"] = rng.normal(size=(D_IN, cfg.d_sae)) / np.sqrt(D_IN)
    if cfg.activation in ("jumprelu", "batchtopk"):
        params["threshold"] = rng.uniform(0.05, 0.5, size=cfg.d_sae)
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def random_x(rng: np.random.Generator) -> jax.Array:
    return jnp.asarray(rng.normal(size=(BATCH, D_IN)), jnp.float32)


def f64(tree):
    if isinstance(tree, dict):
        return {k: np.asarray(v, np.float64) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def forward(config: Config, params, x, key=None):
    return sae.forward(params, x, config.sae, train=True, key=key,
                       prefix_ends=penalties.prefix_ends(config))


def term_value(config: Config, params, x, *, index=0, key=None, step=0):
    """(value, metrics, out) of `config.loss[index]` on a fresh forward pass."""
    term = config.loss[index]
    out = forward(config, params, x, key)
    value, metrics = penalties.get_term(term.term).fn(out, params, step=jnp.asarray(step),
                                                      **penalties.resolve(term).params)
    return value, metrics, out


def term_grad(config: Config, params, x, *, index=0, key=None):
    return jax.grad(lambda p: term_value(config, p, x, index=index, key=key)[0])(params)


def check_fd(grads, reference, P, rng, *, skip=(), n=8):
    """Compares jax gradients with central differences of the float64 NumPy `reference(P)` on
    n coordinates per parameter: half uniformly drawn, half where the jax gradient is nonzero."""
    assert set(grads) == set(P)
    for name, value in P.items():
        g = np.asarray(grads[name], np.float64).ravel()
        assert np.isfinite(g).all(), name
        if name in skip:
            continue
        idx = rng.choice(g.size, size=min(n // 2, g.size), replace=False)
        nonzero = np.flatnonzero(g)
        if nonzero.size:
            idx = np.union1d(idx, rng.choice(nonzero, min(n // 2, nonzero.size), replace=False))
        fd = []
        for i in idx:
            hi, lo = value.copy(), value.copy()
            hi.flat[i] += FD_EPS
            lo.flat[i] -= FD_EPS
            fd.append((reference({**P, name: hi}) - reference({**P, name: lo})) / (2 * FD_EPS))
        atol = FD_ATOL * max(1.0, float(np.abs(g).max()))
        np.testing.assert_allclose(g[idx], fd, rtol=FD_RTOL, atol=atol, err_msg=name)


# ---------------------------------------------------------------------------------------------
# NumPy references


def encoder(P):
    return P["W_enc"] if "W_enc" in P else P["W_dec"].T


def row_norms(P):
    return np.linalg.norm(P["W_dec"], axis=1)


def np_codes(P, x, s: SAEConfig):
    """(pre_acts, acts) in float64."""
    pre = (x - P["b_dec"]) @ encoder(P) + P["b_enc"]
    pos = np.maximum(pre, 0.0)
    if s.activation == "relu":
        return pre, pos
    if s.activation == "jumprelu":
        return pre, pos * (pre > P["threshold"])
    if s.activation == "batchtopk":
        kth = np.sort(pos, axis=None)[-x.shape[0] * s.k]
        return pre, pos * ((pos >= kth) & (pos > 0))
    raise ValueError(s.activation)


def np_l1(P, x, s, *, p=1.0, weight_by_decoder_norm=True, tanh_scale=None, norm=False):
    f = np_codes(P, x, s)[1]
    v = f * row_norms(P) if weight_by_decoder_norm else f
    if norm:  # SAELens: torch.norm(v, p, dim=-1)
        return np.linalg.norm(v, ord=p, axis=1).mean()
    if tanh_scale is not None:
        phi = np.tanh(tanh_scale * v)
    else:
        phi = np.where(v > 0, np.abs(v) ** p, 0.0)
    return phi.sum(axis=1).mean()


def np_l0(P, x, s, *, mode="step", tanh_scale=4.0, target_l0=None, bandwidth=0.001):
    pre, f = np_codes(P, x, s)
    if mode == "tanh":
        return np.tanh(tanh_scale * f * row_norms(P)).sum(axis=1).mean()
    counts = (pre > P["threshold"]).sum(axis=1)
    if mode == "step":
        return counts.mean()
    return np.mean(2.0 / target_l0 * (counts - target_l0) ** 2)


def np_group_norms(P, x, s, group_size):
    v = np_codes(P, x, s)[1] * row_norms(P)
    return np.linalg.norm(v.reshape(x.shape[0], -1, group_size), axis=-1)


def np_group_l1_l2(P, x, s, *, group_size, group_weight=None):
    weight = np.sqrt(group_size) if group_weight is None else group_weight
    return weight * np_group_norms(P, x, s, group_size).sum(axis=1).mean()


def np_orthogonality(P, *, group_size, squared=False):
    unit = P["W_dec"] / row_norms(P)[:, None]
    total = 0.0
    for start in range(0, unit.shape[0], group_size):
        w = unit[start : start + group_size]
        gram = w @ w.T
        if squared:
            total += np.sum((gram - np.eye(group_size)) ** 2)
        else:
            total += sum(max(gram[i, j], 0.0) for i in range(group_size)
                         for j in range(group_size) if i != j)
    return total


def np_prefix_errors(P, x, s, ends):
    """Per end m: mean over tokens of ‖x − (f[:, :m] @ W_dec[:m] + b_dec)‖²."""
    f = np_codes(P, x, s)[1]
    return np.array([np.mean(np.sum((x - f[:, :m] @ P["W_dec"][:m] - P["b_dec"]) ** 2, axis=1))
                     for m in ends])


def np_cosine_rows(P, threshold):
    """Per row i: Σ_{j≠i} relu(cos_ij − threshold)²."""
    unit = P["W_dec"] / row_norms(P)[:, None]
    cos = unit @ unit.T
    excess = np.maximum(cos - threshold, 0.0) ** 2
    np.fill_diagonal(excess, 0.0)
    return excess.sum(axis=1)


# ---------------------------------------------------------------------------------------------
# l1 variants


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "hparams",
    [
        {"p": 0.5},
        {"p": 0.3, "weight_by_decoder_norm": False},
        {"weight_by_decoder_norm": False},
        {"tanh_scale": 1.5},
        {"tanh_scale": 0.7, "weight_by_decoder_norm": False},
        {"p": 0.5, "norm": True},
        {"p": 0.7, "norm": True, "weight_by_decoder_norm": False},
    ],
)
def test_l1_variants(rng, tied, hparams):
    config = make_config([{"term": "l1", **hparams}], tied=tied)
    params, x = random_params(rng, config.sae), random_x(rng)
    P, xs = f64(params), f64(x)

    def reference(P):
        return np_l1(P, xs, config.sae, **hparams)

    value, metrics, _ = term_value(config, params, x)
    assert metrics == {}
    assert_close(value, reference(P))
    # The variant matters: it differs from the plain L1 of the same codes.
    assert abs(float(value) - np_l1(P, xs, config.sae)) > 1e-2 * abs(float(value))
    grads = term_grad(config, params, x)
    check_fd(grads, reference, P, rng)


def test_l1_p_below_one_at_silent_latents_is_finite(rng):
    config = make_config([{"term": "l1", "p": 0.5}])
    params, x = random_params(rng, config.sae), random_x(rng)
    params["b_enc"] = params["b_enc"].at[:6].set(-100.0)  # six latents never fire
    grads = term_grad(config, params, x)
    for name, g in grads.items():
        assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_array_equal(np.asarray(grads["b_enc"])[:6], 0.0)
    check_fd(grads, lambda P: np_l1(P, f64(x), config.sae, p=0.5), f64(params), rng)
    # the p-norm of a token none of whose latents fire: 0, with a gradient of 0 (the root's
    # slope is infinite there too)
    config = make_config([{"term": "l1", "p": 0.5, "norm": True}])
    params["b_enc"] = params["b_enc"].at[:].set(-100.0)
    value, _, _ = term_value(config, params, x)
    assert float(value) == 0.0
    for name, g in term_grad(config, params, x).items():
        assert np.isfinite(np.asarray(g)).all() and not np.asarray(g).any(), name


@pytest.mark.parametrize(("hparams", "message"), [
    ({"p": 0.0}, r"loss\[1\]\.p: must be in \(0, 1\], got 0\.0"),
    ({"p": 1.5}, r"loss\[1\]\.p: must be in \(0, 1\], got 1\.5"),
    ({"p": 0.5, "tanh_scale": 2.0}, r"loss\[1\]: choose either p or tanh_scale"),
    ({"norm": True, "tanh_scale": 2.0}, r"loss\[1\]: choose either norm .* or tanh_scale"),
])
def test_l1_variants_that_make_no_sense_are_refused(hparams, message):
    with pytest.raises(ConfigError, match=message):
        check_run(make_config([{"term": "mse"}, {"term": "l1", **hparams}]))


@pytest.mark.parametrize(("activation", "message"), [
    ("relu", "term 'auxk' needs an activation with k active latents (sae.activation batchtopk, "
             "topk), got 'relu'"),
    ("matching_pursuit", "term 'auxk' needs an encoder whose pre-activations rank the dead "
                         "latents (sae.activation batchtopk, topk), got 'matching_pursuit'")])
def test_auxk_refusals_list_only_activations_it_runs_with(activation, message):
    """(fault testing: the first listed matching_pursuit, which the second refuses)"""
    with pytest.raises(ConfigError, match=f"^loss\\[1\\]: {re.escape(message)}$"):
        check_run(make_config([{"term": "mse"}, {"term": "auxk"}], activation=activation,
                              decoder_norm="unit"))


# ---------------------------------------------------------------------------------------------
# l0 modes (JumpReLU)

JUMP_BANDWIDTH = 0.3  # the activation's STE window: wide enough to catch pre-activations


def jumprelu_setup(rng, tied, **term):
    config = make_config([{"term": "l0", **term}], activation="jumprelu", tied=tied,
                         jumprelu_bandwidth=JUMP_BANDWIDTH)
    params, x = random_params(rng, config.sae), random_x(rng)
    pre32 = np.asarray(sae.pre_activations(params, x), np.float64)
    theta = f64(params["threshold"])
    assert 0 < (pre32 > theta).mean() < 1
    return config, params, x, pre32, theta


def ste_window(pre32, theta, bandwidth):
    window = np.abs(pre32 - theta) < bandwidth / 2
    assert window.any()  # the straight-through gradient is exercised
    return window


@pytest.mark.parametrize("tied", [False, True])
def test_l0_step(rng, tied):
    bandwidth = 0.2
    config, params, x, pre32, theta = jumprelu_setup(rng, tied, mode="step", bandwidth=bandwidth)
    value, _, _ = term_value(config, params, x)
    assert_close(value, np.mean(np.sum(pre32 > theta, axis=1)))
    assert_close(value, np_l0(f64(params), f64(x), config.sae, mode="step"))
    grads = term_grad(config, params, x)
    for name, g in grads.items():
        if name != "threshold":
            np.testing.assert_array_equal(g, 0.0, err_msg=name)
    window = ste_window(pre32, theta, bandwidth)
    assert_close(grads["threshold"], -window.sum(axis=0) / bandwidth / BATCH)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tanh_scale", [None, 1.5])
def test_l0_tanh(rng, tied, tanh_scale):
    hp = {} if tanh_scale is None else {"tanh_scale": tanh_scale}
    c = 4.0 if tanh_scale is None else tanh_scale
    config, params, x, pre32, theta = jumprelu_setup(rng, tied, mode="tanh", **hp)
    P, xs = f64(params), f64(x)

    def reference(P):
        return np_l0(P, xs, config.sae, mode="tanh", tanh_scale=c)

    value, _, _ = term_value(config, params, x)
    assert_close(value, reference(P))
    grads = term_grad(config, params, x)
    check_fd(grads, reference, P, rng, skip=("threshold",))
    # Threshold: the JumpReLU straight-through gradient d f/dθ = −(θ/ε)·K((z − θ)/ε),
    # times dL/df = c‖W_dec,i‖ sech²(c f ‖W_dec,i‖) / batch.
    f = np_codes(P, xs, config.sae)[1]
    norms = row_norms(P)
    upstream = c * norms / np.cosh(c * f * norms) ** 2 / BATCH
    window = ste_window(pre32, theta, JUMP_BANDWIDTH)
    expected = -(theta / JUMP_BANDWIDTH) * np.sum(upstream * window, axis=0)
    assert np.abs(expected).max() > 1e-3
    assert_close(grads["threshold"], expected, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("target", [3.0, 20.0])
def test_l0_quadratic(rng, tied, target):
    bandwidth = 0.25
    config, params, x, pre32, theta = jumprelu_setup(
        rng, tied, mode="quadratic", target_l0=target, bandwidth=bandwidth)
    counts = np.sum(pre32 > theta, axis=1)  # each token's l0
    count = counts.mean()
    assert 3.0 < count < 20.0  # one target below L0, one above
    value, metrics, _ = term_value(config, params, x)
    assert_close(value, np.mean(2.0 / target * (counts - target) ** 2))
    assert_close(metrics["l0_ste"], count)
    grads = term_grad(config, params, x)
    for name, g in grads.items():
        if name != "threshold":
            np.testing.assert_array_equal(g, 0.0, err_msg=name)
    # d/dθ_i of mean_b 2/t (l0_b − t)², with d l0_b / dθ_i = −window_bi / bandwidth
    window = ste_window(pre32, theta, bandwidth)
    expected = -(4.0 / target * (counts - target)) @ window / bandwidth / BATCH
    assert_close(grads["threshold"], expected)


# ---------------------------------------------------------------------------------------------
# group_l1_l2


@pytest.mark.parametrize(
    ("group_size", "group_weight", "tied", "activation"),
    [
        (4, None, False, "relu"),
        (4, None, True, "relu"),
        (3, 0.7, False, "relu"),
        (6, 2.0, True, "relu"),
        (4, None, False, "batchtopk"),
    ],
)
def test_group_l1_l2(rng, group_size, group_weight, tied, activation):
    hp = {"group_size": group_size} | ({} if group_weight is None else
                                       {"group_weight": group_weight})
    config = make_config([{"term": "group_l1_l2", **hp}], tied=tied, activation=activation)
    params, x = random_params(rng, config.sae), random_x(rng)
    P, xs = f64(params), f64(x)

    def reference(P):
        return np_group_l1_l2(P, xs, config.sae, **hp)

    value, metrics, _ = term_value(config, params, x)
    assert_close(value, reference(P))
    norms = np_group_norms(P, xs, config.sae, group_size)
    assert_close(metrics["active_groups"], np.mean(np.sum(norms > 0, axis=1)))
    check_fd(term_grad(config, params, x), reference, P, rng)


def test_group_l1_l2_default_weight_is_sqrt_group_size(rng):
    config = make_config([{"term": "group_l1_l2", "group_size": 4},
                          {"term": "group_l1_l2", "group_size": 4, "group_weight": 1.0}])
    params, x = random_params(rng, config.sae), random_x(rng)
    default, _, _ = term_value(config, params, x, index=0)
    unit, _, _ = term_value(config, params, x, index=1)
    assert_close(default, 2.0 * float(unit))


@pytest.mark.parametrize("tied", [False, True])
def test_group_l1_l2_silent_group_has_finite_gradient(rng, tied):
    config = make_config([{"term": "group_l1_l2", "group_size": 4}], tied=tied)
    params, x = random_params(rng, config.sae), random_x(rng)
    params["b_enc"] = params["b_enc"].at[4:8].set(-100.0)  # group 1 never fires
    P, xs = f64(params), f64(x)
    norms = np_group_norms(P, xs, config.sae, 4)
    assert np.all(norms[:, 1] == 0) and np.all(norms[:, [0, 2, 3, 4, 5]].sum(axis=0) > 0)
    value, metrics, _ = term_value(config, params, x)
    assert_close(value, np_group_l1_l2(P, xs, config.sae, group_size=4))
    assert float(metrics["active_groups"]) <= 5
    grads = term_grad(config, params, x)
    for name, g in grads.items():
        assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_array_equal(np.asarray(grads["b_enc"])[4:8], 0.0)
    check_fd(grads, lambda P: np_group_l1_l2(P, xs, config.sae, group_size=4), P, rng)


def test_group_l1_l2_prefers_latents_of_one_group(rng):
    config = make_config([{"term": "group_l1_l2", "group_size": 4}])
    params, x = random_params(rng, config.sae), random_x(rng)
    out = forward(config, params, x)
    a, b = 0.6, 1.3
    same = jnp.zeros((BATCH, D_SAE)).at[:, 0].set(a).at[:, 1].set(b)
    apart = jnp.zeros((BATCH, D_SAE)).at[:, 0].set(a).at[:, 4].set(b)
    ones = jnp.ones((D_SAE,))
    v_same, _ = penalties.group_l1_l2(out.replace(acts=same, decoder_norms=ones), params,
                                      step=jnp.asarray(0), group_size=4)
    v_apart, _ = penalties.group_l1_l2(out.replace(acts=apart, decoder_norms=ones), params,
                                       step=jnp.asarray(0), group_size=4)
    assert_close(v_same, 2.0 * np.hypot(a, b))
    assert_close(v_apart, 2.0 * (a + b))
    assert float(v_same) < float(v_apart)


# ---------------------------------------------------------------------------------------------
# intra_group_orthogonality


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("group_size", "squared"), [(4, False), (4, True), (6, False), (3, True)])
def test_intra_group_orthogonality(rng, tied, group_size, squared):
    hp = {"group_size": group_size, "squared": squared}
    config = make_config([{"term": "intra_group_orthogonality", **hp}], tied=tied)
    params, x = random_params(rng, config.sae), random_x(rng)
    P = f64(params)

    def reference(P):
        return np_orthogonality(P, **hp)

    value, _, _ = term_value(config, params, x)
    assert float(value) > 0.1
    assert_close(value, reference(P))
    grads = term_grad(config, params, x)
    for name in ("W_enc", "b_enc", "b_dec"):
        if name in grads:
            np.testing.assert_array_equal(grads[name], 0.0, err_msg=name)
    check_fd(grads, reference, P, rng, n=12)


def test_intra_group_orthogonality_of_groups_of_one_is_refused():
    """(fault testing: group_size 1 trained, with a term that is 0 whatever the decoder.)
    A group of one has no pair to keep orthogonal: refused naming the key."""
    with pytest.raises(ConfigError, match=r"^loss\[1\]\.group_size: 1 leaves no two latents"):
        check_run(make_config([{"term": "mse"}, {"term": "intra_group_orthogonality",
                                                 "group_size": 1}]))


def orthonormal_groups(rng, group_size):
    """[D_SAE, D_IN] decoder whose rows are orthogonal within each group (random norms)."""
    rows = [np.linalg.qr(rng.normal(size=(D_IN, group_size)))[0].T
            for _ in range(D_SAE // group_size)]
    return np.concatenate(rows) * rng.uniform(0.5, 2.0, size=(D_SAE, 1))


@pytest.mark.parametrize("squared", [False, True])
def test_intra_group_orthogonality_extremes(rng, squared):
    g = 4
    config = make_config([{"term": "intra_group_orthogonality", "group_size": g,
                           "squared": squared}])
    params, x = random_params(rng, config.sae), random_x(rng)

    def value_with(W):
        p = {**params, "W_dec": jnp.asarray(W, jnp.float32)}
        return float(term_value(config, p, x)[0])

    orthogonal = orthonormal_groups(rng, g)
    assert value_with(orthogonal) < 1e-5
    # The same directions repeated in the next group: groups don't see each other.
    repeated = orthogonal.copy()
    repeated[g : 2 * g] = 3.0 * orthogonal[:g]
    assert value_with(repeated) < 1e-5
    # Positive multiples of one row within every group: each ordered pair has cosine 1.
    copies = np.repeat(rng.normal(size=(D_SAE // g, D_IN)), g, axis=0)
    copies *= rng.uniform(0.5, 2.0, size=(D_SAE, 1))
    assert_close(value_with(copies), (D_SAE // g) * g * (g - 1), rtol=1e-5)
    # Opposite rows: only the squared form penalises negative cosines.
    opposite = orthogonal.copy()
    opposite[1] = -2.0 * orthogonal[0]
    expected = 2.0 if squared else 0.0
    assert abs(value_with(opposite) - expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# Prefix reconstructions and matryoshka (fixed prefixes)


@pytest.mark.parametrize(
    "ends",
    [
        (D_SAE,),
        (5, D_SAE),  # irregular
        (1, 13, 17, D_SAE),
        (4, 8, D_SAE),  # equal blocks, then a longer last one: irregular
        (8, 16, D_SAE),  # a regular grid: one batched matmul
        (5, 10, 15, 20, D_SAE),  # regular with a shorter (padded) last block
        (20, D_SAE),
        tuple(range(1, D_SAE + 1)),
    ],
)
def test_decode_blocks_matches_plain_block_decodes(rng, ends):
    cfg = SAEConfig(d_sae=D_SAE, activation="relu")
    params, x = random_params(rng, cfg), random_x(rng)
    acts = sae.encode(params, x, cfg)
    P, f = f64(params), f64(acts)
    assert (f > 0).any(axis=0).sum() > D_SAE // 2
    blocks = sae.decode_blocks(params, acts, ends)
    assert blocks.shape == (len(ends), BATCH, D_IN)
    for i, (a, b) in enumerate(zip((0, *ends[:-1]), ends, strict=True)):
        assert_close(blocks[i], f[:, a:b] @ P["W_dec"][a:b])


@pytest.mark.parametrize(
    ("activation", "tied", "prefixes", "weights"),
    [
        ("relu", False, [4, 12, 24], None),
        ("relu", True, [4, 12, 24], [0.5, 0.3, 0.2]),
        ("relu", False, [24], None),
        ("relu", False, [10, 20], None),  # a regular block grid with a shorter last block
        ("batchtopk", False, [4, 12, 24], [0.2, 0.0, 1.0]),
        ("batchtopk", True, [6, 18], None),
        ("batchtopk", False, [8, 16, 24], [0.6, 0.3, 0.1]),
    ],
)
def test_matryoshka_fixed_prefixes(rng, activation, tied, prefixes, weights):
    hp = {"prefixes": prefixes} | ({} if weights is None else {"weights": weights})
    config = make_config([{"term": "matryoshka", **hp}], activation=activation, tied=tied)
    params, x = random_params(rng, config.sae), random_x(rng)
    P, xs = f64(params), f64(x)
    ends = tuple(sorted({*prefixes, D_SAE}))
    w = np.full(len(prefixes), 1 / len(prefixes)) if weights is None else np.asarray(weights)

    value, metrics, out = term_value(config, params, x)
    # The forward pass decodes every prefix, the last being the whole dictionary.
    f = np_codes(P, xs, config.sae)[1]
    np.testing.assert_array_equal(np.asarray(out.acts) > 0, f > 0)
    assert out.prefix_ends == ends
    recons = out.prefix_recons()
    assert recons.shape == (len(ends), BATCH, D_IN)
    for i, m in enumerate(ends):
        assert_close(recons[i], f[:, :m] @ P["W_dec"][:m] + P["b_dec"])
    assert_close(out.x_hat, f @ P["W_dec"] + P["b_dec"])
    assert_close(out.x_hat, sae.decode(params, out.acts))
    assert_close(recons[-1], out.x_hat)

    def reference(P):
        errors = np_prefix_errors(P, xs, config.sae, prefixes)
        return float(np.sum(w * errors))

    errors = np_prefix_errors(P, xs, config.sae, prefixes)
    assert np.all(np.abs(np.diff(errors)) > 1e-2)  # the prefixes' errors differ
    assert_close(value, reference(P))
    assert set(metrics) == {f"mse_{m}" for m in prefixes}
    for m, e in zip(prefixes, errors, strict=True):
        assert_close(metrics[f"mse_{m}"], e)
    check_fd(term_grad(config, params, x), reference, P, rng)


@pytest.mark.parametrize("ends", [(4, 12), (8, 16)])
def test_prefix_recons_of_selected_blocks(rng, ends):
    config = make_config([{"term": "matryoshka", "prefixes": list(ends)}], tied=True)
    params, x = random_params(rng, config.sae), random_x(rng)
    out = forward(config, params, x)
    assert out.prefix_ends == (*ends, D_SAE)
    P, f = f64(params), np_codes(f64(params), f64(x), config.sae)[1]
    bounds = list(zip((0, *out.prefix_ends[:-1]), out.prefix_ends, strict=True))
    selection = np.asarray([[0, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1]], np.float32)
    recons = out.prefix_recons(jnp.asarray(selection))
    assert recons.shape == (4, BATCH, D_IN)
    for row, r in zip(selection, recons, strict=True):
        expected = P["b_dec"] + sum(f[:, a:b] @ P["W_dec"][a:b]
                                    for (a, b), on in zip(bounds, row, strict=True) if on)
        assert_close(r, np.broadcast_to(expected, (BATCH, D_IN)))
    assert_close(jnp.sum(out.block_recons, axis=0) + params["b_dec"], out.x_hat)


def test_matryoshka_full_prefix_equals_mse(rng):
    config = make_config([{"term": "matryoshka", "prefixes": [24]}, {"term": "mse"}])
    params, x = random_params(rng, config.sae), random_x(rng)
    assert_close(term_value(config, params, x, index=0)[0],
                 float(term_value(config, params, x, index=1)[0]))


def test_latents_past_the_last_prefix_need_a_reconstruction_loss():
    """Latents in no reconstruction loss would never train (and a BatchTopK code would still
    spend places on them): refused unless mse or another Matryoshka term covers them."""
    short = {"term": "matryoshka", "prefixes": [8, 16]}
    with pytest.raises(ConfigError, match=r"loss\[0\]\.prefixes: latents \[16, 24\) are in no "
                                          r"reconstruction loss; end the prefixes at sae\.d_sae"):
        check_run(make_config([short, {"term": "l1"}]))
    for cover in ({"term": "mse"}, {"term": "matryoshka", "prefixes": [24]},
                  {"term": "matryoshka", "sample": SAMPLE}):
        check_run(make_config([short, cover]))
        # (fault testing: a cover of coefficient 0, which trains nothing, let them through)
        with pytest.raises(ConfigError, match=r"loss\[0\]\.prefixes: latents \[16, 24\)"):
            check_run(make_config([short, {**cover, "coefficient": 0}]))
    check_run(make_config([{"term": "matryoshka", "prefixes": [8, 24]}]))
    # a last prefix of weight 0 reaches no further than the one before it (fault testing)
    with pytest.raises(ConfigError, match=r"loss\[0\]\.prefixes: latents \[8, 24\)"):
        check_run(make_config([{"term": "matryoshka", "prefixes": [8, 24], "weights": [1, 0]}]))
    check_run(make_config([{"term": "matryoshka", "prefixes": [8, 24], "weights": [0, 1]}]))
    # a short term of coefficient 0 is no loss: nothing of it to cover
    check_run(make_config([{**short, "coefficient": 0}, {"term": "matryoshka",
                                                           "prefixes": [8, 24]}]))


# ---------------------------------------------------------------------------------------------
# matryoshka (sampled prefixes)

SAMPLE = {"n": 5, "power": 0.5, "resolution": 8}
SAMPLE_ENDS = (1, 2, 3, 4, 5, 8, 11, 17, 24)  # geometric: ratio 24^(1/8)


def sampled_slots(key, ends, n, power):
    """The slots the sampled term reads: n − 1 truncated-Pareto lengths rounded up to the first
    prefix end, plus the whole dictionary."""
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, penalties._KEY_MATRYOSHKA),
                                      (n - 1,)), np.float64)
    d = ends[-1]
    lengths = (1.0 - u * (1.0 - d ** (-power))) ** (-1.0 / power)
    assert np.all((lengths >= 1) & (lengths <= d + 1e-6))
    slots = [min(int(np.searchsorted(ends, np.ceil(m), side="left")), len(ends) - 1)
             for m in lengths]
    return np.asarray([*slots, len(ends) - 1])


def sampled_setup(rng, activation="relu", tied=False):
    config = make_config([{"term": "matryoshka", "sample": SAMPLE}], activation=activation,
                         tied=tied)
    assert penalties.prefix_ends(config) == SAMPLE_ENDS
    params, x = random_params(rng, config.sae), random_x(rng)
    return config, params, x


@pytest.mark.parametrize(("activation", "tied"), [("relu", False), ("batchtopk", True)])
def test_matryoshka_sampled_reproduces_the_draws(rng, activation, tied):
    config, params, x = sampled_setup(rng, activation, tied)
    P, xs = f64(params), f64(x)
    errors = np_prefix_errors(P, xs, config.sae, SAMPLE_ENDS)
    seen = set()
    for seed in range(6):
        key = jax.random.PRNGKey(seed)
        value, metrics, out = term_value(config, params, x, key=key)
        assert out.prefix_ends == SAMPLE_ENDS
        slots = sampled_slots(key, SAMPLE_ENDS, SAMPLE["n"], SAMPLE["power"])
        seen.add(tuple(sorted(slots)))
        assert_close(value, errors[slots].mean())
        assert_close(metrics["mean_prefix"], np.mean(np.asarray(SAMPLE_ENDS)[slots]))
        assert errors.min() - 1e-5 <= float(value) <= errors.max() + 1e-5
    assert len(seen) > 1  # the keys draw different prefixes


def test_matryoshka_sampled_value_depends_on_key(rng):
    config, params, x = sampled_setup(rng)
    values = {round(float(term_value(config, params, x, key=jax.random.PRNGKey(s))[0]), 6)
              for s in range(6)}
    assert len(values) > 1
    # The same key gives the same value.
    key = jax.random.PRNGKey(3)
    assert float(term_value(config, params, x, key=key)[0]) == float(
        term_value(config, params, x, key=key)[0])


@pytest.mark.parametrize("tied", [False, True])
def test_matryoshka_sampled_gradient(rng, tied):
    config, params, x = sampled_setup(rng, tied=tied)
    key = jax.random.PRNGKey(11)
    slots = sampled_slots(key, SAMPLE_ENDS, SAMPLE["n"], SAMPLE["power"])
    xs = f64(x)

    def reference(P):
        return np_prefix_errors(P, xs, config.sae, SAMPLE_ENDS)[slots].mean()

    check_fd(term_grad(config, params, x, key=key), reference, f64(params), rng)


def test_matryoshka_sampled_lengths_follow_truncated_pareto(rng):
    """Independent of the implementation's draws: the mean over many keys approaches the
    expectation under the truncated Pareto, P(slot j) = F(e_j) − F(e_{j−1}),
    F(m) = (1 − m^−a) / (1 − d^−a)."""
    config, params, x = sampled_setup(rng)
    out = forward(config, params, x)
    errors = np_prefix_errors(f64(params), f64(x), config.sae, SAMPLE_ENDS)
    n, a, d = SAMPLE["n"], SAMPLE["power"], D_SAE
    cdf = lambda m: (1 - m ** (-a)) / (1 - d ** (-a))  # noqa: E731
    edges = np.asarray((1, *SAMPLE_ENDS), np.float64)
    probs = np.diff(cdf(edges))
    assert_close(probs.sum(), 1.0)
    ends = np.asarray(SAMPLE_ENDS, np.float64)
    expected_value = ((n - 1) * probs @ errors + errors[-1]) / n
    expected_prefix = ((n - 1) * probs @ ends + ends[-1]) / n

    @jax.jit
    def draw(keys):
        return jax.vmap(lambda k: penalties.matryoshka(
            out.replace(key=k), params, step=jnp.asarray(0), sample=penalties.resolve(
                config.loss[0]).params["sample"]))(keys)

    values, metrics = draw(jax.random.split(jax.random.PRNGKey(7), 4000))
    # Standard errors here are ~0.3% of the means; 2% is > 5 sigma.
    np.testing.assert_allclose(float(jnp.mean(values)), expected_value, rtol=0.02)
    np.testing.assert_allclose(float(jnp.mean(metrics["mean_prefix"])), expected_prefix,
                               rtol=0.02)


# ---------------------------------------------------------------------------------------------
# decoder_cosine


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_decoder_cosine_exact(rng, tied, threshold):
    config = make_config([{"term": "decoder_cosine", "threshold": threshold}], tied=tied)
    params, x = random_params(rng, config.sae), random_x(rng)
    P = f64(params)

    def reference(P):
        return np_cosine_rows(P, threshold).sum() / D_SAE

    value, metrics, _ = term_value(config, params, x)
    assert float(value) > 1e-3
    assert_close(value, reference(P))
    unit = P["W_dec"] / row_norms(P)[:, None]
    cos = unit @ unit.T
    np.fill_diagonal(cos, -1.0)
    assert_close(metrics["max_cos"], cos.max())
    grads = term_grad(config, params, x)
    for name in ("W_enc", "b_enc", "b_dec"):
        if name in grads:
            np.testing.assert_array_equal(grads[name], 0.0, err_msg=name)
    check_fd(grads, reference, P, rng, n=12)


def cosine_chunk_index(key, chunk):
    return np.asarray(jax.random.choice(
        jax.random.fold_in(key, penalties._KEY_DECODER_COSINE), D_SAE, (chunk,), replace=False))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_decoder_cosine_chunked(rng, tied, threshold):
    chunk = 6
    config = make_config([{"term": "decoder_cosine", "threshold": threshold, "exact_max": 10,
                           "chunk_size": chunk}], tied=tied)
    params, x = random_params(rng, config.sae), random_x(rng)
    P = f64(params)
    rows = np_cosine_rows(P, threshold)
    values = set()
    for seed in range(4):
        key = jax.random.PRNGKey(seed)
        index = cosine_chunk_index(key, chunk)
        assert len(set(index.tolist())) == chunk
        value, _, _ = term_value(config, params, x, key=key)
        assert_close(value, rows[index].sum() / chunk)
        values.add(round(float(value), 6))
    assert len(values) > 1
    key = jax.random.PRNGKey(5)
    index = cosine_chunk_index(key, chunk)
    check_fd(term_grad(config, params, x, key=key),
             lambda P: np_cosine_rows(P, threshold)[index].sum() / chunk, P, rng, n=12)


def test_decoder_cosine_chunks_average_to_exact(rng):
    config = make_config([{"term": "decoder_cosine", "exact_max": 10, "chunk_size": 6}])
    params, x = random_params(rng, config.sae), random_x(rng)
    out = forward(config, params, x)
    exact = np_cosine_rows(f64(params), 0.0).mean()

    @jax.jit
    def estimates(keys):
        return jax.vmap(lambda k: penalties.decoder_cosine(
            out.replace(key=k), params, step=jnp.asarray(0), exact_max=10, chunk_size=6)[0])(keys)

    values = np.asarray(estimates(jax.random.split(jax.random.PRNGKey(1), 2000)))
    assert values.std() > 0.01 * exact  # the chunks really differ
    np.testing.assert_allclose(values.mean(), exact, rtol=0.03)  # standard error ~0.4%


def test_decoder_cosine_chunk_covering_all_rows_is_exact(rng):
    config = make_config([{"term": "decoder_cosine", "threshold": 0.1, "exact_max": 10,
                           "chunk_size": 40}])
    params, x = random_params(rng, config.sae), random_x(rng)
    value, _, _ = term_value(config, params, x, key=jax.random.PRNGKey(4))
    assert_close(value, np_cosine_rows(f64(params), 0.1).mean())


# ---------------------------------------------------------------------------------------------
# Total loss of a combination


def test_total_loss_of_combined_terms(rng):
    loss = [
        {"term": "mse"},
        {"term": "l1", "coefficient": 2.0, "warmup_steps": 10, "p": 0.5},
        {"term": "group_l1_l2", "coefficient": 0.3, "warmup_steps": 4, "group_size": 4},
        {"term": "intra_group_orthogonality", "coefficient": 0.05, "group_size": 4},
        {"term": "matryoshka", "coefficient": 1.5, "warmup_steps": 2, "prefixes": [4, 12, 24],
         "weights": [0.5, 0.25, 0.25]},
        {"term": "decoder_cosine", "coefficient": 0.1, "threshold": 0.3},
    ]
    config = make_config(loss, tied=True)
    params, x = random_params(rng, config.sae), random_x(rng)
    P, xs = f64(params), f64(x)
    s = config.sae
    f = np_codes(P, xs, s)[1]
    refs = {
        "mse": np.mean(np.sum((f @ P["W_dec"] + P["b_dec"] - xs) ** 2, axis=1)),
        "l1": np_l1(P, xs, s, p=0.5),
        "group_l1_l2": np_group_l1_l2(P, xs, s, group_size=4),
        "intra_group_orthogonality": np_orthogonality(P, group_size=4),
        "matryoshka": float(np.dot([0.5, 0.25, 0.25], np_prefix_errors(P, xs, s, [4, 12, 24]))),
        "decoder_cosine": np_cosine_rows(P, 0.3).mean(),
    }
    assert all(v > 0 for v in refs.values())

    def total(p, step):
        out = forward(config, p, x)
        return penalties.total_loss(config.loss, out, p, jnp.asarray(step, jnp.int32))

    def coefficients(step):
        return {"mse": 1.0, "l1": 2.0 * min(1, step / 10), "group_l1_l2": 0.3 * min(1, step / 4),
                "intra_group_orthogonality": 0.05, "matryoshka": 1.5 * min(1, step / 2),
                "decoder_cosine": 0.1}

    for step in (0, 3, 20):
        coefs = coefficients(step)
        value, metrics = total(params, step)
        for name, ref in refs.items():
            assert_close(metrics[f"loss.{name}"], ref)
        assert_close(value, sum(coefs[n] * refs[n] for n in refs))

    # The gradient of the total is the same combination of the terms' gradients.
    grads = jax.grad(lambda p: total(p, 3)[0])(params)
    parts = [term_grad(config, params, x, index=i) for i in range(len(loss))]
    coefs3 = list(coefficients(3).values())  # in the order of `loss`
    assert coefs3[1:3] == pytest.approx([0.6, 0.225])
    for name in params:
        expected = sum(c * np.asarray(g[name], np.float64)
                       for c, g in zip(coefs3, parts, strict=True))
        assert_close(grads[name], expected, rtol=1e-4)


def test_total_loss_with_two_l0_modes(rng):
    config = make_config(
        [{"term": "mse"},
         {"term": "l0", "coefficient": 0.5, "warmup_steps": 8, "mode": "tanh", "tanh_scale": 2.0},
         {"term": "l0", "coefficient": 3.0, "mode": "quadratic", "target_l0": 4.0}],
        activation="jumprelu", jumprelu_bandwidth=JUMP_BANDWIDTH)
    params, x = random_params(rng, config.sae), random_x(rng)
    P, xs = f64(params), f64(x)
    s = config.sae
    f = np_codes(P, xs, s)[1]
    mse = np.mean(np.sum((f @ P["W_dec"] + P["b_dec"] - xs) ** 2, axis=1))
    tanh = np_l0(P, xs, s, mode="tanh", tanh_scale=2.0)
    quad = np_l0(P, xs, s, mode="quadratic", target_l0=4.0)
    out = forward(config, params, x)
    for step in (2, 8):
        value, metrics = penalties.total_loss(config.loss, out, params, jnp.asarray(step))
        assert_close(metrics["loss.l0_1"], tanh)
        assert_close(metrics["loss.l0_2"], quad)
        assert_close(value, mse + 0.5 * min(1, step / 8) * tanh + 3.0 * quad)


def test_decoder_cosine_default_is_exact_up_to_the_batch_size(rng):
    """exact_max: null -> exact while d_sae <= batch; sampled rows once the batch is smaller."""
    config = make_config([{"term": "decoder_cosine", "chunk_size": 6}])
    params = random_params(rng, config.sae)
    rows = np_cosine_rows(f64(params), 0.0)
    batch_of_d_sae = np.abs(rng.standard_normal((D_SAE, D_IN))).astype(np.float32)
    value, _, _ = term_value(config, params, batch_of_d_sae)
    assert_close(value, rows.sum() / D_SAE)
    smaller = np.abs(rng.standard_normal((D_SAE - 4, D_IN))).astype(np.float32)
    key = jax.random.PRNGKey(3)
    value, _, _ = term_value(config, params, smaller, key=key)
    assert_close(value, rows[cosine_chunk_index(key, 6)].sum() / 6)
