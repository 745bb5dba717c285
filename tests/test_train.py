"""The training run in-process: outputs, exact resume, non-finite handling, one compile."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsae import build as build_mod
from jaxsae import cli, evaluate, finish, penalties, step, tensorfile
from jaxsae import train as train_mod
from jaxsae.checkpoint import Checkpointer
from jaxsae.checks import check_run
from jaxsae.config import CheckpointConfig, DataConfig, config_from_dict, load_config
from jaxsae.data import open_source
from jaxsae.errors import ConfigError, DataError, JaxsaeError, NonFiniteError
from jaxsae.export import load_sae
from jaxsae.hooks import LoopHook
from tests.conftest import (
    SMALL_SPEC,
    logging_to,
    small_config,
    small_config_dict,
    train_until_crash,
)


def _weights(run_dir):
    return {k: np.asarray(v) for k, v in tensorfile.read(run_dir / "sae" /
                                                          "sae_weights.safetensors").items()}


class Recorder(LoopHook):
    """Everything the loop tells a hook."""

    def __init__(self):
        self.steps, self.logged, self.checkpoints, self.closed = [], [], [], 0

    def on_step(self, done):
        self.steps.append(done)

    def on_log(self, done, lines):
        self.logged.append((done, lines))

    def on_checkpoint(self, step):
        self.checkpoints.append(step)

    def close(self):
        self.closed += 1


def test_run_directory_contract(small_data, tmp_path):
    cfg = small_config(small_data, tmp_path / "run", log={"every_steps": 4, "curves": True})
    hook = Recorder()
    result = train_mod.train(cfg, progress=False, hooks=[hook])
    run = tmp_path / "run"
    # A hook sees what metrics.jsonl holds, every step, and every checkpoint.
    written = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [done for done, _ in hook.logged] == [line["step"] for line in written]
    for (_, lines), line in zip(hook.logged, written, strict=True):
        assert len(lines) == 1 and lines[0].keys() == line.keys()
        assert lines[0]["loss"] == pytest.approx(line["loss"], rel=1e-6)
    assert hook.steps == list(range(1, 25))
    assert hook.checkpoints == [8, 16, 24] and hook.closed == 1
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.run_dir == run.absolute()
    assert load_config(run / "config.yaml") == cfg
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 8, 12, 16, 20, 24]
    for key in ("step", "tokens", "tokens_per_s", "loss", "loss.mse", "loss.l1", "l0", "mse",
                "explained_variance", "dead_fraction", "lr"):
        assert key in lines[-1], key
    assert lines[-1]["tokens"] == 24 * 256
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["mse"] == pytest.approx(lines[-1]["loss.mse"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "16", "24", "8"]
    loaded = load_sae(run / "sae")
    assert loaded.params["W_dec"].shape == (64, 16)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["tokens"] == 2048 and ev["held_out"] is True
    assert ev == result.eval


def test_resume_after_crash_is_exact(small_data, tmp_path, monkeypatch):
    """A run that dies at step 13 and is restarted ends bit-identical to an uninterrupted one."""
    straight = small_config(small_data, tmp_path / "straight")
    train_mod.train(straight, progress=False)

    crashed = small_config(small_data, tmp_path / "crashed")
    train_until_crash(crashed, 13)
    ckpt = Checkpointer(tmp_path / "crashed" / "checkpoints", CheckpointConfig())
    assert ckpt.latest_step() == 8
    ckpt.close()

    train_mod.train(crashed, progress=False)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "crashed")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    steps = [json.loads(x)["step"] for x in
             (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]  # lines after the checkpoint were rewritten once


def test_resume_refuses_data_replaced_by_data_of_the_same_size(small_data, tmp_path):
    """A shard replaced by one of the same size (other values) is refused on resume, naming
    the data, and the checkpoints stay; the same data moved elsewhere resumes."""
    from jaxsae.data.shards import ShardSet
    from jaxsae.data.source import fingerprint

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    crashed = small_config(data, tmp_path / "run")
    train_until_crash(crashed, 13)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())

    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert fingerprint(ShardSet(moved)) == fingerprint(ShardSet(data))
    from jaxsae.data.shards import ShardWriter  # the same tokens split into other files
    with ShardWriter(tmp_path / "resplit", 16, shard_tokens=3000) as writer:
        writer.write(ShardSet(data).read(0, ShardSet(data).n_tokens))
    assert fingerprint(ShardSet(tmp_path / "resplit")) == fingerprint(ShardSet(data))
    shard = sorted(data.glob("shard-*"))[1]
    x = np.load(shard)
    np.save(shard, x[::-1].copy())  # the same rows in another order: same size, same stats
    assert fingerprint(ShardSet(data)) != fingerprint(ShardSet(moved))
    with pytest.raises(DataError, match=r"data: holds other values than the data the "
                                        r"checkpoint .* trained on"):
        train_mod.train(crashed, progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    result = train_mod.train(dataclasses.replace(
        crashed, data=dataclasses.replace(crashed.data, path=str(moved))), progress=False)
    assert result.step == 24


def test_a_checkpoint_without_a_fingerprint_resumes_saying_the_data_is_unchecked(
        small_data, tmp_path, monkeypatch, capsys):
    """(fault testing: a run started by a jaxsae before the fingerprint resumed on replaced
    data without a word) A checkpoint that keeps no fingerprint (as before 2026-12-06)
    resumes, with a note that its data cannot be checked; one that keeps it, without."""
    crashed = small_config(small_data, tmp_path / "run")
    monkeypatch.setattr(train_mod, "fingerprint", lambda source: None)  # kept none
    train_until_crash(crashed, 13)
    monkeypatch.undo()
    train_until_crash(crashed, 10)  # resumes from step 8, then keeps one at step 16
    assert "kept no fingerprint of its data (before 2026-12-06)" in capsys.readouterr().out
    assert train_mod.train(crashed, progress=False).step == 24
    assert "fingerprint" not in capsys.readouterr().out


@pytest.fixture
def nan_term():
    @penalties.register("test_nan_after")
    def nan_after(out, params, *, step, after: int = 10):
        """NaN from step `after` on (for testing the non-finite guard)."""
        return jnp.where(step >= after, jnp.nan, 0.0), {}

    yield nan_after
    del penalties._REGISTRY["test_nan_after"]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(small_data, tmp_path, nan_term):
    tree = small_config_dict(small_data, tmp_path / "run")
    tree["loss"].append({"term": "test_nan_after", "after": 10})
    with pytest.raises(NonFiniteError, match=r"step 11 .*test_nan_after"):
        train_mod.train(config_from_dict(tree), progress=False)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", CheckpointConfig())
    assert ckpt.manager.all_steps() == [8]
    ckpt.close()
    assert not (tmp_path / "run" / "sae").exists()


@pytest.fixture
def nan_steps_term():
    @penalties.register("test_nan_at")
    def nan_at(out, params, *, step, first: int = 10, last: int = 11):
        """NaN at steps first..last (for testing optim.skip_nonfinite)."""
        return jnp.where((step >= first) & (step <= last), jnp.nan, 0.0), {}

    yield nan_at
    del penalties._REGISTRY["test_nan_at"]


def test_skip_nonfinite_counts_and_continues(small_data, tmp_path, nan_steps_term):
    tree = small_config_dict(small_data, tmp_path / "run")
    tree["loss"].append({"term": "test_nan_at", "first": 10, "last": 11})
    tree["optim"]["skip_nonfinite"] = True
    result = train_mod.train(config_from_dict(tree), progress=False)
    assert result.step == 24 and result.skipped_steps == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped_steps"] for x in lines] == [0, 0, 2, 2, 2, 2]
    for name, value in _weights(tmp_path / "run").items():
        assert np.isfinite(value).all(), name
    assert lines[2]["loss"] is None  # step 12's line: written as null, not NaN
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_after_skipped_steps_the_rate_applied_is_the_one_logged(small_data, tmp_path,
                                                                nan_steps_term):
    """(fault testing: skipped steps left the schedule's position behind the step, so a run
    with many skips logged a decay to 0 while it trained at the peak rate.) The rate Adam
    applies at a step, read back from the update and Adam's moments, is the logged `lr`."""
    tree = small_config_dict(small_data, tmp_path / "run")
    tree["loss"] = [{"term": "mse"}, {"term": "test_nan_at", "first": 2, "last": 5}]
    tree["optim"].update(skip_nonfinite=True, warmup_steps=0, decay_fraction=1.0,
                         total_tokens=256 * 10, grad_clip=0.0)
    cfg = config_from_dict(tree)
    built = build_mod.build(cfg, 16)
    state = built.init()
    batch = np.abs(np.random.default_rng(0).standard_normal((256, 16))).astype(np.float32)
    for _ in range(8):
        before = np.array(state.params["W_enc"])  # (the step donates the state's buffers)
        state, metrics = built.step(state, batch)
    assert int(metrics["skipped_steps"]) == 4
    adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(
        s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState))
    n = int(adam.count)  # 4 updates applied (steps 0, 1, 6, 7)
    mu = np.asarray(adam.mu["W_enc"]) / (1 - cfg.optim.adam_b1 ** n)
    nu = np.asarray(adam.nu["W_enc"]) / (1 - cfg.optim.adam_b2 ** n)
    direction = mu / (np.sqrt(nu) + 1e-8)
    delta = np.asarray(state.params["W_enc"]) - before
    applied = -float(np.sum(delta * direction) / np.sum(direction * direction))
    assert n == 4 and float(metrics["lr"]) == pytest.approx(cfg.optim.lr * 3 / 10, rel=1e-6)
    assert applied == pytest.approx(float(metrics["lr"]), rel=1e-3)


