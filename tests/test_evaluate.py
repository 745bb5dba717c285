"""Evaluation: reconstruction metrics against NumPy, feature recovery, the sparsity convention."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae.config import SAEConfig
from jaxsae.evaluate import cosine_matrix, feature_recovery, log10_firing, reconstruction_metrics
from jaxsae.sae import init_params

D_IN = 6
D_SAE = 16
DEAD = [3, 9, 12]  # latents whose encoder bias is so negative that they never fire


def make_sae(activation: str):
    cfg = SAEConfig(d_sae=D_SAE, activation=activation, k=4, decoder_norm="free",
                    init_decoder_norm=0.7)
    params = dict(init_params(jax.random.PRNGKey(4), D_IN, cfg))
    rng = np.random.default_rng(2)
    b_enc = rng.normal(0, 0.2, D_SAE)
    b_enc[DEAD] = -1e4
    params["b_enc"] = jnp.asarray(b_enc, jnp.float32)
    params["b_dec"] = jnp.asarray(rng.normal(0, 0.5, D_IN), jnp.float32)
    params["W_enc"] = params["W_enc"] + jnp.asarray(rng.normal(0, 0.3, (D_IN, D_SAE)),
                                                    jnp.float32)
    if "threshold" in params:
        params["threshold"] = jnp.asarray(rng.uniform(0, 0.4, D_SAE), jnp.float32)
    return params, cfg


def numpy_metrics(params, cfg, x: np.ndarray) -> dict:
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = x.astype(np.float64)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if cfg.activation == "relu":
        acts = np.maximum(pre, 0)
    elif cfg.activation == "topk":
        kth = np.sort(pre, axis=1)[:, -cfg.k][:, None]
        acts = np.where(pre >= kth, np.maximum(pre, 0), 0)
    else:  # jumprelu
        acts = np.where(pre > p["threshold"], np.maximum(pre, 0), 0)
    x_hat = acts @ p["W_dec"] + p["b_dec"]
    fires = (acts > 0).sum(axis=0)
    sse = np.sum((x_hat - x) ** 2)
    return {
        "tokens": len(x),
        "l0": np.mean((acts > 0).sum(axis=1)),
        "mse": np.mean(np.sum((x_hat - x) ** 2, axis=1)),
        "explained_variance": 1 - sse / np.sum((x - x.mean(axis=0)) ** 2),
        "dead_fraction": np.mean(fires == 0),
        "firing_frequency": fires / len(x),
    }


def data(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    offset = np.array([3.0, -2.0, 0.5, 0.0, 1.0, -4.0])  # a mean far from 0 matters for EV
    return (offset + rng.normal(0, 1.0, (n, D_IN))).astype(np.float32)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_reconstruction_metrics_match_numpy(activation):
    params, cfg = make_sae(activation)
    x = data()
    blocks = [x[:128], x[128:256], x[256:]]  # uneven: the last block has 44 tokens
    got = reconstruction_metrics(params, cfg, blocks)
    want = numpy_metrics(params, cfg, x)
    assert got["tokens"] == 300
    assert got["l0"] == pytest.approx(want["l0"], rel=1e-9)
    assert got["mse"] == pytest.approx(want["mse"], rel=1e-4)
    assert got["explained_variance"] == pytest.approx(want["explained_variance"], abs=1e-4)
    assert got["dead_fraction"] == pytest.approx(want["dead_fraction"], abs=1e-12)
    np.testing.assert_allclose(got["firing_frequency"], want["firing_frequency"], atol=1e-12)
    # The case is not degenerate: some latents dead, the rest firing at different rates.
    assert want["dead_fraction"] >= len(DEAD) / D_SAE
    assert want["dead_fraction"] < 1
    assert 0 < want["l0"] < D_SAE - len(DEAD)
    # Explained variance uses the variance about the mean, not the raw second moment.
    raw = 1 - want["mse"] * len(x) / np.sum(x.astype(np.float64) ** 2)
    assert abs(raw - want["explained_variance"]) > 0.05


def test_metrics_do_not_depend_on_the_blocking():
    params, cfg = make_sae("relu")
    x = data(250, seed=3)
    one = reconstruction_metrics(params, cfg, [x])
    many = reconstruction_metrics(params, cfg, (x[i : i + 50] for i in range(0, 250, 50)))
    for key in ("tokens", "l0", "dead_fraction"):
        assert one[key] == many[key]
    assert one["mse"] == pytest.approx(many["mse"], rel=1e-5)
    assert one["explained_variance"] == pytest.approx(many["explained_variance"], abs=1e-5)
    np.testing.assert_array_equal(one["firing_frequency"], many["firing_frequency"])


def test_perfect_reconstruction_has_explained_variance_one():
    d = 4
    cfg = SAEConfig(d_sae=2 * d, activation="relu", decoder_norm="free")
    eye = np.eye(d, dtype=np.float32)
    params = {  # latents i and d+i hold the positive and negative part of coordinate i
        "W_enc": jnp.asarray(np.concatenate([eye, -eye], axis=1)),
        "W_dec": jnp.asarray(np.concatenate([eye, -eye], axis=0)),
        "b_enc": jnp.zeros(2 * d),
        "b_dec": jnp.asarray([1.0, -1.0, 2.0, 0.5]),
    }
    x = np.random.default_rng(0).normal(0, 1, (100, d)).astype(np.float32) + 5.0
    m = reconstruction_metrics(params, cfg, [x[:50], x[50:]])
    assert m["mse"] == pytest.approx(0.0, abs=1e-10)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("value", [0.0, 1.0, 123.4])
def test_tokens_that_do_not_vary_have_no_explained_variance(value):
    """Constant tokens leave nothing to explain: Σ‖x‖² − ‖Σx‖²/n is rounding error there, and
    a ratio to it was reported as -2.4e34 (and all-zero tokens as 1.0)."""
    params, cfg = make_sae("relu")
    x = np.full((300, D_IN), value, np.float32)
    m = reconstruction_metrics(params, cfg, [x[:100], x[100:]])
    assert np.isnan(m["explained_variance"]) and np.isfinite(m["mse"])
    x[::2] += 0.1 * max(value, 1.0)  # variance is measured again
    assert np.isfinite(reconstruction_metrics(params, cfg, [x])["explained_variance"])


def test_reconstruction_metrics_refuses_no_tokens():
    params, cfg = make_sae("relu")
    with pytest.raises(ValueError, match="no tokens"):
        reconstruction_metrics(params, cfg, [])


# ---------------------------------------------------------------------------------------------
# Feature recovery


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, d))
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_permuted_flipped_rescaled_decoder_is_perfect():
    rng = np.random.default_rng(0)
    truth = unit_rows(12, 8, seed=1) * rng.uniform(0.5, 2.0, (12, 1))  # norms do not matter
    perm = rng.permutation(12)
    signs = rng.choice([-1.0, 1.0], 12)
    scales = rng.uniform(0.1, 10.0, 12)
    decoder = truth[perm] * (signs * scales)[:, None]
    r = feature_recovery(truth, decoder.astype(np.float32))
    assert r["mcc"] == pytest.approx(1.0, abs=1e-6)
    assert r["mmcs"] == pytest.approx(1.0, abs=1e-6)
    # With extra latents beyond the true features it is still perfect.
    wider = np.concatenate([decoder, unit_rows(5, 8, seed=2)])[rng.permutation(17)]
    r = feature_recovery(truth, wider)
    assert r["mcc"] == pytest.approx(1.0, abs=1e-6)
    assert r["mmcs"] == pytest.approx(1.0, abs=1e-6)


def test_random_decoder_scores_lower():
    truth = unit_rows(12, 8, seed=1)
    r = feature_recovery(truth, unit_rows(12, 8, seed=7))
    assert r["mcc"] < 0.8
    assert r["mcc"] <= r["mmcs"] + 1e-12
    noisy = truth + 0.3 * unit_rows(12, 8, seed=8)
    partial = feature_recovery(truth, noisy)
    assert r["mcc"] < partial["mcc"] < 1.0


@pytest.mark.parametrize(("n_true", "d_sae", "seed"), [(4, 4, 0), (4, 4, 1), (3, 5, 2), (4, 6, 3)])
def test_mcc_is_the_best_one_to_one_matching(n_true, d_sae, seed):
    truth = unit_rows(n_true, 3, seed=seed)  # d=3 < n: cosines are large and matchings compete
    decoder = unit_rows(d_sae, 3, seed=seed + 100)
    cos = np.abs(truth @ decoder.T)
    best = max(np.mean([cos[i, j] for i, j in enumerate(cols)])
               for cols in itertools.permutations(range(d_sae), n_true))
    greedy_is_worse = np.mean(cos.max(axis=1)) > best + 1e-9  # mmcs may reuse a latent
    r = feature_recovery(truth, decoder)
    assert r["mcc"] == pytest.approx(best, abs=1e-12)
    assert r["mmcs"] == pytest.approx(np.mean(cos.max(axis=1)), abs=1e-12)
    assert r["mmcs"] >= r["mcc"] - 1e-12
    if greedy_is_worse:
        assert r["mmcs"] > r["mcc"]


def test_cosine_matrix():
    truth = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    decoder = np.array([[0.0, 3.0], [-1.0, 0.0], [0.0, 0.0]])  # the last row is all zeros
    cos = cosine_matrix(truth, decoder)
    assert cos.shape == (3, 3)
    s = np.sqrt(0.5)
    np.testing.assert_allclose(cos, [[0, 1, 0], [1, 0, 0], [s, s, 0]], atol=1e-12)
    # float32 rows equal to a true direction: |cos| never above 1, so neither is an mcc
    # (fault testing: 1 + 7e-9)
    rows = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    assert np.all(np.diag(cosine_matrix(rows, rows)) <= 1.0)
    assert feature_recovery(rows, rows)["mcc"] <= 1.0


# ---------------------------------------------------------------------------------------------
# Sparsity convention


def test_log10_firing_convention():
    freq = np.array([0.0, 1e-3, 0.01, 0.5, 1.0])
    got = log10_firing(freq)
    assert got.dtype == np.float32
    assert got.shape == freq.shape
    np.testing.assert_allclose(got, np.log10(freq + 1e-10), rtol=1e-6)
    assert got[0] == pytest.approx(-10.0)
    assert got[2] == pytest.approx(-2.0, abs=1e-6)
    assert got[-1] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(got) > 0)


def test_ground_truth_sums_keep_no_matching_matrix():
    """A sweep's SAEs are evaluated together: each keeps what its metrics need of the
    [n_true, d_sae] |cos| matrix, not the matrix (a review: K of them held for the whole pass),
    and the metrics read from what is kept are those of the matrix."""
    from jaxsae import evaluate

    truth = unit_rows(6, 4, seed=3)
    cfg = SAEConfig(d_sae=10, decoder_norm="free")
    params = init_params(jax.random.PRNGKey(0), 4, cfg)
    sums = evaluate.GroundTruthSums(params, cfg, truth)
    assert not any(np.shape(v) == (6, 10) for v in vars(sums).values())
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    codes = np.abs(np.random.default_rng(1).normal(size=(64, 6)))
    sums.add(x, jnp.asarray(x), codes)
    report = sums.result()
    cos = cosine_matrix(truth, np.asarray(params["W_dec"]))
    assert report["mcc"] == pytest.approx(feature_recovery(truth, params["W_dec"])["mcc"])
    assert report["mmcs"] == pytest.approx(cos.max(axis=1).mean())
    assert report["sb_uniqueness"] == len(set(np.argmax(cos, axis=0).tolist())) / 10
