"""SynthSAEBench-compatible data: the structure, and the sparse sampler against a plain dense
reference of the same distribution (SAELens's semantics written out with numpy). The same
statistics are checked against SAELens's own generator in tests/interop/."""

from __future__ import annotations

import functools
import json
import re

import jax
import numpy as np
import pytest

from jaxsae.data import synthsaebench as sb
from jaxsae.errors import ConfigError, DataError


def reference_codes(arrays, n, rng, *, roots, branching, max_depth, scale_children,
                    chunk=4096):
    """Dense, level by level, as SAELens describes its generator: every feature drawn from the
    Gaussian copula at its (compensated) probability with relu(mean + std·N) magnitudes; then,
    top-down, children zeroed where their parent is zero (or scaled by parent / parent mean),
    and of exclusive siblings that fire together one kept uniformly at random. Rows are
    independent, so they are drawn `chunk` at a time (whole-batch float64 temporaries cost
    most of the time in page faults). Returns float32 codes [n, features]."""
    factor = arrays["factor"].astype(np.float64)
    nf = factor.shape[0]
    spread = np.sqrt(1 - np.sum(factor**2, axis=1))
    threshold = sb.ndtri(1 - arrays["firing_prob"].astype(np.float64))
    parent, level = arrays["parent"], arrays["level"]
    out = np.empty((n, nf), np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        z = rng.standard_normal((m, factor.shape[1])) @ factor.T + rng.standard_normal(
            (m, nf)) * spread
        mags = np.maximum(arrays["magnitude_mean"] + arrays["magnitude_std"]
                          * rng.standard_normal((m, nf)), 0)
        codes = np.where(z > threshold, mags, 0.0)
        for depth in range(1, max_depth + 1):
            children = np.flatnonzero(level == depth)
            p = parent[children]
            gate = (codes[:, p] / arrays["magnitude_mean"][p] if scale_children
                    else (codes[:, p] > 0).astype(float))
            codes[:, children] *= gate
            groups = children.reshape(-1, branching)
            groups = groups[arrays["exclusive"][parent[groups[:, 0]]] > 0]
            block = codes[:, groups]  # [m, exclusive groups, branching]
            on = block > 0
            winner = np.argmax(np.where(on, rng.random(on.shape), -1), axis=2)
            keep = np.arange(branching) == winner[..., None]
            codes[:, groups] = np.where(keep & on, block, 0)
        out[lo:lo + m] = codes
    return out


SMALL = {"n_features": 600, "d_in": 32, "roots": 4, "branching": 3, "max_depth": 2,
         "exclusive_portion": 0.5, "correlation_rank": 4, "correlation_scale": 0.3,
         "min_prob": 2e-3, "orthogonalize_steps": 20, "orthogonalize_lr": 1e-2}


@pytest.fixture(scope="module")
def small():
    spec = sb.SynthSAEBenchSpec(preset="tiny", **SMALL)
    return spec, spec.truth()


def test_structure(small):
    spec, truth = small
    parent, level = truth["parent"], truth["level"]
    assert spec.tree_features == 4 * (1 + 3 + 9) == 52
    np.testing.assert_array_equal(level[:4], 0)
    np.testing.assert_array_equal(parent[4:16], np.repeat(np.arange(4), 3))
    np.testing.assert_array_equal(parent[16:52], 4 + np.repeat(np.arange(12), 3))
    assert (level[52:] == -1).all() and (parent[52:] == -1).all()
    # Zipf onto [min, max], feature 0 the most frequent
    base = truth["base_prob"]
    assert base[0] == pytest.approx(0.4) and base[-1] == pytest.approx(2e-3)
    assert np.all(np.diff(base) < 0)
    # half the 16 parents exclusive; compensation as the formula says, for one child of each kind
    assert truth["exclusive"][:16].sum() == 8 and truth["exclusive"][16:].sum() == 0
    prob = truth["firing_prob"].astype(np.float64)
    for child in (4, 5, 16, 20, 40):
        p = parent[child]
        want = base[child] / base[p]
        if truth["exclusive"][p]:
            siblings = np.flatnonzero(parent == p)
            want *= 1 + (base[siblings].sum() - base[child]) / base[p]
        assert prob[child] == pytest.approx(min(want, 1.0), rel=1e-5)
    np.testing.assert_allclose(prob[52:], base[52:])
    # unit dictionary rows, bias of the asked norm, magnitudes linear 5 -> 4
    np.testing.assert_allclose(np.linalg.norm(truth["directions"], axis=1), 1, atol=1e-5)
    assert np.linalg.norm(truth["bias"]) == pytest.approx(0.5, rel=1e-5)
    assert truth["magnitude_mean"][0] == 5 and truth["magnitude_mean"][-1] == pytest.approx(4)
    assert (np.sum(truth["factor"] ** 2, axis=1) <= 0.99 + 1e-6).all()


def test_orthogonalising_pushes_the_rows_apart():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 16))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    out = sb.orthogonalize(rows, 200, 1e-2)

    def pair_loss(d):
        g = d @ d.T
        return np.sum(g**2) - np.sum(np.diag(g) ** 2)

    # 300 unit rows in 16 dims: Σ_{i≠j} (d_i·d_j)² >= 300²/16 - 300 (a tight frame)
    assert pair_loss(out) < 1.001 * (300**2 / 16 - 300) < 0.97 * pair_loss(rows)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)


