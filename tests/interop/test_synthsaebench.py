"""jaxsae's SynthSAEBench sampler against SAELens's own generator (`sae_lens.synthetic`), and
the `sb_` ground-truth metrics against SAELens's `eval_sae_on_synthetic_data`.

SAELens builds a world (its random tree flags, correlation factor, magnitudes, dictionary);
jaxsae's sampler is given that world's arrays and both draw tokens: per-feature firing rates,
the true L0, P(child | parent), magnitudes and co-firing must agree within sampling error. The
structure jaxsae builds itself (probabilities, compensation, magnitudes, tree numbering) is
compared with SAELens's for the same configuration."""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
synthetic = pytest.importorskip("sae_lens.synthetic")

from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig  # noqa: E402
from sae_lens.synthetic.firing_magnitudes import (  # noqa: E402
    FoldedNormalMagnitudeConfig,
    LinearMagnitudeConfig,
)
from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig  # noqa: E402
from sae_lens.synthetic.hierarchy import HierarchyConfig  # noqa: E402
from sae_lens.synthetic.synthetic_model import LowRankCorrelationConfig  # noqa: E402

from jaxsae.data import synthsaebench as sb  # noqa: E402
from tests.test_synthsaebench import firing_stats  # noqa: E402

N, D, ROOTS, BRANCHING, DEPTH = 600, 32, 4, 3, 2
TOKENS = 65536


@pytest.fixture(scope="module")
def world():
    cfg = SyntheticModelConfig(
        num_features=N, hidden_dim=D,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4,
                                                          min_prob=2e-3),
        hierarchy=HierarchyConfig(total_root_nodes=ROOTS, branching_factor=BRANCHING,
                                  max_depth=DEPTH, mutually_exclusive_portion=0.5,
                                  compensate_probabilities=True,
                                  scale_children_by_parent=True),
        orthogonalization=None,
        correlation=LowRankCorrelationConfig(rank=4, correlation_scale=0.3),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5, seed=0)
    model = SyntheticModel(cfg)
    gen = model.activation_generator
    parent = np.full(N, -1)
    exclusive = np.zeros(N, int)

    def walk(node, up):
        parent[node.feature_index] = up
        exclusive[node.feature_index] = int(node.mutually_exclusive_children)
        for child in node.children:
            walk(child, node.feature_index)

    for root in model.hierarchy.roots:
        walk(root, -1)
    ours_parent, level = sb.tree(ROOTS, BRANCHING, DEPTH, N)
    factor = model.correlation_matrix.correlation_factor.numpy()
    arrays = {
        "directions": model.feature_dict.feature_vectors.detach().numpy(),
        "bias": model.feature_dict.bias.detach().numpy(),
        "firing_prob": gen.firing_probabilities.numpy(),
        "magnitude_mean": gen.mean_firing_magnitudes.numpy(),
        "magnitude_std": gen.std_firing_magnitudes.numpy(),
        "factor": factor, "parent": parent, "level": level, "exclusive": exclusive,
    }
    return model, arrays, ours_parent


def test_the_structure_is_saelens_s(world):
    """Same numbering of the forest, Zipfian probabilities, compensation (given SAELens's
    choice of exclusive parents), magnitudes; the copula's diagonal is 1 - ‖F_i‖²."""
    model, arrays, ours_parent = world
    np.testing.assert_array_equal(arrays["parent"], ours_parent)
    base = sb.zipf_probabilities(N, 0.5, 0.4, 2e-3)
    exclusive = arrays["exclusive"] > 0
    assert exclusive.sum() == int(0.5 * (ROOTS + ROOTS * BRANCHING))
    np.testing.assert_allclose(sb.compensated(base, ours_parent, exclusive, BRANCHING),
                               arrays["firing_prob"], rtol=2e-6)
    np.testing.assert_allclose(arrays["magnitude_mean"], np.linspace(5, 4, N), rtol=1e-6)
    diag = model.correlation_matrix.correlation_diag.numpy()
    np.testing.assert_allclose(diag, 1 - np.sum(arrays["factor"] ** 2, axis=1), atol=1e-6)


