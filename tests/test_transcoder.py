"""Transcoders: dictionaries from x [d_in] to a paired target y [d_out] (data.target), with
an optional linear bypass (sae.skip). Their SAELens exports are checked against SAELens
itself in tests/interop/test_saelens_interop.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import cli, penalties, sae, tensorfile
from jaxsae.checks import check_run
from jaxsae.commands.eval import Eval
from jaxsae.config import config_from_dict
from jaxsae.data import open_source, synthetic
from jaxsae.data.loader import Loader
from jaxsae.data.shards import ShardWriter
from jaxsae.errors import ConfigError, DataError, ExportError, JaxsaeError
from jaxsae.export import load_sae
from jaxsae.train import train
from tests.conftest import small_config_dict, train_until_crash, xla_flags

D_IN, D_OUT, FEATURES = 16, 24, 40
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """x and y written through two different dictionaries from the same sparse codes, plus a
    dense linear part in y (what a skip transcoder's bypass learns), in 4 shards of 2048."""
    root = tmp_path_factory.mktemp("paired")
    rng = np.random.default_rng(0)
    codes = (rng.random((8192, FEATURES)) < 3 / FEATURES) * rng.uniform(0.5, 2, (8192, FEATURES))
    x = (codes @ rng.standard_normal((FEATURES, D_IN))).astype(np.float32)
    y = codes @ rng.standard_normal((FEATURES, D_OUT))
    y = (y + 0.3 * x @ rng.standard_normal((D_IN, D_OUT))).astype(np.float32)
    for name, array in (("x", x), ("y", y)):
        with ShardWriter(root / name, array.shape[1], shard_tokens=2048) as writer:
            writer.write(array)
    return root


def _config(paired, run_dir, **sae_fields):
    tree = small_config_dict(paired / "x", run_dir, data={"target": str(paired / "y"),
                                                          "eval_tokens": 1024})
    tree["sae"] = {"d_sae": 64, "activation": "relu", "decoder_norm": "free", **sae_fields}
    return tree


def test_paired_source_reads_pairs_and_refuses_unpaired_shards(paired, tmp_path):
    source = open_source(config_from_dict(_config(paired, tmp_path)).data)
    assert (source.d_in, source.d_out, source.width) == (D_IN, D_OUT, D_IN + D_OUT)
    rows = source.read(2000, 2100)  # across a shard boundary
    x, y = (np.load(paired / name / f) for name, f in (("x", "shard-00000.npy"),
                                                       ("y", "shard-00000.npy")))
    np.testing.assert_array_equal(rows[:48, :D_IN], x[2000:2048])
    np.testing.assert_array_equal(rows[:48, D_IN:], y[2000:2048])
    # fewer target rows in one shard: refused naming that shard
    with ShardWriter(tmp_path / "short", D_OUT, shard_tokens=2048) as writer:
        writer.write(np.zeros((2048 * 3 + 1000, D_OUT), np.float32))
    with pytest.raises(DataError, match=r"short/shard-00003\.npy: 1000 rows, but its input"):
        open_source(config_from_dict({**_config(paired, tmp_path),
                                      "data": {"path": str(paired / "x"),
                                               "target": str(tmp_path / "short")}}).data)
    with pytest.raises(DataError, match="target directory does not exist"):
        open_source(config_from_dict({**_config(paired, tmp_path),
                                      "data": {"path": str(paired / "x"),
                                               "target": str(tmp_path / "none")}}).data)


def test_the_loader_keeps_pairs_together(tmp_path):
    """y = 3·x[:, :2] + row index parity: after the shuffle every served row still holds its
    own target."""
    x = np.random.default_rng(1).standard_normal((4096, 4)).astype(np.float32)
    y = 3 * x[:, :2]
    for name, array in (("x", x), ("y", y)):
        with ShardWriter(tmp_path / name, array.shape[1], shard_tokens=1024) as writer:
            writer.write(array)
    source = open_source(config_from_dict({"data": {"path": str(tmp_path / "x"),
                                                    "target": str(tmp_path / "y")}}).data)
    loader = Loader(source, batch_size=256, buffer_tokens=2048, seed=0, lanes=4)
    batches = loader.batches()
    for _ in range(20):
        rows, _ = next(batches)
        assert rows.shape == (256, 6)
        np.testing.assert_array_equal(rows[:, 4:], 3 * rows[:, :2])
    loader.close()


@pytest.mark.parametrize(("fields", "error"), [
    ({"activation": "topk"}, "sae.activation: topk cannot train a transcoder"),
    ({"tied": True}, "sae.tied: a transcoder's encoder"),
    ({"activation": "gated"}, "sae.activation: gated cannot train a transcoder"),
])
def test_what_a_transcoder_cannot_be_is_refused(paired, tmp_path, fields, error):
    with pytest.raises(ConfigError, match=error):
        check_run(config_from_dict(_config(paired, tmp_path, **fields)))


def test_skip_and_transcoder_keys_need_a_target(tmp_path):
    with pytest.raises(ConfigError, match=r"sae\.skip: a bypass from input to target"):
        config_from_dict({"data": {"path": "x"}, "sae": {"skip": True}})
    with pytest.raises(ConfigError, match=r"sae\.transcoder: is set by data\.target"):
        config_from_dict({"data": {"path": "x"}, "sae": {"transcoder": True}})
    with pytest.raises(ConfigError, match=r"data\.target_hook: names a column of data\.target"):
        config_from_dict({"data": {"path": "x", "target_hook": "blocks.0.hook_mlp_out"}})
    cfg = config_from_dict({"data": {"path": "x", "target": "y"}, "sae": {"skip": True}})
    assert cfg.sae.transcoder and config_from_dict(cfg.to_dict()) == cfg  # round trip


@pytest.mark.parametrize("activation", ["batchtopk", "relu"])
def test_transcoder_sparse_path_equals_dense_path(activation):
    """A skip transcoder's sparse BatchTopK path (encoder uncentred, decoder to d_out, bypass
    in every Matryoshka prefix, AuxK against the target's residual) against the dense path:
    loss and every gradient (the ReLU case: dense only, against a hand-written loss)."""
    cfg = config_from_dict({
        "data": {"path": "x", "target": "y"},
        "sae": {"d_sae": 64, "activation": activation, "k": 4, "skip": True,
                "decoder_norm": "free"},
        "loss": [{"term": "matryoshka", "prefixes": [16, 64]},
                 *([{"term": "auxk", "dead_tokens": 1}] if activation != "relu" else [])]})
    key = jax.random.PRNGKey(0)
    params = sae.init_params(key, D_IN, cfg.sae, D_OUT)
    params = {k: v + 0.1 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
              for i, (k, v) in enumerate(params.items())}
    x = jnp.abs(jax.random.normal(jax.random.fold_in(key, 50), (32, D_IN)))
    y = jax.random.normal(jax.random.fold_in(key, 51), (32, D_OUT))
    dead = jnp.where(jnp.arange(64) % 3 == 0, 10, 0)
    ends = penalties.prefix_ends(cfg)

    def loss(p, sparse):
        out = sae.forward(p, x, cfg.sae, train=True, tokens_since_fired=dead,
                          prefix_ends=ends, sparse=sparse, target=y)
        return penalties.total_loss(cfg.loss, out, p, jnp.asarray(0))[0], out

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l_dense, out), g_dense = grad(params, False)
    assert out.x_hat.shape == (32, D_OUT)
    if activation == "relu":  # the model by hand: x uncentred, skip in each prefix's output
        acts = jax.nn.relu(x @ params["W_enc"] + params["b_enc"])
        offset = params["b_dec"] + x @ params["W_skip"].T
        small = acts[:, :16] @ params["W_dec"][:16] + offset
        full = acts @ params["W_dec"] + offset
        want = sum(jnp.mean(jnp.sum(jnp.square(r - y), axis=-1)) for r in (small, full)) / 2
        np.testing.assert_allclose(out.x_hat, full, rtol=1e-5, atol=1e-5)
        assert float(out.acts.astype(bool).sum()) > 0
        np.testing.assert_allclose(l_dense, want, rtol=1e-5)
        return
    (l_sparse, _), g_sparse = grad(params, True)
    np.testing.assert_allclose(l_sparse, l_dense, rtol=1e-5)
    assert float(jnp.abs(g_dense["b_dec"]).sum()) > 0 and float(jnp.abs(g_dense["W_skip"]).sum())
    for name in params:
        np.testing.assert_allclose(g_sparse[name], g_dense[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_skip_transcoder_trains_evaluates_exports_and_resumes_exactly(paired, tmp_path,
                                                                      capsys):
    """A BatchTopK skip transcoder with Matryoshka prefixes and AuxK: trains on the pairs,
    evaluates the target's explained variance on held-out pairs, exports SAELens's
    jumprelu_skip_transcoder layout (which jaxsae eval --target reads back to the same
    figures), and a crashed run resumes to the same weights."""
    def config(name):
        tree = _config(paired, tmp_path / name, activation="batchtopk", k=4, skip=True)
        tree["loss"] = [{"term": "matryoshka", "prefixes": [16, 64]},
                        {"term": "auxk", "coefficient": 1 / 32}]
        return config_from_dict(tree)

    straight = train(config("straight"), progress=False)
    # 24 steps: the target's variance is partly explained already (of y: x has other units)
    assert 0.1 < straight.eval["explained_variance"] < 1
    written = json.loads((straight.sae_dir / "cfg.json").read_text())
    assert written["architecture"] == "jumprelu_skip_transcoder"
    assert (written["d_in"], written["d_out"]) == (D_IN, D_OUT)
    weights = tensorfile.read(straight.sae_dir / "sae_weights.safetensors")
    assert weights["W_skip"].shape == (D_OUT, D_IN) and np.abs(weights["W_skip"]).max() > 0
    # read back: jaxsae eval --target gives the run's own held-out figures
    loaded = load_sae(straight.sae_dir, transcoders=True)
    assert (loaded.d_in, loaded.d_out, loaded.sae.skip) == (D_IN, D_OUT, True)
    args = {"sae_dir": (str(straight.sae_dir),), "data": str(paired / "x"), "tokens": 1024}
    capsys.readouterr()
    Eval(**args, target=str(paired / "y")).run()
    printed = json.loads(capsys.readouterr().out)
    for key in ("explained_variance", "l0", "mse"):
        assert printed[key] == pytest.approx(straight.eval[key], rel=1e-5), key
    with pytest.raises(JaxsaeError, match="is a transcoder: give its targets"):
        Eval(**args).run()
    with pytest.raises(ExportError, match="this reads SAEs, not transcoders"):
        load_sae(straight.sae_dir)  # import, stitch, analyze, eval --model: one line
    capsys.readouterr()
    hub_out = tmp_path / "hub"
    assert cli.main(["export", str(straight.run_dir), "--out", str(hub_out), "--hub"]) == 2
    err = capsys.readouterr().err
    assert "a transcoder run; --hub" in err and ".tmp-" not in err and not hub_out.exists()
    train_until_crash(config("crash"), at_batch=13)  # after the checkpoint of step 8
    resumed = train(config("crash"), progress=False)
    for name, want in weights.items():
        np.testing.assert_array_equal(
            tensorfile.read(resumed.sae_dir / "sae_weights.safetensors")[name], want,
            err_msg=name)


def test_a_sweep_of_transcoders_matches_each_trained_alone(paired, tmp_path):
    """A sweep over k of BatchTopK transcoders (one vmapped step over stacked states, the
    pairs read once) gives each SAE the weights it gets trained alone."""
    tree = _config(paired, tmp_path / "sweep", activation="batchtopk", k=4)
    tree["optim"]["total_tokens"] = 256 * 8
    tree["sweep"] = {"sae.k": [2, 4]}
    result = train(config_from_dict(tree), progress=False)
    for member, k in zip(result.sweep, (2, 4), strict=True):
        alone = _config(paired, tmp_path / f"alone{k}", activation="batchtopk", k=k)
        alone["optim"]["total_tokens"] = 256 * 8
        want = tensorfile.read(train(config_from_dict(alone), progress=False).sae_dir
                               / "sae_weights.safetensors")
        got = tensorfile.read(member.sae_dir / "sae_weights.safetensors")
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"k {k}: {name}")


def test_synth_transcoder_writes_pairs_and_training_reports_both_dictionaries(tmp_path,
                                                                              capsys):
    """data.generate {kind: transcoder} with a hierarchy (16 roots, 2 children each): x =
    codes·input_directions in data.path, y = codes·directions + x·skip in its target/
    (regenerated here from the truth); a run on it reports decoder rows against the output
    dictionary (mcc), encoder columns against the input one (encoder_mcc), and the parents'
    absorption."""
    data = tmp_path / "pairs"
    tree = small_config_dict(data, tmp_path / "run", data={
        "target": str(data / "target"), "eval_tokens": 2048,
        "generate": {"kind": "transcoder", "n_features": 16, "d_in": D_IN, "d_out": D_OUT,
                     "tokens": 16384, "mean_l0": 2.0, "skip": 0.5, "shard_tokens": 4096,
                     "children": 2, "child_prob": 0.3}})
    tree["sae"] = {"d_sae": 64, "activation": "relu", "decoder_norm": "free", "skip": True}
    result = train(config_from_dict(tree), progress=False)
    truth = synthetic.load_truth(data)
    assert truth.directions.shape == (48, D_OUT)
    assert truth.arrays["input_directions"].shape == (48, D_IN)
    np.testing.assert_array_equal(truth.arrays["parent"], [-1] * 16 + list(np.repeat(
        np.arange(16), 2)))
    codes = truth.codes(1000, 1100)
    x = open_source(config_from_dict(tree).data).read(1000, 1100)
    np.testing.assert_allclose(x[:, :D_IN], codes @ truth.arrays["input_directions"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x[:, D_IN:], codes @ truth.directions
                               + x[:, :D_IN] @ truth.arrays["skip"], rtol=1e-5, atol=1e-5)
    for key in ("mcc", "encoder_mcc", "f1", "explained_variance", "parent_recall_alone"):
        assert 0 < result.eval[key] <= 1, key
    capsys.readouterr()
    Eval(sae_dir=(str(result.sae_dir),), data=str(data), target=str(data / "target"),
         truth=str(data), tokens=2048).run()  # the held-out pairs, read back
    printed = json.loads(capsys.readouterr().out)
    for key in ("mcc", "encoder_mcc", "f1", "explained_variance"):
        assert printed[key] == pytest.approx(result.eval[key], rel=1e-5), key
    # targets changed after they were written are refused too, not only the inputs
    last = sorted((data / "target").glob("shard-*.npy"))[-1]
    targets = np.load(last)
    targets[-100:] *= 2
    np.save(last, targets)
    with pytest.raises(DataError, match="token 16,284 is not the one this truth generates"):
        Eval(sae_dir=(str(result.sae_dir),), data=str(data), target=str(data / "target"),
             truth=str(data), tokens=2048).run()


def test_synth_transcoder_hierarchy_codes():
    """Children fire only with their parent, at most one per parent, each with probability
    child_prob given it, at the parent's magnitudes; without children the codes are the
    superposition codes, unchanged by the option."""
    flat = synthetic.TranscoderSpec(n_features=8, d_in=8, d_out=8, mean_l0=4.0, seed=3)
    tree = synthetic.TranscoderSpec(n_features=8, d_in=8, d_out=8, mean_l0=4.0, seed=3,
                                    children=3, child_prob=0.25)
    n = 40000
    roots = flat.codes(flat.truth(), np.random.default_rng(7), n)
    codes = tree.codes(tree.truth(), np.random.default_rng(7), n)
    np.testing.assert_array_equal(codes[:, :8], roots)  # the roots' draws come first
    with pytest.raises(ConfigError, match="child_prob: has no effect without children"):
        synthetic.TranscoderSpec(n_features=8, d_in=8, d_out=8, mean_l0=4.0, child_prob=0.25)
    children = codes[:, 8:].reshape(n, 8, 3)
    on = roots > 0
    assert not (children[~on] > 0).any()  # never without the parent
    assert ((children > 0).sum(axis=2) <= 1).all()  # exclusive
    rate = (children > 0).sum(axis=0) / on.sum(axis=0)[:, None]  # P(child | parent)
    assert np.abs(rate - 0.25).max() < 0.03
    assert children[children > 0].mean() == pytest.approx(1.0, abs=0.01)  # magnitude_mean 1
    with pytest.raises(ConfigError, match="child_prob: must be > 0, and children x"):
        synthetic.TranscoderSpec(children=3, child_prob=0.4)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_folding_the_scales_gives_raw_units(activation):
    """A transcoder trained on s·x -> t·y, folded (sae.fold_input_scale(params, s, t)), maps
    raw x to raw y: the same codes, and outputs 1/t of the trained ones (bypass included)."""
    cfg = config_from_dict({"data": {"path": "x", "target": "y"},
                            "sae": {"d_sae": 32, "activation": activation, "skip": True,
                                    "decoder_norm": "free"}}).sae
    key = jax.random.PRNGKey(4)
    params = sae.init_params(key, D_IN, cfg, D_OUT)
    params = {k: v + 0.2 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
              for i, (k, v) in enumerate(params.items())}
    if "threshold" in params:
        params["threshold"] = jnp.abs(params["threshold"])
    x = jax.random.normal(jax.random.fold_in(key, 9), (20, D_IN))
    s, t = 3.0, 0.25
    folded = sae.fold_input_scale(params, s, t)
    trained_codes = sae.encode(params, s * x, cfg)
    np.testing.assert_allclose(sae.encode(folded, x, cfg), trained_codes, rtol=1e-5, atol=1e-5)
    assert float(jnp.sum(trained_codes > 0)) > 0
    np.testing.assert_allclose(sae.decode(folded, sae.encode(folded, x, cfg), x),
                               sae.decode(params, trained_codes, s * x) / t,
                               rtol=1e-4, atol=1e-4)


def test_normalised_transcoder_trains_on_unit_scales_and_reports_raw_units(paired, tmp_path,
                                                                          capsys):
    """data.normalize with pairs: inputs and targets get scales of their own (E‖x‖² = d_in,
    E‖y‖² = d_out, both logged); the run's evaluation, in raw units after folding, is close to
    an unnormalised run's on targets 30x smaller; the mse logged in training is the
    target's, in its raw units (an mse converted by the input's scale would be ~10^3 off)."""
    with ShardWriter(tmp_path / "y30", D_OUT, shard_tokens=2048) as writer:
        writer.write(30 * open_source(config_from_dict(_config(paired, tmp_path)).data)
                     .read(0, 8192)[:, D_IN:])

    def run(name, normalize, target):
        tree = _config(paired, tmp_path / name, activation="batchtopk", k=4, skip=True)
        tree["data"].update(normalize=normalize, target=str(target))
        tree["optim"]["total_tokens"] = 256 * 40
        return train(config_from_dict(tree), progress=False)

    capsys.readouterr()
    normalised = run("norm", "unit_mean_squared_norm", tmp_path / "y30")
    logged = capsys.readouterr().out
    assert "input scale" in logged and "target scale" in logged
    plain = run("plain", "none", paired / "y")
    assert normalised.eval["explained_variance"] > 0.1
    assert abs(normalised.eval["explained_variance"] - plain.eval["explained_variance"]) < 0.15
    for name, result in (("norm", normalised), ("plain", plain)):
        last = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert 0.5 < last["mse"] / result.eval["mse"] < 2, (name, last["mse"], result.eval)


_MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jaxsae.build import build
from jaxsae.config import config_from_dict

def run(mesh, devices, dtype):
    cfg = config_from_dict({
        "data": {"path": "x", "target": "y"},
        "sae": {"d_sae": 64, "activation": "batchtopk", "k": 4, "skip": True},
        "loss": [{"term": "matryoshka", "prefixes": [16, 64]}, {"term": "auxk"}],
        "optim": {"lr": 1e-2, "batch_size": 64, "total_tokens": 6400, "warmup_steps": 1,
                  "compute_dtype": dtype},
        "mesh": mesh})
    built = build(cfg, 16, devices, d_out=24)
    state = built.init()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(5):
        pairs = rng.standard_normal((64, 40)).astype(np.float32)
        state, metrics = built.step(state, jax.device_put(pairs, built.batch_sharding))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses

ref, ref_losses = run({"data": 1, "model": 1}, jax.devices()[:1], "float32")
out = {}
for name, mesh, dtype in (("2x4", {"data": 2, "model": 4}, "float32"),
                          ("bf16", {"data": 1, "model": 1}, "bfloat16")):
    got, losses = run(mesh, jax.devices()[:mesh["data"] * mesh["model"]], dtype)
    out[name] = {"param_diff": max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref),
                 "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))}
print(json.dumps(out))
"""


def test_transcoder_on_a_mesh_and_in_bfloat16():
    """A skip BatchTopK transcoder (Matryoshka, AuxK) stepped on a 2x4 mesh (pairs split over
    data, the dictionary over model; W_skip replicated) matches one device; in bf16 compute it
    tracks float32."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["2x4"]["param_diff"] < 1e-5 and result["2x4"]["loss_rel_diff"] < 1e-5
    assert result["bf16"]["loss_rel_diff"] < 0.03


def test_what_a_transcoder_is_paired_with_is_checked(paired, small_data, tmp_path, capsys):
    """(fault testing: data.target = data.path, or a directory of links to its shards, trained
    a transcoder of x to x; on data whose truth is not a transcoder's, training ended in a
    traceback, on every rerun; a target moved on resume went unsaid, as a moved data.path
    does not)"""
    import dataclasses
    import shutil

    from conftest import SMALL_SPEC

    from jaxsae.config import DataConfig
    from jaxsae.data.synthetic import generate_superposition
    from jaxsae.finish import ground_truth

    with pytest.raises(DataError, match=r"data.target .*: is data.path; a transcoder maps"):
        open_source(DataConfig(path=str(paired / "x"), target=str(paired / "x")))
    links = tmp_path / "links"  # (the inputs' shards again, under other names)
    links.mkdir()
    shutil.copy(paired / "x" / "manifest.json", links)
    for shard in sorted((paired / "x").glob("shard-*")):
        (links / shard.name).symlink_to(shard)
    with pytest.raises(DataError, match=r"links/shard-00000\.npy: the same file as data\.path's"):
        open_source(DataConfig(path=str(paired / "x"), target=str(links)))
    other = generate_superposition(dataclasses.replace(SMALL_SPEC, seed=4), tmp_path / "other",
                                   progress=False)
    cfg = config_from_dict(small_config_dict(small_data, tmp_path / "run",
                                             data={"target": str(other)}))
    said = []
    assert ground_truth(cfg, open_source(cfg.data), said.append) is None
    assert said == [f"note: the truth in {small_data} is a superposition generator's, not a "
                    "transcoder's (no targets in it): no ground-truth metrics"]
    # a resume refused is its one line, the note not said before it (fault testing)
    plain = small_config_dict(small_data, tmp_path / "plain")
    train(config_from_dict(plain), progress=False, log=lambda m: None)
    plain["data"]["target"] = str(other)
    said.clear()
    with pytest.raises(JaxsaeError, match=r"cannot resume with a changed sae\.transcoder"):
        train(config_from_dict(plain), progress=False, log=said.append)
    assert said == []
    run = _config(paired, tmp_path / "tc")
    train(config_from_dict(run), progress=False, log=lambda m: None)
    moved = Path(shutil.copytree(paired / "y", tmp_path / "y-moved"))
    run["data"]["target"] = str(moved)
    run["optim"]["total_tokens"] *= 2
    logged = []
    train(config_from_dict(run), progress=False, log=logged.append)
    assert any(line.startswith(f"data.target: {moved}, where the checkpoint trained on "
                               f"{paired / 'y'}") for line in logged)