def test_checkpoint_every_minutes(small_data, tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("jaxsae.checkpoint.time.monotonic", lambda: clock[0])
    ckpt = Checkpointer(tmp_path / "ck", CheckpointConfig(every_steps=None, every_minutes=2.0))
    assert not ckpt.due(1)
    clock[0] = 119.0
    assert not ckpt.due(2)
    clock[0] = 121.0
    assert ckpt.due(3)
    ckpt.close()
    both = Checkpointer(tmp_path / "ck2", CheckpointConfig(every_steps=5, every_minutes=2.0))
    assert both.due(5) and not both.due(6)
    clock[0] = 300.0
    assert both.due(7)
    both.close()
    with pytest.raises(JaxsaeError, match="every_steps, every_minutes"):
        small_config(small_data, tmp_path / "r", checkpoint={"every_steps": None})


def test_train_step_compiles_once(small_data, tmp_path, monkeypatch):
    traces = []
    real = step.make_train_step

    def counting(cfg, *args):
        inner = real(cfg, *args)

        def traced(state, batch, hyper):
            traces.append(1)
            return inner(state, batch, hyper)

        return traced

    monkeypatch.setattr(build_mod, "make_train_step", counting)
    train_mod.train(small_config(small_data, tmp_path / "run"), progress=False)
    assert len(traces) == 1


@pytest.mark.parametrize(
    ("sae_cfg", "loss"),
    [
        ({"activation": "topk", "k": 4}, [{"term": "mse"}, {"term": "auxk", "dead_tokens": 512}]),
        ({"activation": "batchtopk", "k": 4}, [{"term": "mse"}, {"term": "auxk"}]),
        ({"activation": "jumprelu", "jumprelu_bandwidth": 0.05},
         [{"term": "mse"}, {"term": "l0", "coefficient": 0.01, "bandwidth": 0.05}]),
        ({"activation": "relu", "tied": True, "decoder_norm": "unit"},
         [{"term": "mse"}, {"term": "l1", "coefficient": 0.1}]),
        ({"activation": "topk", "k": 4, "tied": True}, [{"term": "mse"}]),
    ],
    ids=["topk-auxk", "batchtopk", "jumprelu-l0", "tied-relu-unit", "tied-topk"],
)
def test_every_activation_trains_and_exports(small_data, tmp_path, sae_cfg, loss):
    cfg = small_config(small_data, tmp_path / "run", sae=sae_cfg, loss=loss)
    result = train_mod.train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert result.eval["explained_variance"] > 0.0
    loaded = load_sae(result.sae_dir)
    if cfg.sae.activation == "topk":
        assert 0 < result.eval["l0"] <= 4
    if cfg.sae.activation == "batchtopk":  # batch*k codes per batch in training
        assert lines[-1]["l0"] == pytest.approx(4.0)
    if cfg.sae.decoder_norm == "unit":
        norms = np.linalg.norm(loaded.params["W_dec"], axis=1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    if cfg.sae.tied:
        np.testing.assert_array_equal(loaded.params["W_enc"], loaded.params["W_dec"].T)


@pytest.mark.parametrize("normalize", ["none", "unit_mean_squared_norm"])
def test_init_l0_reads_the_norm_of_the_inputs_the_encoder_sees(small_data, tmp_path,
                                                               monkeypatch, normalize):
    """`sae.init_l0` sets the encoder bias from the median norm of the tokens as the SAE reads
    them: the raw ones, or those scaled to E|x|^2 = d_in."""
    from jaxsae import sae
    from jaxsae.data.shards import ShardSet

    seen, init = [], sae.init_params

    def watched(key, d_in, cfg, d_out=None, input_norm=None):
        seen.append(input_norm)
        return init(key, d_in, cfg, d_out, input_norm)
    monkeypatch.setattr(step.sae, "init_params", watched)
    cfg = small_config(small_data, tmp_path / normalize, data={"normalize": normalize},
                       sae={"decoder_norm": "unit", "init_l0": "auto"},
                       optim={"total_tokens": 256 * 2})
    result = train_mod.train(cfg, progress=False)
    tokens = ShardSet(small_data).read(0, 16384)
    norms = np.linalg.norm(tokens, axis=1)
    scale = 1.0 if normalize == "none" else np.sqrt(tokens.shape[1] / np.mean(norms**2))
    want = float(np.median(norms)) * scale
    assert seen and all(n == pytest.approx(want, rel=0.05) for n in seen)
    assert load_config(result.run_dir / "config.yaml").sae.init_l0 == "auto"


def test_lr_schedule_shape():
    cfg = config_from_dict({"data": {"path": "x", "lanes": 1}, "optim": {
        "lr": 1.0, "batch_size": 1, "total_tokens": 100, "warmup_steps": 10,
        "decay_fraction": 0.2}})
    lr = step.lr_schedule(cfg.optim)
    values = np.array([float(lr(s)) for s in range(100)])
    np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10, rtol=1e-6)
    assert (values[10:80] == 1.0).all()
    np.testing.assert_allclose(values[80:], (100 - np.arange(80, 100)) / 20, rtol=1e-6)
    cosine = step.lr_schedule(dataclasses.replace(cfg.optim, decay_shape="cosine"))
    values = np.array([float(cosine(s)) for s in range(80, 100)])
    np.testing.assert_allclose(values, 0.5 * (1 + np.cos(np.pi * np.arange(20) / 20)),
                               rtol=1e-5, atol=1e-7)
    constant = step.lr_schedule(dataclasses.replace(cfg.optim, decay_fraction=0.0))
    assert float(constant(99)) == 1.0


def test_missing_data_and_too_few_tokens(small_data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train_mod.train(small_config(tmp_path / "nope", tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()  # the run directory it made is not left behind
    cfg = small_config(small_data, tmp_path / "run", data={"eval_tokens": 16384})
    with pytest.raises(DataError, match="eval_tokens"):
        train_mod.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # the user's (empty) directory: not this call's to remove
    with pytest.raises(DataError, match="eval_tokens"):
        train_mod.train(cfg, progress=False)
    assert (tmp_path / "run").is_dir()


@pytest.mark.parametrize("garble", ["bad json", "not utf-8", "other width"])
def test_a_bad_truth_is_refused_before_training(small_data, tmp_path, garble):
    """The ground truth beside the data is read before the first step, not after the last
    (fault testing: a broken truth.json failed every rerun once training had ended)."""
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    if garble == "bad json":
        (data / "truth.json").write_text('{"generator": ')
    elif garble == "not utf-8":
        (data / "truth.json").write_bytes(b"\xff\xfe{}")
    else:
        arrays = tensorfile.read(data / "truth.safetensors")
        arrays["directions"] = np.zeros((48, 24), np.float32)
        (data / "truth.safetensors").unlink()
        tensorfile.write(data / "truth.safetensors", arrays)

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    with pytest.raises(DataError, match="truth"):
        train_mod.train(small_config(data, tmp_path / "run"), progress=False,
                        make_loader=no_training)


def test_data_generated_otherwise_than_data_generate_says_is_refused(small_data, tmp_path):
    """data.generate asks for other data than data.path holds: training on it would report
    results about other data than the config (and the run's config.yaml) says."""
    from jaxsae.config import DataConfig
    from jaxsae.data import open_source, synthetic
    from tests.conftest import SMALL_SPEC

    same = {**dataclasses.asdict(SMALL_SPEC), "kind": "superposition"}
    source = open_source(DataConfig(path=str(small_data)))
    synthetic.check_generated(source, same, small_data)  # what wrote it: accepted
    synthetic.check_generated(source, {**same, "tokens": 4096}, small_data)  # a prefix of it
    # other shard files of the same tokens
    halves = synthetic.write(dataclasses.replace(SMALL_SPEC, shard_tokens=2048),
                             tmp_path / "halves", progress=False)
    np.testing.assert_array_equal(
        open_source(DataConfig(path=str(halves))).read(0, SMALL_SPEC.tokens),
        source.read(0, SMALL_SPEC.tokens))
    synthetic.check_generated(source, {**same, "shard_tokens": 2048}, small_data)
    asked = {**same, "d_in": 32}
    with pytest.raises(DataError, match="other d_in"):
        train_mod.train(small_config(small_data, tmp_path / "run", data={"generate": asked}),
                        progress=False)


def test_data_generate_too_small_for_a_batch_is_refused_before_it_is_written(tmp_path):
    """(fault testing: data.generate.tokens 100 with eval_tokens 2048 wrote data.path, then
    refused the run; the directory left behind refused the corrected config too, as holding
    100 tokens.) The size is refused naming data.generate.tokens, and nothing is written, by
    train and by check_start (the bench's check of its arms)."""
    cfg = small_config(tmp_path / "data", tmp_path / "run", data={
        "generate": {"kind": "hierarchy_small", "tokens": 100}})
    for call in (train_mod.check_start, lambda c: train_mod.train(c, progress=False)):
        with pytest.raises(DataError, match=r"^data\.generate\.tokens: 100 tokens leave 0 "):
            call(cfg)
        assert not list(tmp_path.iterdir())


def test_resume_refuses_an_end_before_what_was_trained(small_data, tmp_path):
    """(fault testing: a shorter optim.total_tokens on resume exported the step-24 weights
    labelled as 8 steps and 2048 tokens)"""
    train_mod.train(small_config(small_data, tmp_path / "run"), progress=False)
    before = (tmp_path / "run" / "sae" / "cfg.json").read_text()
    shorter = small_config(small_data, tmp_path / "run", optim={"total_tokens": 256 * 8})
    with pytest.raises(ConfigError, match="less than the 24 steps"):
        train_mod.train(shorter, progress=False)
    assert (tmp_path / "run" / "sae" / "cfg.json").read_text() == before
    # a run whose `auto` ramp was longer than the new end (fault testing: refused for
    # loss.l1.warmup_steps, a key left to auto, and then for changing it as told): the
    # configs compare equal, and the end is what the resume speaks of
    from jaxsae.checkpoint import check_resume_compatible

    loss = [{"term": "mse"}, {"term": "l1", "coefficient": 0.1, "warmup_steps": "auto"}]
    longer, shorter = (small_config(small_data, tmp_path / "run", loss=loss,
                                    optim={"total_tokens": 256 * steps}) for steps in (400, 8))
    assert longer.loss[1].ramp(longer.optim.total_steps) == 20 > shorter.optim.total_steps
    assert shorter.ramped_for(400).loss[1].warmup_steps == 20
    check_resume_compatible(longer, shorter, tmp_path / "run")


def test_resume_refuses_changed_config(small_data, tmp_path):
    train_mod.train(small_config(small_data, tmp_path / "run"), progress=False)
    changed = small_config(small_data, tmp_path / "run", sae={"d_sae": 32})
    with pytest.raises(JaxsaeError, match=r"a changed sae\.d_sae \(64 in the checkpoint, 32 "
                                          r"now\); restore it, or"):
        train_mod.train(changed, progress=False)
    # a sweep point's keys hold dots (fault testing: both values read None), and a line
    # names three changes at most (it grew with every SAE)
    from jaxsae.checkpoint import check_resume_compatible
    from jaxsae.config import load_config

    def swept(*overrides):  # (each key once: an override given twice is refused)
        given = {o.split("=")[0]: o for o in (
            "data.path=/d", "sae.activation=topk", "sweep.sae.k=[4,8]",
            "sweep.optim.lr=[0.1]", *overrides)}
        return load_config(None, list(given.values()))

    with pytest.raises(JaxsaeError, match=r"a changed sae\.k of sweep SAE 1 \(8 in the "
                                          r"checkpoint, 16 now\); restore"):
        check_resume_compatible(swept(), swept("sweep.sae.k=[4,16]"), tmp_path)
    with pytest.raises(JaxsaeError, match=r"optim\.lr of sweep SAE 0 \(0\.1 in the checkpoint, "
                                          r"0\.2 now\) and 2 more; restore"):
        check_resume_compatible(swept(), swept("sweep.sae.k=[5,16]", "sweep.optim.lr=[0.2]",
                                               "seed=3"), tmp_path)
    # data.lanes left to auto follows the batch size: only the batch is named (fault
    # testing: the lanes read as a second setting to restore); set by hand, it is named
    with pytest.raises(JaxsaeError, match=r"a changed optim\.batch_size \(8 in the checkpoint, "
                                          r"4 now\); restore it,"):
        check_resume_compatible(swept("optim.batch_size=8"), swept("optim.batch_size=4"),
                                tmp_path)
    with pytest.raises(JaxsaeError, match=r"data\.lanes \(8 in the checkpoint, 4 now\), "
                                          r"optim\.batch_size \(8 in the checkpoint, 4 now\)"):
        check_resume_compatible(swept("optim.batch_size=8"),
                                swept("optim.batch_size=4", "data.lanes=4"), tmp_path)
    # lists: what differs in them (fault testing: both cut to the same 57 characters)
    with pytest.raises(JaxsaeError, match=r"a changed sweep \(2 entries in the checkpoint, 3 "
                                          r"entries now\)"):
        check_resume_compatible(swept(), swept("sweep.sae.k=[4,8,16]"), tmp_path)
    # the same points, a term by its name or by its position: the same sweep (fault testing)
    named = ["loss=[{term: mse}, {term: l1, coefficient: 0.1}]"]
    check_resume_compatible(swept(*named, "sweep.loss.1.coefficient=[0.1, 0.3]"),
                            swept(*named, "sweep.loss.l1.coefficient=[0.1, 0.3]"), tmp_path)
    with pytest.raises(JaxsaeError, match=r"a changed loss\.1\.coefficient of sweep SAE 1 "
                                          r"\(0\.3 in the checkpoint, 0\.4 now\)"):
        check_resume_compatible(swept(*named, "sweep.loss.1.coefficient=[0.1, 0.3]"),
                                swept(*named, "sweep.loss.l1.coefficient=[0.1, 0.4]"), tmp_path)
    longer = ["loss=[{term: mse}, {term: l1, coefficient: 0.1}, {term: l1, name: b}]"]
    with pytest.raises(JaxsaeError, match=r"a changed loss \(1 entry in the checkpoint, 3 "):
        check_resume_compatible(swept(), swept(*longer), tmp_path)
    # values as YAML spells them (fault testing: None, Python dicts)
    with pytest.raises(JaxsaeError, match=r", sweep \(null in the checkpoint, "
                                          r"\[\{\"sae\.k\": 4, \"optim\.lr\": 0\.1\}, "):
        check_resume_compatible(load_config(None, ["data.path=/d", "sae.decoder_norm=unit",
                                                   "loss=[{term: mse}]"]), swept(), tmp_path)
    prefixes = "loss=[{term: matryoshka, prefixes: [%s]}]"
    with pytest.raises(JaxsaeError, match=r"a changed loss\.0\.prefixes \(\[30\] 62 in the "
                                          r"checkpoint, \[30\] 63 now\)"):
        check_resume_compatible(
            swept(prefixes % ", ".join(map(str, range(2, 65, 2)))),
            swept(prefixes % ", ".join(map(str, [*range(2, 62, 2), 63, 64]))), tmp_path)
    # Logging and checkpoint cadence may change: the finished run just re-exports.
    relogged = small_config(small_data, tmp_path / "run", log={"every_steps": 2})
    assert train_mod.train(relogged, progress=False).step == 24


def test_resume_refuses_data_of_another_width(small_data, tmp_path):
    from jaxsae.data.synthetic import SuperpositionSpec, generate_superposition

    cfg = small_config(small_data, tmp_path / "run")
    train_mod.train(cfg, progress=False)
    wider = generate_superposition(SuperpositionSpec(n_features=48, d_in=24, tokens=16384),
                                   tmp_path / "wider", progress=False)
    with pytest.raises(DataError, match=r"d_in is 24 .* d_in 16"):
        train_mod.train(small_config(wider, tmp_path / "run"), progress=False)


def test_half_written_checkpoint_is_never_resumed_from(small_data, tmp_path):
    from orbax.checkpoint._src.path.atomicity import TMP_DIR_SUFFIX

    train_mod.train(small_config(small_data, tmp_path / "run"), progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    # A save of step 32 that was killed before its rename, and stray files of a later one.
    shutil.copytree(ckpts / "24", ckpts / f"32{TMP_DIR_SUFFIX}")
    (ckpts / "40").mkdir()
    ckpt = Checkpointer(ckpts, CheckpointConfig())
    assert ckpt.latest_step() == 24
    assert ckpt.set_aside == [ckpts / "32.incomplete", ckpts / "40.incomplete"]
    ckpt.close()
    longer = small_config(small_data, tmp_path / "run", optim={"total_tokens": 256 * 48})
    said = []
    result = train_mod.train(longer, progress=False, log=said.append)  # resumes at 24, saves
    assert result.step == 48                                           # 32 over the debris
    # the learning rate had decayed to nearly 0 by step 24: the longer schedule raises it again
    assert any(line.startswith("optim.total_tokens: 12,288, where the checkpoint's run had "
                               "6,144: the learning rate's decay follows the new length from "
                               "step 24 on") for line in said), said
    ckpt = Checkpointer(ckpts, CheckpointConfig())
    assert ckpt.latest_step() == 48 and 32 in ckpt.manager.all_steps()
    ckpt.close()


def test_export_checkpoint_matches_final_export(small_data, tmp_path, capsys):
    train_mod.train(small_config(small_data, tmp_path / "run"), progress=False)
    out = finish.export_checkpoint(tmp_path / "run", tmp_path / "exported")
    a, b = _weights(tmp_path / "run"), {
        k: np.asarray(v) for k, v in tensorfile.read(out / "sae_weights.safetensors").items()}
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    out16 = finish.export_checkpoint(tmp_path / "run", tmp_path / "e16", step=16,
                                        dtype="bfloat16")
    written = json.loads((out16 / "cfg.json").read_text())
    assert written["dtype"] == "bfloat16"
    # the counts of step 16, not of the run's end (24 steps of 256 tokens)
    assert written["metadata"]["training_tokens"] == 16 * 256
    assert (written["jaxsae"]["steps"], written["jaxsae"]["tokens"]) == (16, 16 * 256)
    final = json.loads((out / "cfg.json").read_text())
    assert (final["jaxsae"]["steps"], final["metadata"]["training_tokens"]) == (24, 24 * 256)
    # where its training tokens end in the data (the last eval_tokens 2048 held out), so that
    # an evaluation on that data can say how many of its tokens were trained on
    held = small_config(small_data, tmp_path).data.held_out(SMALL_SPEC.tokens)
    assert final["jaxsae"]["held_out_from"] == SMALL_SPEC.tokens - held == written[
        "jaxsae"]["held_out_from"]
    capsys.readouterr()
    for tokens, trained in [(held, 0), (held + 1000, 1000)]:
        assert cli.main(["eval", str(out), "--data", str(small_data), "--tokens",
                         str(tokens)]) == 0
        printed = capsys.readouterr()
        ev = json.loads(printed.out)
        assert (ev["training_tokens"], ev["held_out_tokens"]) == (trained, held)
        assert ("note: 1,000 of the tokens evaluated are tokens the SAE was trained on, not "
                f"held out; its held-out tokens are the last {held:,} of {small_data} "
                f"(--tokens {held})" in printed.err) == (trained > 0)
    # the bfloat16 export's evaluation is of the weights it holds, not of the float32 ones
    meta = written["metadata"]
    assert meta["eval_held_out"]
    n = SMALL_SPEC.tokens
    x = open_source(DataConfig(path=str(small_data))).read(n - meta["eval_tokens"], n)
    ev = {}
    for name, path in [("bfloat16", out16), ("float32", finish.export_checkpoint(
            tmp_path / "run", tmp_path / "e32", step=16))]:
        loaded = load_sae(path)
        ev[name] = evaluate.reconstruction_metrics(loaded.params, loaded.sae, [x])
    assert meta["eval_explained_variance"] == pytest.approx(
        ev["bfloat16"]["explained_variance"], abs=1e-6)
    assert meta["eval_explained_variance"] != pytest.approx(
        ev["float32"]["explained_variance"], abs=1e-5)
    with pytest.raises(JaxsaeError, match="--step 5"):
        finish.export_checkpoint(tmp_path / "run", tmp_path / "e5", step=5)



def test_bfloat16_compute_tracks_float32(small_data, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = small_config(small_data, tmp_path / dtype, optim={"compute_dtype": dtype})
        result = train_mod.train(cfg, progress=False)
        lines = [json.loads(x) for x in (tmp_path / dtype / "metrics.jsonl").read_text()
                 .splitlines()]
        runs[dtype] = (np.array([x["loss"] for x in lines]), result.eval)
        state_dtypes = {v.dtype for v in _weights(tmp_path / dtype).values()}
        assert state_dtypes == {np.dtype(np.float32)}  # master parameters stay float32
    (f32, ev32), (bf16, ev16) = runs["float32"], runs["bfloat16"]
    np.testing.assert_allclose(bf16, f32, rtol=0.03)
    assert abs(ev16["explained_variance"] - ev32["explained_variance"]) < 0.02
    # ... and the step's matmuls really run in bfloat16.
    cfg = small_config(small_data, tmp_path / "x", optim={"compute_dtype": "bfloat16"})
    built = build_mod.build(cfg, 16)
    state = jax.eval_shape(built.init)
    hlo = built.step.lower(state, jax.ShapeDtypeStruct((256, 16), np.float32)).as_text()
    assert re.search(r"dot_general[^\n]*bf16", hlo), "no bfloat16 matmul in the step"


def test_freeze_leaves_those_parameters_as_they_were(small_data, tmp_path):
    """freeze: [W_enc, b_enc, b_dec] with init_from retrains only W_dec (stitch frankenstein)."""
    first = small_config(small_data, tmp_path / "first")
    train_mod.train(first, progress=False)
    start = _weights(tmp_path / "first")
    tree = small_config_dict(small_data, tmp_path / "second", loss=[{"term": "mse"}])
    cfg = config_from_dict({**tree, "init_from": str(tmp_path / "first" / "sae"),
                            "freeze": ["W_enc", "b_enc", "b_dec"]})
    train_mod.train(cfg, progress=False)
    end = _weights(tmp_path / "second")
    for name in ("W_enc", "b_enc", "b_dec"):
        np.testing.assert_array_equal(end[name], start[name], err_msg=name)
    assert not np.allclose(end["W_dec"], start["W_dec"])
    # The same step with nothing frozen moves every parameter.
    train_mod.train(config_from_dict({**tree, "run_dir": str(tmp_path / "third"),
                                      "init_from": str(tmp_path / "first" / "sae")}),
                    progress=False)
    moved = _weights(tmp_path / "third")
    assert all(not np.allclose(moved[k], start[k]) for k in ("W_enc", "b_enc", "b_dec"))
    # (fault testing: a tied run from an untied SAE dropped its trained encoder in silence)
    said = []
    train_mod.train(config_from_dict({**tree, "run_dir": str(tmp_path / "tied"),
                                      "sae": {**tree["sae"], "tied": True},
                                      "init_from": str(tmp_path / "first" / "sae")}),
                    progress=False, log=said.append)
    assert any("sae.tied: true starts from the decoder alone" in line for line in said), said
    with pytest.raises(JaxsaeError, match="freeze: 'W_enc' is not a parameter"):
        check_run(config_from_dict({**tree, "sae": {**tree["sae"], "tied": True},
                                    "freeze": ["W_enc"]}))


def test_init_from_free_rows_with_decoder_norm_auto_keeps_them_free(small_data, tmp_path):
    """`sae.decoder_norm: auto` takes a start's rows as they are when they cannot be made unit
    (since 0.3.0 auto gives a ReLU unit rows, which refused a SAELens standard SAE as a start):
    free rows, the L1 for free rows when no `loss` is given (or the default terms' unedited
    values for free rows), said once; the config says so, a resume keeps it without a note
    of older defaults, also once the start is replaced; unit set by hand is still refused;
    unit rows exported in bfloat16 at another input scale stay unit."""
    train_mod.train(small_config(small_data, tmp_path / "free"), progress=False)
    start = str(tmp_path / "free" / "sae")
    norms = np.linalg.norm(load_sae(start).params["W_dec"], axis=1)
    assert norms.max() > norms.min() * 1.01  # rows of several lengths: not unit-able
    tree = small_config_dict(small_data, tmp_path / "tune", init_from=start)
    del tree["loss"], tree["sae"]["decoder_norm"]
    said = []
    result = train_mod.train(config_from_dict(tree), progress=False, log=said.append)
    notes = [line for line in said if "sae.decoder_norm auto keeps them free" in line]
    assert len(notes) == 1 and "the loss for free rows [mse, l1 5" in notes[0], said
    written = load_config(result.run_dir / "config.yaml")
    assert written.sae.decoder_norm == "free"
    assert [(t.term, t.coefficient) for t in written.loss] == [("mse", 1.0), ("l1", 5.0)]
    # resumed (longer) under the same config, its start since replaced by a unit-rows SAE:
    # what the checkpoint trained with, no "auto now gives" note, nothing refused
    train_mod.train(small_config(small_data, tmp_path / "u", sae={"decoder_norm": "unit"}),
                    progress=False)
    shutil.move(start, tmp_path / "free-sae")
    shutil.copytree(tmp_path / "u" / "sae", start)
    said.clear()
    longer = {**tree, "optim": {**tree["optim"], "total_tokens": 256 * 32}}
    train_mod.train(config_from_dict(longer), progress=False, log=said.append)
    assert any("resuming with free decoder rows, as its checkpoints were trained" in line
               for line in said), said
    assert not any("auto now gives" in line or "keeps them free" in line for line in said), said
    shutil.rmtree(start)
    shutil.move(tmp_path / "free-sae", start)
    # default terms edited by an override: the values it left follow the rows (L1 5, not 2)
    edited = load_config(None, [f"data.path={small_data}", f"run_dir={tmp_path / 'edited'}",
                                f"init_from={start}", "sae.d_sae=64", "optim.batch_size=256",
                                "optim.total_tokens=2048", "data.eval_tokens=2048",
                                "loss.l1.warmup_steps=0"])
    said.clear()
    result = train_mod.train(edited, progress=False, log=said.append)
    written = load_config(result.run_dir / "config.yaml")
    assert [(t.term, t.coefficient, t.warmup_steps) for t in written.loss] == [
        ("mse", 1.0, 0), ("l1", 5.0, 0)]
    assert any("the loss edited from the default terms for free rows" in x for x in said), said
    # a coefficient given, equal to the unit rows' default, is kept (it was made 5)
    given = load_config(None, [f"data.path={small_data}", f"run_dir={tmp_path / 'given'}",
                               f"init_from={start}", "sae.d_sae=64", "optim.batch_size=256",
                               "optim.total_tokens=2048", "data.eval_tokens=2048",
                               "loss.l1.coefficient=2"])
    result = train_mod.train(given, progress=False, log=said.append)
    assert load_config(result.run_dir / "config.yaml").loss[1].coefficient == 2.0
    # `loss=` (null) given before the edit: still the default terms edited (it kept 2)
    nulled = load_config(None, [f"data.path={small_data}", f"init_from={start}", "loss=",
                                "loss.1.warmup_steps=0"])
    assert nulled.loss_edits == ("loss.1.warmup_steps",)
    assert train_mod._with_free_rows(nulled).loss[1].coefficient == 5.0
    # a finished sweep started free by auto is what `jaxsae bench` reuses (it trained again)
    from jaxsae import bench

    swept = config_from_dict({**tree, "run_dir": str(tmp_path / "swept"),
                              "sweep": {"seed": [0]}})
    train_mod.train(swept, progress=False)
    assert bench.finished_with(swept)
    # unit set by hand: refused, naming the start's rows
    unit = {**tree, "run_dir": str(tmp_path / "unit"), "sae": {**tree["sae"],
                                                               "decoder_norm": "unit"}}
    with pytest.raises(JaxsaeError, match=r"init_from: .* decoder rows of norm"):
        train_mod.train(config_from_dict(unit), progress=False)
    assert not (tmp_path / "unit").exists()
    # unit rows, exported in bfloat16 at another input scale (rows of one length, to
    # bfloat16's rounding): auto stays unit, without a note
    train_mod.train(small_config(small_data, tmp_path / "scaled",
                                 data={"normalize": "unit_mean_squared_norm"},
                                 sae={"decoder_norm": "unit"}), progress=False)
    assert cli.main(["export", str(tmp_path / "scaled"), "--out", str(tmp_path / "bf16"),
                     "--dtype", "bfloat16"]) == 0
    rows = np.linalg.norm(load_sae(tmp_path / "bf16").params["W_dec"], axis=1)
    assert abs(rows.mean() - 1) > 0.01 and rows.max() > rows.min() * (1 + 1e-3)
    said.clear()
    again = {**tree, "run_dir": str(tmp_path / "from-bf16"), "init_from": str(tmp_path / "bf16")}
    result = train_mod.train(config_from_dict(again), progress=False, log=said.append)
    assert load_config(result.run_dir / "config.yaml").sae.decoder_norm == "unit"
    assert not any("keeps them free" in line for line in said), said


def test_starts_near_unit_or_with_a_zero_row(small_data, tmp_path):
    """Rows unit to `unit_rows`' tolerance but of several lengths (0.9992..1.0008) start unit
    rows at another input scale too (they were refused once the scale was folded in); a start
    with a zero decoder row trains with free rows (the L1's row-norm weight had a NaN
    gradient there) (fault testing)."""
    train_mod.train(small_config(small_data, tmp_path / "unit", sae={"decoder_norm": "unit"}),
                    progress=False)
    loaded = load_sae(tmp_path / "unit" / "sae")
    from jaxsae.config import SAEConfig
    from jaxsae.export import export_sae

    near = dict(loaded.params)
    factors = np.linspace(0.9992, 1.0008, 64).astype(np.float32)
    near["W_dec"] = near["W_dec"] * factors[:, None]  # the same function: codes / factors
    near["W_enc"], near["b_enc"] = near["W_enc"] / factors, near["b_enc"] / factors
    export_sae(near, SAEConfig(d_sae=64, decoder_norm="unit"), tmp_path / "near")
    tree = small_config_dict(small_data, tmp_path / "from-near",
                             init_from=str(tmp_path / "near"),
                             data={"normalize": "unit_mean_squared_norm"})
    del tree["loss"], tree["sae"]["decoder_norm"]
    result = train_mod.train(config_from_dict(tree), progress=False)
    assert load_config(result.run_dir / "config.yaml").sae.decoder_norm == "unit"
    zero = dict(loaded.params)
    zero["W_dec"] = zero["W_dec"].copy()
    zero["W_dec"][3] = 0.0
    export_sae(zero, SAEConfig(d_sae=64, decoder_norm="free"), tmp_path / "zero")
    said = []
    result = train_mod.train(config_from_dict(
        {**tree, "run_dir": str(tmp_path / "from-zero"), "init_from": str(tmp_path / "zero")}),
        progress=False, log=said.append)
    assert load_config(result.run_dir / "config.yaml").sae.decoder_norm == "free"
    assert any("has decoder rows of norm 0.." in line for line in said), said
    assert np.isfinite(result.eval["explained_variance"])


def test_matching_pursuit_from_rows_of_several_lengths_is_refused(small_data, tmp_path):
    """Matching pursuit needs unit rows: auto does not give it free ones for such a start,
    and the refusal does not advise free rows, which it refuses (fault testing)."""
    train_mod.train(small_config(small_data, tmp_path / "free"), progress=False)
    from jaxsae.config import SAEConfig
    from jaxsae.export import export_sae

    loaded = load_sae(tmp_path / "free" / "sae")
    export_sae({"W_dec": loaded.params["W_dec"], "b_dec": loaded.params["b_dec"]},
               SAEConfig(d_sae=64, activation="matching_pursuit", k=4, decoder_norm="free"),
               tmp_path / "mp")
    tree = small_config_dict(small_data, tmp_path / "run", init_from=str(tmp_path / "mp"),
                             sae={"d_sae": 64, "activation": "matching_pursuit", "k": 4},
                             loss=[{"term": "mse"}])
    del tree["sae"]["decoder_norm"]
    with pytest.raises(JaxsaeError, match="matching_pursuit needs unit decoder rows, and these "
                                          "are not all of one length"):
        train_mod.train(config_from_dict(tree), progress=False)


def test_threshold_lr_scale_scales_the_thresholds_updates_alone(small_data, tmp_path):
    """optim.threshold_lr_scale: the same gradients give the thresholds s times the update of
    s = 1 and every other parameter the same update; the default keeps the optimiser state's
    structure (checkpoints of earlier runs restore); refused where no threshold is learned."""
    tree = small_config_dict(small_data, tmp_path / "run",
                             sae={"activation": "jumprelu", "decoder_norm": "free"},
                             loss=[{"term": "mse"}, {"term": "l0", "coefficient": 0.1}])
    rng = np.random.default_rng(0)
    plain = config_from_dict(tree)
    scaled = config_from_dict({**tree, "optim": {**tree["optim"], "threshold_lr_scale": 8.0}})
    params = jax.tree.map(jnp.asarray, step.init_state(jax.random.PRNGKey(0), plain, 16).params)
    for _ in range(3):  # a few steps: Adam's moments differ from their first-step form
        grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
                 for k, v in params.items()}
        updates = {}
        for name, cfg in (("plain", plain), ("scaled", scaled)):
            tx = step.make_optimizer(cfg)
            state = updates.get(name + "_state") or tx.init(params)
            updates[name], updates[name + "_state"] = tx.update(grads, state, params)
        for k in params:
            want = updates["plain"][k] * (8.0 if k == "threshold" else 1.0)
            np.testing.assert_allclose(updates["scaled"][k], want, rtol=1e-6, err_msg=k)
    # the default's state is the multi-transform's alone, as before the key existed
    assert isinstance(step.make_optimizer(plain).init(params), optax.MultiTransformState)
    with pytest.raises(JaxsaeError, match=re.escape("optim.threshold_lr_scale: sae.activation "
                                                    "relu")):
        check_run(config_from_dict({**small_config_dict(small_data, tmp_path / "r"),
                                    "optim": {**tree["optim"], "threshold_lr_scale": 8.0}}))
    with pytest.raises(JaxsaeError, match=re.escape("optim.threshold_lr_scale: must be > 0")):
        config_from_dict({**tree, "optim": {**tree["optim"], "threshold_lr_scale": 0}})


def test_a_latent_silent_since_the_start_counts_dead_before_the_window_fills(small_data):
    """log.dead_window_tokens is 4M: a short run logged dead_fraction 0 throughout, with
    latents that had never fired (fault testing)."""
    cfg = small_config(small_data, "unused")
    params = dict(sae_init(cfg))
    params["b_enc"] = params["b_enc"].at[:10].set(-1e4)  # latents 0..9 can never fire
    state = step.init_state(jax.random.PRNGKey(0), cfg, 16, params)
    train_step = jax.jit(step.make_train_step(cfg))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 16)), jnp.float32)
    for _ in range(3):
        state, metrics = train_step(state, x, step.hyper_of(cfg))
    assert float(metrics["dead_fraction"]) == pytest.approx(10 / 64)


@pytest.mark.parametrize("d_out", [0, 8])  # an SAE, a transcoder of 16 -> 8
def test_the_logged_mse_is_in_the_data_s_units(small_data, d_out):
    """The logged `mse` is in raw units whatever the normalisation (a transcoder's: its
    target's): the step's, in the normalised units, divided by the scale squared by the
    logger, in float64; its loss is the normalised objective (fault testing: a normalised run
    logged an mse 200x its eval.json's under the same name)."""
    from jaxsae.hooks import MetricLogger

    tree = small_config_dict(small_data, "unused")
    if d_out:
        tree["data"]["target"] = "y"
    cfg = config_from_dict(tree)
    state = step.init_state(jax.random.PRNGKey(0), cfg, 16, d_out=d_out)
    rows = jnp.asarray(np.random.default_rng(0).normal(size=(256, 16 + d_out)) * 30,
                       jnp.float32)
    s, t = 0.05, (0.2 if d_out else 1.0)  # the input scale, the target's
    scaled = rows.at[:, :16].multiply(s).at[:, 16:].multiply(t)
    _, raw = step.make_train_step(cfg, input_scale=s, d_out=d_out, target_scale=t)(
        state, rows, step.hyper_of(cfg))
    _, plain = step.make_train_step(cfg, d_out=d_out)(state, scaled, step.hyper_of(cfg))
    assert float(raw["loss"]) == pytest.approx(float(plain["loss"]), rel=1e-5)
    lines = []
    logger = MetricLogger(cfg, cfg.log.every_steps - 1, [logging_to(lines)],
                          dropped=lambda at: None, scale=t if d_out else s)
    logger.record(cfg.log.every_steps - 1, raw, {})
    assert lines[0]["mse"] == pytest.approx(float(plain["mse"]) / (t if d_out else s) ** 2,
                                            rel=1e-5)


def sae_init(cfg):
    from jaxsae import sae

    return sae.init_params(jax.random.PRNGKey(1), 16, cfg.sae)
