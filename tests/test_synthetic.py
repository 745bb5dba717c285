"""Ground-truth generators: firing probabilities, the superposition data, and spec parsing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from jaxsae import outputs, tensorfile
from jaxsae.checks import check_run
from jaxsae.config import config_from_dict
from jaxsae.data.shards import MANIFEST, ShardSet
from jaxsae.data.synthetic import (
    BLOCK_TOKENS,
    GENERATORS,
    TRUTH_JSON,
    TRUTH_TENSORS,
    SuperpositionSpec,
    generate,
    generate_superposition,
    parse_spec,
    zipf_probabilities,
)
from jaxsae.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# zipf_probabilities


@pytest.mark.parametrize(("n", "mean_l0", "exponent"), [
    (100, 4.0, 0.5),
    (100, 4.0, 0.0),
    (50, 1.5, 2.0),
    (10, 9.5, 1.0),   # needs capping: the top ranks would exceed 1
    (8, 7.9, 3.0),    # heavy capping
    (5, 5.0, 1.0),    # every feature always fires
    (1, 1.0, 0.5),
])
def test_zipf_probabilities(n, mean_l0, exponent):
    p = zipf_probabilities(n, mean_l0, exponent)
    assert p.shape == (n,)
    assert p.sum() == pytest.approx(mean_l0, rel=1e-12)
    assert np.all(np.diff(p) <= 1e-15)  # non-increasing with rank
    assert np.all(p <= 1.0)
    assert np.all(p > 0.0)
    # Water-filling: the uncapped probabilities stay proportional to rank^-exponent.
    free = p < 1.0
    ratio = p[free] / np.arange(1, n + 1)[free] ** -exponent
    np.testing.assert_allclose(ratio, ratio[0] if len(ratio) else ratio, rtol=1e-12)


def test_zipf_probabilities_capping_happens():
    p = zipf_probabilities(10, 9.5, 1.0)
    uncapped = np.arange(1, 11) ** -1.0
    assert (uncapped * 9.5 / uncapped.sum()).max() > 1  # the naive scaling would exceed 1
    assert np.sum(p == 1.0) >= 1
    assert p.sum() == pytest.approx(9.5)


def test_zipf_probabilities_uniform_and_shape():
    np.testing.assert_allclose(zipf_probabilities(20, 2.0, 0.0), np.full(20, 0.1))
    p = zipf_probabilities(4, 1.0, 1.0)  # 1, 1/2, 1/3, 1/4 scaled to sum 1
    np.testing.assert_allclose(p, np.array([12, 6, 4, 3]) / 25)


# ---------------------------------------------------------------------------------------------
# generate_superposition

SPEC = SuperpositionSpec(n_features=24, d_in=8, tokens=5000, mean_l0=3.0, zipf_exponent=0.7,
                         magnitude_mean=1.0, magnitude_std=0.2, seed=7, shard_tokens=2048)


@pytest.fixture(scope="module")
def superposition(tmp_path_factory):
    return generate_superposition(SPEC, tmp_path_factory.mktemp("synth") / "set", progress=False)


def test_writes_a_valid_shard_set(superposition):
    shards = ShardSet(superposition, check_finite=True)
    assert shards.d_in == SPEC.d_in
    assert shards.n_tokens == SPEC.tokens
    assert [e.n_tokens for e in shards.manifest.shards] == [2048, 2048, 904]
    assert shards.manifest.dtype == "float32"
    assert shards.manifest.source == {"generator": "superposition", **dataclasses.asdict(SPEC),
                                      "block_tokens": BLOCK_TOKENS}
    assert not superposition.with_name("set.partial").exists()


def test_writes_the_truth(superposition):
    truth = tensorfile.read(superposition / TRUTH_TENSORS)
    directions = np.asarray(truth["directions"])
    assert directions.shape == (SPEC.n_features, SPEC.d_in)
    assert directions.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1.0, rtol=1e-6)
    assert len(np.unique(directions.round(4), axis=0)) == SPEC.n_features
    p = np.asarray(truth["firing_prob"])
    assert p.shape == (SPEC.n_features,)
    assert p.sum() == pytest.approx(SPEC.mean_l0, rel=1e-5)
    np.testing.assert_allclose(np.sort(p)[::-1],
                               zipf_probabilities(SPEC.n_features, SPEC.mean_l0,
                                                  SPEC.zipf_exponent), rtol=1e-6)
    np.testing.assert_array_equal(truth["magnitude_mean"], np.full(SPEC.n_features, 1.0))
    np.testing.assert_allclose(truth["magnitude_std"], np.full(SPEC.n_features, 0.2))
    spec_json = json.loads((superposition / TRUTH_JSON).read_text())
    assert spec_json == {"generator": "superposition", **dataclasses.asdict(SPEC),
                         "block_tokens": BLOCK_TOKENS,
                         "tensors_digest": outputs.file_digest(superposition / TRUTH_TENSORS)}
    assert SuperpositionSpec(**{k: v for k, v in spec_json.items()
                                if k not in ("generator", "block_tokens",
                                             "tensors_digest")}) == SPEC


def test_second_moments_match_the_truth(tmp_path):
    """E[x] = μ Σ p_i d_i and E‖x‖² = Σ p_i E[m²] + μ² Σ_{i≠j} p_i p_j <d_i, d_j>."""
    spec = dataclasses.replace(SPEC, tokens=40000, shard_tokens=16384)  # standard error ~0.5%
    out = generate_superposition(spec, tmp_path / "set", progress=False)
    x = ShardSet(out).read(0, spec.tokens).astype(np.float64)
    truth = tensorfile.read(out / TRUTH_TENSORS)
    d = np.asarray(truth["directions"], np.float64)
    p = np.asarray(truth["firing_prob"], np.float64)
    mu, sigma = SPEC.magnitude_mean, SPEC.magnitude_std
    gram = d @ d.T
    expected_sq = np.sum(p) * (mu**2 + sigma**2) + mu**2 * (p @ gram @ p - np.sum(p**2))
    got_sq = np.mean(np.sum(x**2, axis=1))
    assert got_sq == pytest.approx(expected_sq, rel=0.03)
    np.testing.assert_allclose(x.mean(axis=0), mu * p @ d, atol=0.03)


def test_codes_have_the_requested_l0(tmp_path):
    """Undercomplete (n_features < d_in): the codes are recoverable exactly by least squares."""
    spec = SuperpositionSpec(n_features=10, d_in=16, tokens=6000, mean_l0=2.5,
                             zipf_exponent=1.0, magnitude_std=0.1, seed=1, shard_tokens=4096)
    out = generate_superposition(spec, tmp_path / "set", progress=False)
    x = ShardSet(out).read(0, spec.tokens).astype(np.float64)
    truth = tensorfile.read(out / TRUTH_TENSORS)
    codes = x @ np.linalg.pinv(np.asarray(truth["directions"], np.float64))
    active = codes > 0.5
    assert np.all((np.abs(codes) < 1e-3) | (np.abs(codes - 1.0) < 0.6))  # 0 or ~magnitude
    assert active.sum(axis=1).mean() == pytest.approx(spec.mean_l0, rel=0.03)
    np.testing.assert_allclose(active.mean(axis=0), truth["firing_prob"], atol=0.03)
    magnitudes = codes[active]
    assert magnitudes.mean() == pytest.approx(1.0, abs=0.01)
    assert magnitudes.std() == pytest.approx(0.1, abs=0.01)


def test_generation_is_deterministic(tmp_path):
    spec = dataclasses.replace(SPEC, tokens=3000)
    a = generate_superposition(spec, tmp_path / "a", progress=False)
    b = generate_superposition(spec, tmp_path / "b", progress=False)
    c = generate_superposition(dataclasses.replace(spec, seed=8), tmp_path / "c", progress=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    xa, xc = ShardSet(a).read(0, 3000), ShardSet(c).read(0, 3000)
    assert not np.allclose(xa, xc)
    ta, tc = tensorfile.read(a / TRUTH_TENSORS), tensorfile.read(c / TRUTH_TENSORS)
    assert not np.allclose(ta["directions"], tc["directions"])


def test_data_does_not_depend_on_shard_size(tmp_path):
    spec = dataclasses.replace(SPEC, tokens=3000)
    a = generate_superposition(spec, tmp_path / "a", progress=False)
    b = generate_superposition(dataclasses.replace(spec, shard_tokens=1000), tmp_path / "b",
                               progress=False)
    assert len(ShardSet(b).manifest.shards) == 3
    np.testing.assert_array_equal(ShardSet(a).read(0, 3000), ShardSet(b).read(0, 3000))


def test_float16_and_overwrite(tmp_path):
    spec = dataclasses.replace(SPEC, tokens=1000, dtype="float16")
    out = generate_superposition(spec, tmp_path / "set", progress=False)
    shards = ShardSet(out, check_finite=True)
    assert shards.manifest.dtype == "float16"
    assert np.load(out / shards.manifest.shards[0].file).dtype == np.float16
    with pytest.raises(DataError, match="already exists"):
        generate_superposition(spec, out, progress=False)
    generate_superposition(dataclasses.replace(spec, tokens=500), out, overwrite=True,
                           progress=False)
    assert ShardSet(out).n_tokens == 500
    assert json.loads((out / TRUTH_JSON).read_text())["tokens"] == 500
    assert json.loads((out / MANIFEST).read_text())["source"]["tokens"] == 500


@pytest.mark.parametrize(("changes", "key"), [
    ({"n_features": 0}, "n_features"),
    ({"mean_l0": 0.0}, "mean_l0"),
    ({"mean_l0": 25.0}, "mean_l0"),
    ({"zipf_exponent": -1.0}, "zipf_exponent"),
    ({"magnitude_mean": 0.0}, "magnitude_mean"),
    ({"magnitude_std": -0.1}, "magnitude_std"),
    ({"dtype": "bfloat16"}, "dtype"),
    ({"tokens": 0}, "tokens"),
    ({"magnitude_mean": float("inf")}, "magnitude_mean"),  # (inf > 0 held)
    ({"magnitude_spread": float("nan")}, "magnitude_spread"),
])
def test_spec_validation(changes, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        dataclasses.replace(SPEC, **changes)


# ---------------------------------------------------------------------------------------------
# parse_spec


def test_parse_spec_valid():
    gen, spec = parse_spec({"kind": "superposition", "n_features": 32, "d_in": 8,
                            "mean_l0": "2.5", "tokens": 1024})
    assert gen is GENERATORS["superposition"]
    assert spec == SuperpositionSpec(n_features=32, d_in=8, mean_l0=2.5, tokens=1024)


@pytest.mark.parametrize("raw", [{"kind": "gaussian"}, {"n_features": 4}, {"kind": None}])
def test_parse_spec_unknown_kind(raw):
    with pytest.raises(ConfigError, match=r"^generate\.kind: must be one of superposition"):
        parse_spec(raw)


def test_parse_spec_not_a_mapping():
    with pytest.raises(ConfigError, match=r"^data\.generate:"):
        parse_spec(["superposition"], key="data.generate")


@pytest.mark.parametrize("key", ["generate", "data.generate"])
def test_parse_spec_unknown_key(key):
    with pytest.raises(ConfigError) as err:
        parse_spec({"kind": "superposition", "n_feature": 8}, key=key)
    message = str(err.value)
    assert message.startswith(f"{key}.n_feature: unknown key")
    assert "'n_features'" in message  # the suggestion


@pytest.mark.parametrize(("raw", "named"), [
    ({"tokens": "many"}, "generate.tokens"),
    ({"n_features": 4, "mean_l0": 5.0}, "generate.mean_l0"),
    ({"dtype": "int8"}, "generate.dtype"),
])
def test_parse_spec_bad_value_names_the_key(raw, named):
    with pytest.raises(ConfigError, match=f"^{named}:"):
        parse_spec({"kind": "superposition", **raw})


def test_config_validates_data_generate():
    with pytest.raises(ConfigError, match=r"^data\.generate\.seeds: unknown key"):
        check_run(config_from_dict({"data": {"path": "x", "generate": {
            "kind": "superposition", "seeds": 1}}}))


def test_generate_dispatches(tmp_path):
    out = generate({"kind": "superposition", "n_features": 6, "d_in": 4, "tokens": 100,
                    "mean_l0": 1.0}, tmp_path / "g", progress=False)
    assert ShardSet(out).n_tokens == 100
    assert json.loads((out / TRUTH_JSON).read_text())["n_features"] == 6


def test_settings_that_draw_non_finite_values_write_nothing(tmp_path):
    """(fault testing: absurd magnitudes wrote shards of NaN and reported success)"""
    spec = SuperpositionSpec(n_features=8, d_in=4, tokens=256, mean_l0=4.0, magnitude_mean=3e38)
    with pytest.raises(DataError, match="non-finite"):
        generate_superposition(spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("flags", "knobs"), [
    (["circles", "--n-circles", "4", "--d-in", "8", "--radius", "1e300"],
     "lower radius or radius_std"),
    (["transcoder", "--n-features", "16", "--d-in", "8", "--d-out", "8", "--skip", "1e39"],
     "lower the magnitudes or skip"),
    (["superposition", "--n-features", "16", "--d-in", "8", "--magnitude-spread", "1000"],
     "lower the magnitudes"),
])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # (what the user saw printed)
def test_non_finite_settings_name_the_generator_s_own_knobs_in_one_line(tmp_path, capsys,
                                                                        flags, knobs):
    """(fault testing: circles' radius and a transcoder's skip were blamed on "the magnitudes",
    which neither has, and a skip or magnitude_spread that overflows printed numpy's
    RuntimeWarning first.) The message names what the generator has to lower, in one line."""
    from jaxsae import cli

    assert cli.main(["synth", *flags, "--tokens", "100", "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(knobs), err
    assert not any(tmp_path.iterdir())


def test_sizes_beyond_memory_are_one_line(tmp_path, capsys, monkeypatch):
    """(fault testing: --n-features 1000000000 was a MemoryError traceback)"""
    from jaxsae import cli
    from jaxsae.data import synthetic

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 954. GiB for an array")

    monkeypatch.setattr(synthetic, "write", too_big)
    assert cli.main(["synth", "superposition", "--out", str(tmp_path / "s"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory (Unable to allocate 954. GiB" in err
    # counts whose directions alone exceed the machine's memory: refused before any work
    # (fault testing: a hierarchy of depth 40 was killed by the kernel, exit 137, no message)
    assert cli.main(["synth", "hierarchy", "--out", str(tmp_path / "h"), "--depth", "40",
                     "--n-trees", "1", "--probs", *["0.5"] * 40, "--magnitudes", *["1"] * 40,
                     "--no-orthogonal", "--tokens", "100", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxsae synth: error: --depth: 1,099,511,627,775 features (n_trees x "
                          "branching^level over the levels) in d_in 64 need 512.0 TiB"), err
    # each generator's own key (fault testing: circles were blamed on a --depth they do not
    # have; a transcoder's children were not counted, and met numpy's MemoryError, or the
    # kernel, in its truth)
    for flags, said in (
            (["circles", "--n-circles", "10000000000"], "--n-circles: 20,000,000,000 features "
                                                        "(two per circle) in d_in 200"),
            (["transcoder", "--n-features", "16", "--d-in", "8", "--children", "100000000",
              "--child-prob", "1e-8"], "--children: 1,600,000,016 features (n_features x (1 + "
                                       "children)) in d_in 8")):
        assert cli.main(["synth", *flags, "--out", str(tmp_path / "o"), "--tokens", "100",
                         "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"jaxsae synth: error: {said} need "), err
    assert not any(tmp_path.iterdir())