def test_presets_and_refusals():
    assert (sb.SynthSAEBenchSpec(preset="full").n_features, sb.SynthSAEBenchSpec(
        preset="full").d_in, sb.SynthSAEBenchSpec(preset="full").roots) == (16384, 768, 128)
    quarter = sb.SynthSAEBenchSpec(preset="quarter", d_in=128)
    assert (quarter.n_features, quarter.d_in, quarter.roots) == (4096, 128, 32)
    assert quarter.tree_features == 32 * 85
    with pytest.raises(ConfigError, match=r"roots: 20 trees .* need 1700 features; n_features"):
        sb.SynthSAEBenchSpec(preset="tiny", roots=20)
    with pytest.raises(ConfigError, match="min_prob"):
        sb.SynthSAEBenchSpec(min_prob=0.5)
    with pytest.raises(ConfigError, match=r"^max_prob"):  # the culprit, not min_prob
        sb.SynthSAEBenchSpec(max_prob=1.5)
    with pytest.raises(ConfigError, match="correlation_rank"):  # [B, rank, n] beyond memory
        sb.SynthSAEBenchSpec(preset="tiny", correlation_rank=5000)
    with pytest.raises(ConfigError, match="seed"):
        sb.SynthSAEBenchSpec(seed=-1)
    # (fault testing: the sampler's key kept the low 32 bits, so seed 2^32 drew seed 0's
    # samples) a seed the key cannot hold is refused; the largest it holds is accepted
    with pytest.raises(ConfigError, match=r"^seed: must be in \[0, 2\^32\) for synthsaebench"):
        sb.SynthSAEBenchSpec(preset="tiny", seed=2**32)
    sb.SynthSAEBenchSpec(preset="tiny", seed=2**32 - 1)
    # every feature with the same spread (fault testing: refused as "must be > 0")
    sb.SynthSAEBenchSpec(magnitude_std_std=0.0, magnitude_std_mean=0.0)
    with pytest.raises(ConfigError, match=r"^magnitude_std_mean: must be >= 0"):
        sb.SynthSAEBenchSpec(magnitude_std_mean=-1.0)
    # (fault testing: a traceback, a hang, and a factor of zeros without a word)
    for depth in (65, 10_000, 100_000):
        with pytest.raises(ConfigError, match=r"^max_depth: must be <= 64"):
            sb.SynthSAEBenchSpec(preset="tiny", max_depth=depth)
    for scale in (1e160, 1e308):
        with pytest.raises(ConfigError, match=r"^correlation_scale: must be in \[0, 1000\]"):
            sb.SynthSAEBenchSpec(preset="tiny", correlation_scale=scale)


def firing_stats(codes, parent, exclusive, branching):
    """What two draws of one world are compared on (here, and against SAELens in
    tests/interop/test_synthsaebench.py): per-feature rates, L0, children firing without their
    parent, P(child | parent), mean magnitudes, exclusive siblings firing together."""
    fire = codes > 0
    children = np.flatnonzero(parent >= 0)
    with_parent = fire[:, children] & fire[:, parent[children]]
    return {
        "rate": fire.mean(axis=0),
        "l0": fire.sum(axis=1).mean(),
        "orphans": int((fire[:, children] & ~fire[:, parent[children]]).sum()),
        "given_parent": with_parent.sum(axis=0) / np.maximum(fire[:, parent[children]].sum(
            axis=0), 1),
        "mean": np.array([codes[fire[:, i], i].mean() if fire[:, i].any() else np.nan
                          for i in range(codes.shape[1])]),
        "exclusive_pairs": int(sum(
            (fire[:, g].sum(axis=1) > 1).sum()
            for g in children.reshape(-1, branching)
            if exclusive[parent[g[0]]])),
    }