def test_jaxsae_draws_what_saelens_draws(world):
    model, arrays, parent = world
    torch.manual_seed(1)
    theirs = np.concatenate([model.activation_generator.sample(16384).numpy()
                             for _ in range(TOKENS // 16384)])
    sampler = sb.Sampler(arrays, roots=ROOTS, branching=BRANCHING, max_depth=DEPTH,
                         scale_children=True)
    ours = np.concatenate([np.asarray(sampler.sample(jax.random.key(i), 16384, codes=True)[1])
                           for i in range(TOKENS // 16384)])
    a, b = (firing_stats(c, parent, arrays["exclusive"], BRANCHING) for c in (ours, theirs))
    assert a["orphans"] == b["orphans"] == 0
    assert a["exclusive_pairs"] == b["exclusive_pairs"] == 0
    pooled = (a["rate"] + b["rate"]) / 2
    ok = pooled * TOKENS > 30
    assert ok.sum() > 300
    z = (a["rate"] - b["rate"])[ok] / np.sqrt(2 * pooled[ok] * (1 - pooled[ok]) / TOKENS)
    assert np.abs(z).max() < 5, np.abs(z).max()
    assert a["l0"] == pytest.approx(b["l0"], rel=0.02)
    np.testing.assert_allclose(a["given_parent"], b["given_parent"], atol=0.03)
    both = ~np.isnan(a["mean"]) & ~np.isnan(b["mean"]) & ok
    np.testing.assert_allclose(a["mean"][both], b["mean"][both], rtol=0.1)
    free = np.arange(sb.SynthSAEBenchSpec(preset="tiny", n_features=N, d_in=D, roots=ROOTS,
                                          branching=BRANCHING, max_depth=DEPTH).tree_features,
                     N)[:20]
    corr = [np.corrcoef((c[:, free] > 0).T.astype(float))[np.triu_indices(20, 1)]
            for c in (ours, theirs)]
    assert np.corrcoef(corr[0], corr[1])[0, 1] > 0.8
    # and the tokens: x = codes · D + bias, as SAELens's feature dictionary computes them
    x = np.asarray(sampler.sample(jax.random.key(0), 512, codes=True)[0])
    codes = np.asarray(sampler.sample(jax.random.key(0), 512, codes=True)[1])
    with torch.no_grad():
        want = model.feature_dict(torch.from_numpy(codes.copy())).numpy()
    np.testing.assert_allclose(x, want, atol=2e-4)


def test_sb_metrics_are_saelens_s(world, tmp_path):
    """The `sb_` metrics of a (random, partly matched) SAE on the same tokens and codes equal
    what SAELens's eval_sae_on_synthetic_data reports."""
    from sae_lens import SAE
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    from jaxsae import evaluate, sae
    from jaxsae.config import SAEConfig
    from jaxsae.export import export_sae

    model, arrays, _ = world
    sampler = sb.Sampler(arrays, roots=ROOTS, branching=BRANCHING, max_depth=DEPTH,
                         scale_children=True)
    codes = np.array(sampler.sample(jax.random.key(5), 4096, codes=True)[1])
    with torch.no_grad():  # the tokens as SAELens computes them from the codes
        x = model.feature_dict(torch.from_numpy(codes.copy())).numpy()
    cfg = SAEConfig(d_sae=96, activation="relu", decoder_norm="free")
    params = {k: np.array(v) for k, v in sae.init_params(jax.random.key(0), D, cfg).items()}
    params["W_dec"][:48] = arrays["directions"][:48] * 3  # half the latents on true features
    params["W_enc"][:, :48] = arrays["directions"][:48].T
    params["b_enc"][:] = -2.0
    export_sae(params, cfg, tmp_path / "sae")
    ours = evaluate.GroundTruthSums(params, cfg, arrays["directions"])
    for lo in range(0, 4096, 1024):
        ours.add(x[lo:lo + 1024], jax.numpy.asarray(x[lo:lo + 1024]), codes[lo:lo + 1024])
    got = ours.result()

    class Replay:  # SAELens's evaluation reads its codes from a generator: these ones
        def __init__(self):
            self.at = 0

        def sample(self, n):
            out = torch.from_numpy(codes[self.at:self.at + n])
            self.at += n
            return out

    theirs = eval_sae_on_synthetic_data(SAE.load_from_disk(str(tmp_path / "sae")),
                                        model.feature_dict, Replay(), num_samples=4096,
                                        batch_size=1024).to_dict()
    assert got["sb_f1"] > 0.05  # the test means something: some latents detect features
    for ours_key, key in [("sb_mcc", "mcc"), ("sb_uniqueness", "uniqueness"),
                          ("sb_explained_variance", "explained_variance"),
                          ("sb_shrinkage", "shrinkage"), ("sb_dead_latents", "dead_latents"),
                          ("sb_l0", "sae_l0"), ("sb_true_l0", "true_l0")]:
        assert got[ours_key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key
    for key in ("precision", "recall", "f1_score", "accuracy"):
        ours_key = "sb_f1" if key == "f1_score" else f"sb_{key}"
        assert got[ours_key] == pytest.approx(theirs["classification"][key], rel=1e-4,
                                              abs=1e-5), key