def test_sampler_matches_the_dense_reference(small):
    """Per-feature firing rates, L0, P(child | parent), mean magnitudes, mutual exclusion and
    co-firing of correlated features: the sparse sampler and the dense reference agree within
    sampling error; x is codes · D + bias."""
    _, truth = small
    sampler = sb.Sampler(truth, roots=4, branching=3, max_depth=2, scale_children=True)
    n = 4 * 16384
    xs, codes = zip(*(sampler.sample(jax.random.key(i), 16384, codes=True) for i in range(4)),
                    strict=True)
    ours = np.concatenate([np.asarray(c) for c in codes])
    x = np.concatenate([np.asarray(v) for v in xs])
    np.testing.assert_allclose(x, ours @ truth["directions"] + truth["bias"], atol=2e-4)
    ref = reference_codes(truth, n, np.random.default_rng(1), roots=4, branching=3,
                          max_depth=2, scale_children=True)
    a, b = (firing_stats(c, truth["parent"], truth["exclusive"], 3) for c in (ours, ref))
    assert a["orphans"] == b["orphans"] == 0
    assert a["exclusive_pairs"] == b["exclusive_pairs"] == 0
    # rates: a two-sample z per feature (features with enough firings)
    pooled = (a["rate"] + b["rate"]) / 2
    ok = pooled * n > 30
    assert ok.sum() > 300
    z = (a["rate"] - b["rate"])[ok] / np.sqrt(2 * pooled[ok] * (1 - pooled[ok]) / n)
    assert np.abs(z).max() < 5 and abs(z.mean()) < 0.3, (np.abs(z).max(), z.mean())
    assert a["l0"] == pytest.approx(b["l0"], rel=0.02)
    np.testing.assert_allclose(a["given_parent"], b["given_parent"], atol=0.03)
    both = ~np.isnan(a["mean"]) & ~np.isnan(b["mean"]) & ok
    np.testing.assert_allclose(a["mean"][both], b["mean"][both], rtol=0.1)
    # the copula: co-firing of the frequent free features (correlated through the factor)
    free = np.arange(52, 72)
    cofire = [(o[:, free] > 0).astype(float) for o in (ours, ref)]
    corr = [np.corrcoef(c.T)[np.triu_indices(20, 1)] for c in cofire]
    assert np.corrcoef(corr[0], corr[1])[0, 1] > 0.8  # the same pattern of correlations
    assert np.abs(corr[0] - corr[1]).max() < 0.06


def test_sampler_without_correlation_hierarchy_or_free_features():
    """Edge cases: rank 0 (independent firing) with a forest using every feature; no
    hierarchy."""
    for fields in ({"correlation_rank": 0, "n_features": 52}, {"max_depth": 0, "roots": 0}):
        spec = sb.SynthSAEBenchSpec(preset="tiny", **{**SMALL, "orthogonalize_steps": 0,
                                                      **fields})
        truth = spec.truth()
        sampler = sb.Sampler(truth, roots=spec.roots, branching=3, max_depth=spec.max_depth,
                             scale_children=True)
        x, codes = sampler.sample(jax.random.key(0), 1000, codes=True)  # not a multiple of 16
        codes = np.asarray(codes)
        assert codes.shape == (1000, spec.n_features) and x.shape == (1000, 32)
        rate = (codes > 0).mean(axis=0)
        ref = reference_codes(truth, 20000, np.random.default_rng(0), roots=spec.roots,
                              branching=3, max_depth=spec.max_depth, scale_children=True)
        assert (codes > 0).sum(axis=1).mean() == pytest.approx(
            (ref > 0).sum(axis=1).mean(), rel=0.1), fields
        assert rate.max() <= 1
        if not spec.correlation_rank:
            # no zero-width product of the rows' factors, which XLA constant-folded for
            # seconds, printing error-level "slow operation" lines (fault testing)
            once = jax.jit(functools.partial(sampler._once, batch=1000, codes=False,
                                             caps=sampler.capacities(1008)))
            text = once.lower(sampler.arrays, jax.random.key(0)).as_text()
            assert not re.search(r"tensor<\d+x0x", text)


@pytest.mark.parametrize("rows", [4096, 5008, 16])
def test_the_bounds_group_max_in_chunks_is_the_plain_one(monkeypatch, rows):
    """The bound's factor product and group max, chunk by chunk on the CPU (padding the last
    chunk), against the whole product at once."""
    rng = np.random.default_rng(rows)
    eps = jax.numpy.asarray(rng.standard_normal((rows, 25)), np.float32)
    factor = jax.numpy.asarray(0.1 * rng.standard_normal((300, 25)), np.float32)
    plain = np.asarray(eps @ factor.T).reshape(-1, sb.GROUP, 300).max(axis=1)
    for chunk_bytes in (1 << 40, 64 * 300 * 4, 1):  # one piece, chunks of 64 rows, of GROUP
        monkeypatch.setattr(sb, "BOUND_CHUNK_BYTES", chunk_bytes)
        np.testing.assert_allclose(np.asarray(jax.jit(sb._group_max)(eps, factor)), plain,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("slots", [64, 3, 1])
def test_the_slot_decode_is_the_plain_sum(slots):
    """`_decode` (codes laid out by their place in the row, decoded a slot at a time, added to
    x) against a plain scatter-add: runs of codes each ordered by row, some rows in several
    runs, an empty run, zero-valued padding after them; with room for every row's codes, and
    with rows that spill past `slots` (added by the scatter-add)."""
    rng = np.random.default_rng(slots)
    rows, n, d = 40, 300, 8
    lengths = [50, 0, 90, 37]
    row = np.concatenate([np.sort(rng.integers(0, rows, m)) for m in lengths]
                         + [np.zeros(n - sum(lengths), int)])
    feat = rng.integers(0, 20, n)
    val = np.where(np.arange(n) < sum(lengths), rng.uniform(0.5, 2, n), 0.0)
    dictionary = rng.standard_normal((20, d))
    start = rng.standard_normal((rows, d))
    want = start.copy()
    np.add.at(want, row, val[:, None] * dictionary[feat])
    decode = jax.jit(sb._decode, static_argnums=6)
    got = decode(*(jax.numpy.asarray(a, dt) for a, dt in (
        (dictionary, np.float32), (row, np.int32), (feat, np.int32), (val, np.float32),
        (lengths, np.int32), (start, np.float32))), slots)
    assert np.bincount(row[:sum(lengths)]).max() > 3  # (the small slots do spill)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_room_to_spare_changes_no_draw_and_an_overflow_draws_again(small, monkeypatch):
    """Each stage's uniforms come from their own key, entry by entry, so every capacity
    doubled gives the same codes and tokens (what lets capacities be retuned without changing
    which tokens a seed gives). A capacity at about the median count overflows about every
    other draw, and `sample` returns the first whole draw of fold_in(key, 0), 1, ... (never a
    truncated one)."""
    _, truth = small
    sampler = sb.Sampler(truth, roots=4, branching=3, max_depth=2, scale_children=True)
    draws = [tuple(map(np.asarray, sampler.sample(jax.random.key(i), 16, codes=True)))
             for i in range(20)]
    counts = [int((codes[:, 4:] > 0).sum()) for _, codes in draws]
    normal, normal_once = sampler.capacities(16), sampler._jitted[(16, True)]

    roomy = jax.tree.map(lambda c: 2 * c + 100, normal)
    monkeypatch.setattr(sampler, "capacities", lambda batch: roomy)
    sampler._jitted.clear()
    sampler.sample(jax.random.key(0), 16, codes=True)
    roomy_once, compared = sampler._jitted[(16, True)], 0
    for i in range(20):
        key = jax.random.fold_in(jax.random.key(i), 0)
        x, codes, overflowed = map(np.asarray, normal_once(sampler.arrays, key))
        if overflowed:  # (a 16-row pilot makes these capacities tight: that draw is redone)
            continue
        x2, codes2, overflowed2 = map(np.asarray, roomy_once(sampler.arrays, key))
        assert not overflowed2
        np.testing.assert_array_equal(codes2, codes)
        np.testing.assert_allclose(x2, x, rtol=1e-6, atol=1e-6)
        compared += int((codes > 0).sum())
    assert compared > 300

    tight = {**normal, "codes": int(np.median(counts))}
    monkeypatch.setattr(sampler, "capacities", lambda batch: tight)
    sampler._jitted.clear()
    sampler.sample(jax.random.key(0), 16, codes=True)
    once = sampler._jitted[(16, True)]  # one draw with the tight capacities
    retried = 0
    for i in range(10):
        key = jax.random.key(100 + i)
        x, codes = map(np.asarray, sampler.sample(key, 16, codes=True))
        attempt = next(a for a in range(50)
                       if not once(sampler.arrays, jax.random.fold_in(key, a))[2])
        retried += attempt > 0
        want = once(sampler.arrays, jax.random.fold_in(key, attempt))
        np.testing.assert_array_equal(codes, np.asarray(want[1]))
        assert (codes[:, 4:] > 0).sum() <= tight["codes"]
        np.testing.assert_allclose(x, codes @ truth["directions"] + truth["bias"], atol=2e-4)
    assert retried  # (about half the keys)


def test_synth_command_writes_the_benchmark_and_a_run_reports_its_metrics(tmp_path, capsys):
    """`jaxsae synth synthsaebench --preset tiny --tokens N --seed S --out DIR` (the contract):
    shards whose tokens are the regenerated true codes through the dictionary plus the bias
    (across a block boundary), and a run on them reports the benchmark's sb_ metrics."""
    from jaxsae import cli
    from jaxsae.data import synthetic
    from jaxsae.data.shards import ShardSet
    from jaxsae.train import train
    from tests.conftest import small_config

    out = tmp_path / "sb"
    assert cli.main(["synth", "synthsaebench", "--preset", "tiny", "--tokens", "20000",
                     "--seed", "2", "--out", str(out), "--orthogonalize-steps", "10",
                     "--no-progress"]) == 0
    truth = synthetic.load_truth(out)
    assert (truth.spec.n_features, truth.spec.d_in, truth.spec.seed) == (1024, 64, 2)
    x = ShardSet(out).read(16000, 16400)
    np.testing.assert_allclose(x, truth.codes(16000, 16400) @ truth.directions
                               + truth.arrays["bias"], atol=2e-4)
    assert cli.main(["synth", "synthsaebench", "--preset", "huge", "--out",
                     str(tmp_path / "no")]) == 2
    assert "--preset" in capsys.readouterr().err and not (tmp_path / "no").exists()
    cfg = small_config(out, tmp_path / "run", data={"eval_tokens": 2048},
                       sae={"d_sae": 128, "activation": "topk", "k": 8})
    result = train(cfg, progress=False)
    for key in ("sb_f1", "sb_mcc", "sb_uniqueness", "sb_explained_variance", "sb_shrinkage",
                "parent_recall_alone"):
        assert 0 < result.eval[key] <= 1.5, key
    assert result.eval["sb_true_l0"] == pytest.approx(result.eval["true_l0"])
    # data of another version of the sampler: its true codes are not regenerated
    meta = out / synthetic.TRUTH_JSON
    info = json.loads(meta.read_text())
    assert info["sampler"] == sb.SAMPLER_VERSION
    del info["sampler"]  # as written before versions were recorded: version 1
    meta.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"version 1 of the synthsaebench sampler.*this jaxsae's "
                                        r"`jaxsae synth` into a new directory$"):
        synthetic.load_truth(out)
    # a run on it trains, resumes and exports on its tokens, without truth metrics (fault
    # testing: it could be neither resumed nor exported, and the advice to write the data again
    # led to a resume on other tokens)
    from jaxsae.data import open_source
    from jaxsae.finish import ground_truth

    notes: list[str] = []
    assert ground_truth(cfg, open_source(cfg.data), notes.append) is None
    assert notes == [f"note: {meta}: drawn by version 1 of the synthsaebench sampler; this "
                     f"jaxsae draws version {sb.SAMPLER_VERSION} (other tokens from the same "
                     "seed): its true codes cannot be regenerated, so no ground-truth metrics"]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (the bias's cast)
def test_settings_that_overflow_name_the_knobs(tmp_path, capsys):
    """(fault testing: a bias of 1e39 was blamed on the magnitudes or orthogonalize_lr)"""
    from jaxsae import cli

    assert cli.main(["synth", "synthsaebench", "--preset", "tiny", "--tokens", "100",
                     "--bias", "1e39", "--orthogonalize-steps", "0", "--out",
                     str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("drew non-finite values (in the block of tokens 0..99); lower the "
                        "magnitudes, bias or orthogonalize_lr"), err
    assert not (tmp_path / "o").exists()
