"""Sweeps: K SAEs in one vmapped step. Each SAE of a sweep is checked against the same SAE
trained alone (the plain reference), on the same batches."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from conftest import (
    small_config,
    small_config_dict,
    train_until_crash,
    watched_loader,
    xla_flags,
)

from jaxsae import build as build_mod
from jaxsae import export, finish, tensorfile
from jaxsae import train as train_mod
from jaxsae.checks import check_run
from jaxsae.config import config_from_dict, load_config
from jaxsae.data import window
from jaxsae.data.source import iter_blocks
from jaxsae.errors import ConfigError, JaxsaeError, NonFiniteError

ROOT = Path(__file__).resolve().parents[1]

TOPK = {"sae": {"d_sae": 64, "activation": "topk", "k": 4, "decoder_norm": "unit"},
        "loss": [{"term": "mse"}, {"term": "auxk", "coefficient": 0.1, "dead_tokens": 256}]}
BATCHTOPK = {"sae": {"d_sae": 64, "activation": "batchtopk", "k": 4},
             "loss": [{"term": "mse"}, {"term": "auxk", "coefficient": 0.1}]}


# ---------------------------------------------------------------------------------------------
# Config


def _tree(**sweep_and_more):
    return {"data": {"path": "x"}, "sae": {"d_sae": 64, "activation": "topk", "k": 8},
            "loss": [{"term": "mse"}, {"term": "auxk", "coefficient": 0.1}],
            "optim": {"batch_size": 64, "total_tokens": 6400, "warmup_steps": 1},
            **sweep_and_more}


@pytest.mark.parametrize(("more", "message"), [
    # (fault testing: both were "must divide the 1 SAEs of the sweep")
    ({"sweep_chunk": 0}, "sweep_chunk: must be >= 1, got 0"),
    ({"sweep_chunk": 2}, "sweep_chunk: a run without a sweep steps 1 SAE (1 or null), got 2"),
    ({"sweep_chunk": 4, "sweep": {"seed": [0, 1, 2]}},
     "sweep_chunk: must divide the 3 SAEs of the sweep, got 4")])
def test_bad_sweep_chunks_are_refused(more, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        config_from_dict(_tree(**more))


def test_grid_is_every_combination_in_key_order():
    cfg = config_from_dict(_tree(sweep={"sae.k": [2, 4], "seed": [0, 1, 2]}))
    assert [dict(p) for p in cfg.sweep.points] == [
        {"sae.k": k, "seed": s} for k in (2, 4) for s in (0, 1, 2)]
    members = cfg.sweep_configs()
    assert [(m.sae.k, m.seed) for m in members] == [(k, s) for k in (2, 4) for s in (0, 1, 2)]
    assert all(m.sweep is None for m in members)
    assert all(m.optim == cfg.optim and m.loss == cfg.loss for m in members)


def test_explicit_points_and_yaml_round_trip():
    points = [{"optim.lr": 1e-3}, {"optim.lr": 3e-3, "loss.1.coefficient": 0.5}, {"seed": 7}]
    cfg = config_from_dict(_tree(sweep=points))
    members = cfg.sweep_configs()
    assert [m.optim.lr for m in members] == [1e-3, 3e-3, cfg.optim.lr]
    assert [m.loss[1].coefficient for m in members] == [0.1, 0.5, 0.1]
    assert [m.seed for m in members] == [0, 0, 7]
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_sweep_overrides_on_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_tree()))
    cfg = load_config(path, ["sweep.loss.1.coefficient=[0.1, 1]", "sweep.optim.lr=[1e-3,1e-2]"])
    assert [(m.loss[1].coefficient, m.optim.lr) for m in cfg.sweep_configs()] == [
        (0.1, 1e-3), (0.1, 1e-2), (1.0, 1e-3), (1.0, 1e-2)]
    path.write_text(yaml.safe_dump(_tree(sweep=[{"seed": 1}])))
    with pytest.raises(ConfigError, match="list of points"):
        load_config(path, ["sweep.seed=[1, 2]"])


@pytest.mark.parametrize(("sweep", "match"), [
    ({"sae.d_sae": [64, 128]}, r"sweep\.sae\.d_sae: cannot be swept.*sweepable keys: seed"),
    ({"optim.lr": 1e-3}, r"sweep\.optim\.lr: expected a list of values"),
    ({"optim.lr": []}, r"sweep\.optim\.lr: the list of values is empty"),
    ([], r"sweep: no SAEs to train"),
    ("lr", r"sweep: expected a mapping"),
    ([{"seed": 1}, 3], r"sweep: expected a mapping .* or a list of mappings"),
    ({"seed": [1, 1]}, r"sweep: SAE 1 \(seed=1\) repeats SAE 0"),
    # one term by its name and by its position: the last would win, unlike the labels
    ({"loss.auxk.coefficient": [1.0, 2.0], "loss.1.coefficient": [3.0]},
     r"sweep\.loss\.1\.coefficient: SAE 0 \(.*\) also sets this term as "
     r"loss\.auxk\.coefficient"),
    ([{"loss.1.coefficient": 1.0, "loss.auxk.coefficient": 2.0}],
     r"sweep\.loss\.auxk\.coefficient: SAE 0 .* also sets this term as loss\.1\.coefficient"),
    # points spelled differently that train the same SAE
    ([{"seed": 1}, {"seed": 1, "optim.lr": 3e-4}],
     r"sweep: SAE 1 \(seed=1,optim\.lr=0\.0003\) repeats SAE 0 \(seed=1\)"),
    ([{"loss.auxk.coefficient": 0.5}, {"loss.1.coefficient": 0.5}],
     r"sweep: SAE 1 \(loss\.1\.coefficient=0\.5\) repeats SAE 0"),
    ({"optim.lr": ["fast"]}, r"sweep\.optim\.lr: expected a finite number"),
    ({"loss.5.coefficient": [1.0]}, r"sweep\.loss\.5\.coefficient: there is no loss term 5"),
    ({"sae.k": [4, 100]}, r"sweep SAE 1 \(sae\.k=100\): sae\.k: must be in 1\.\.sae\.d_sae"),
    ({"optim.lr": [1e-3, -1.0]}, r"sweep SAE 1 \(optim\.lr=-1\.0\): optim\.lr: must be > 0"),
])
def test_bad_sweeps_name_the_key(sweep, match):
    with pytest.raises(ConfigError, match=match):
        check_run(config_from_dict(_tree(sweep=sweep)))


def test_sweeping_k_needs_an_activation_with_k():
    tree = _tree(sweep={"sae.k": [2, 4]})
    tree["sae"] = {"d_sae": 64, "activation": "relu"}
    tree["loss"] = [{"term": "mse"}, {"term": "l1"}]
    with pytest.raises(ConfigError, match=r"sweep\.sae\.k: sae\.activation relu has no k"):
        check_run(config_from_dict(tree))


def test_an_error_of_the_shared_config_is_not_blamed_on_one_sae():
    """(fault testing: AuxK on matching pursuit, refused for every SAE of a sweep of k, was
    reported as SAE 0's)"""
    tree = _tree(sweep={"sae.k": [2, 4]})
    tree["sae"] = {"d_sae": 64, "activation": "matching_pursuit", "k": 2}
    tree["loss"] = [{"term": "mse"}, {"term": "auxk"}]
    with pytest.raises(ConfigError, match=r"^loss\[1\]: term 'auxk' needs an encoder .* \(every "
                                          r"SAE of the sweep\)$"):
        check_run(config_from_dict(tree))


# ---------------------------------------------------------------------------------------------
# The vmapped step against single SAEs


def _steps(cfg, batches):
    built = build_mod.build(cfg, 16)
    state = built.init()
    history = []
    for batch in batches:
        state, metrics = built.step(state, jax.device_put(batch, built.batch_sharding))
        history.append(jax.device_get(metrics))
    return built, jax.device_get(state), history


# (Two SAEs a sweep where two values vary: each point varies both, and each SAE trained alone
# costs a compile; the grid's product is checked by test_grid_is_every_combination_in_key_order.)
@pytest.mark.parametrize(("sections", "sweep"), [
    ({}, [{"loss.1.coefficient": 0.03, "optim.lr": 1e-3},
          {"loss.1.coefficient": 0.3, "optim.lr": 1e-2}]),
    (TOPK, [{"sae.k": 2, "seed": 0}, {"sae.k": 8, "seed": 1}]),  # sparse TopK path, k traced
    ({**TOPK, "loss": [{"term": "matryoshka", "prefixes": [16, 64]}]},  # dense TopK decode
     {"sae.k": [2, 6]}),
    (BATCHTOPK, [{"sae.k": 2, "loss.1.coefficient": 0.0},
                 {"sae.k": 8, "loss.1.coefficient": 0.5}]),
    ({"sae": {"d_sae": 64, "activation": "jumprelu", "jumprelu_bandwidth": 0.1},
      "loss": [{"term": "mse"}, {"term": "l0", "coefficient": 0.01, "bandwidth": 0.1,
                                 "warmup_steps": 4}]},
     [{"loss.1.coefficient": 0.01}, {"loss.1.coefficient": 0.1, "seed": 3}]),
    ({"sae": {"d_sae": 64, "activation": "gated"},  # a term by name
      "loss": [{"term": "mse"}, {"term": "l1", "name": "gate_l1"}, {"term": "gated_aux"}]},
     {"loss.gate_l1.coefficient": [0.01, 0.3]}),
    ({"sae": {"d_sae": 64, "activation": "matching_pursuit", "k": 4},
      "loss": [{"term": "mse"}]}, {"sae.k": [1, 4]}),  # the number of pursuit steps, traced
])
def test_each_sae_of_a_sweep_matches_it_trained_alone(small_data, tmp_path, sections, sweep):
    cfg = small_config(small_data, tmp_path, **sections, sweep=sweep)
    rng = np.random.default_rng(0)
    batches = [np.abs(rng.standard_normal((256, 16))).astype(np.float32) * 2 for _ in range(6)]
    built, state, history = _steps(cfg, batches)
    assert built.is_sweep and len(built.members) == len(cfg.sweep.points)
    for i, member in enumerate(built.members):
        _, alone, alone_history = _steps(member, batches)
        for name, value in alone.params.items():
            np.testing.assert_allclose(state.params[name][i], value, rtol=2e-5, atol=2e-6,
                                       err_msg=f"SAE {i} {name}")
        np.testing.assert_array_equal(state.tokens_since_fired[i], alone.tokens_since_fired)
        for step, (got, want) in enumerate(zip(history, alone_history, strict=True)):
            assert set(got) == set(want)
            for key in ("loss", "l0", "lr", "explained_variance"):
                np.testing.assert_allclose(got[key][i], want[key], rtol=2e-5, atol=1e-6,
                                           err_msg=f"SAE {i} step {step} {key}")


@pytest.mark.parametrize("sections", [{}, TOPK])
def test_chunked_sweep_matches_all_at_once(small_data, tmp_path, sections):
    sweep = {"optim.lr": [1e-3, 3e-3], "seed": [0, 1, 2]}
    rng = np.random.default_rng(2)
    batches = [np.abs(rng.standard_normal((256, 16))).astype(np.float32) * 2 for _ in range(4)]
    _, whole, whole_history = _steps(small_config(small_data, tmp_path, **sections,
                                                  sweep=sweep), batches)
    _, chunked, chunked_history = _steps(small_config(small_data, tmp_path, **sections,
                                                      sweep=sweep, sweep_chunk=2), batches)
    for name, value in whole.params.items():
        np.testing.assert_allclose(chunked.params[name], value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    for a, b in zip(whole_history, chunked_history, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    with pytest.raises(ConfigError, match="sweep_chunk: must divide the 6 SAEs"):
        small_config(small_data, tmp_path, sweep=sweep, sweep_chunk=4)


def test_k_sweep_keeps_k_latents_per_token(small_data, tmp_path):
    cfg = small_config(small_data, tmp_path, **TOPK, sweep={"sae.k": [1, 3, 5]})
    rng = np.random.default_rng(1)
    batches = [np.abs(rng.standard_normal((256, 16))).astype(np.float32) + 0.5]
    _, _, history = _steps(cfg, batches)
    np.testing.assert_allclose(history[0]["l0"], [1, 3, 5])


# ---------------------------------------------------------------------------------------------
# Runs


def test_sweep_run_writes_one_directory_per_sae(small_data, tmp_path, monkeypatch):
    served = []
    cfg = small_config(small_data, tmp_path / "run", **TOPK,
                       sweep={"sae.k": [2, 4], "optim.lr": [1e-3, 3e-3]})
    passes = []  # the final evaluation reads the held-out tokens once for the four SAEs
    monkeypatch.setattr(window, "iter_blocks", lambda *a, **kw: (passes.append(
        [f.name for f in traceback.extract_stack() if "jaxsae" in f.filename][-2]),
        iter_blocks(*a, **kw))[1])
    result = train_mod.train(cfg, progress=False,
                             make_loader=watched_loader(on_batch=lambda rows: served.append(1)))
    steps = cfg.optim.total_steps
    assert steps <= len(served) <= steps + 4  # one stream (+ prefetch), not one per SAE
    # (one pass for the reconstruction metrics, one for the ground truth's)
    assert sorted(passes) == ["blocks", "truth_reports"]
    run = tmp_path / "run"
    assert result.run_dir == run and result.sae_dir == run / "sweep"
    assert [r.run_dir for r in result.sweep] == [run / "sweep" / f"{i:02d}" for i in range(4)]
    assert config_from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    table = (run / "sweep.csv").read_text().splitlines()
    assert table[0] == "sae,sae.k,optim.lr,l0,mse,explained_variance,dead_fraction"
    for i, (member, r) in enumerate(zip(cfg.sweep_configs(), result.sweep, strict=True)):
        saved = config_from_dict(yaml.safe_load((r.run_dir / "config.yaml").read_text()))
        assert saved == member
        lines = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == list(range(4, steps + 1, 4))
        # its own learning rate: the last step is 1/6 into the final 6 decay steps
        assert lines[-1]["lr"] == pytest.approx(member.optim.lr / 6, rel=1e-5)
        loaded = export.load_sae(r.sae_dir)
        assert loaded.cfg_json["k"] == member.sae.k and loaded.sae.k == member.sae.k
        assert json.loads((r.run_dir / "eval.json").read_text()) == r.eval
        assert abs(r.eval["l0"] - member.sae.k) < 1e-6
        row = table[1 + i].split(",")
        assert row[:3] == [f"sweep/{i:02d}", str(member.sae.k), str(member.optim.lr)]
        assert float(row[3]) == pytest.approx(r.eval["l0"])
    # The SAEs really differ (different k and lr), and the export tool writes the same layout.
    a = tensorfile.read(result.sweep[0].sae_dir / "sae_weights.safetensors")
    b = tensorfile.read(result.sweep[3].sae_dir / "sae_weights.safetensors")
    assert not np.allclose(a["W_dec"], b["W_dec"])
    out = finish.export_checkpoint(run, tmp_path / "exported")
    # one SAE's directory names the run to export (fault testing: "no checkpoints/ directory")
    with pytest.raises(JaxsaeError, match=rf"sweep/01: an SAE of the sweep in {run}, whose "
                                          rf"checkpoints hold them all; export {run} "):
        finish.export_checkpoint(run / "sweep" / "01", tmp_path / "one")
    for r in result.sweep:
        again = tensorfile.read(out / "sweep" / r.run_dir.name / "sae_weights.safetensors")
        got = tensorfile.read(r.sae_dir / "sae_weights.safetensors")
        for name in got:
            np.testing.assert_array_equal(again[name], got[name], err_msg=name)


def test_sweep_resumes_exactly(small_data, tmp_path, monkeypatch):
    sweep = {"loss.1.coefficient": [0.03, 0.3], "seed": [0, 1]}
    straight = train_mod.train(small_config(small_data, tmp_path / "a", sweep=sweep),
                               progress=False)
    cfg = small_config(small_data, tmp_path / "b", sweep=sweep)
    train_until_crash(cfg, 13)  # after the step-8 checkpoint
    resumed = train_mod.train(cfg, progress=False)
    for a, b in zip(straight.sweep, resumed.sweep, strict=True):
        wa = tensorfile.read(a.sae_dir / "sae_weights.safetensors")
        wb = tensorfile.read(b.sae_dir / "sae_weights.safetensors")
        for name in wa:
            np.testing.assert_allclose(wa[name], wb[name], rtol=1e-6, atol=1e-7, err_msg=name)
        la = (a.run_dir / "metrics.jsonl").read_text().splitlines()
        lb = (b.run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(la) == len(lb)
        for x, y in zip(la, lb, strict=True):
            x, y = json.loads(x), json.loads(y)
            assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    changed = small_config_dict(small_data, tmp_path / "b", sweep={**sweep, "seed": [0, 2]})
    with pytest.raises(Exception, match="sweep"):
        train_mod.train(config_from_dict(changed), progress=False)


def test_a_diverging_sae_is_named(small_data, tmp_path):
    cfg = small_config(small_data, tmp_path / "run",
                       sweep=[{"optim.lr": 1e-3}, {"optim.lr": 1e30}])
    with pytest.raises(NonFiniteError, match=r"sweep SAE 1 \(optim\.lr=1e\+30\)"):
        train_mod.train(cfg, progress=False)


def test_cli_sweep(small_data, tmp_path, capsys):
    """`jaxsae train` with a sweep given on the command line (its command line in this
    process: the exit status of a process of `jaxsae train` is tested in test_cli.py)."""
    from jaxsae import cli

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small_config_dict(small_data, tmp_path / "run")))
    capsys.readouterr()
    code = cli.main(["train", str(config), "--no-progress",
                     "sweep.loss.1.coefficient=[0.01, 0.1]"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "(loss.1.coefficient=0.01)" in printed.out
    assert "(loss.1.coefficient=0.1)" in printed.out
    assert "2 SAEs exported to" in printed.out and "sweep.csv" in printed.out


_SHARDED = r"""
import json, sys
import jax, numpy as np
from jaxsae.config import config_from_dict
from jaxsae.build import build

tree = json.loads(sys.argv[1])
def run(mesh, devices):
    built = build(config_from_dict({**tree, "mesh": mesh}), 16, devices)
    state = built.init()
    rng = np.random.default_rng(0)
    for _ in range(5):
        batch = np.abs(rng.standard_normal((64, 16))).astype(np.float32) * 2
        state, metrics = built.step(state, jax.device_put(batch, built.batch_sharding))
    return jax.device_get(state.params), np.asarray(metrics["loss"])
ref, ref_loss = run({"data": 1, "model": 1}, jax.devices()[:1])
out = {}
for data, model in [(8, 1), (4, 2)]:
    got, loss = run({"data": data, "model": model}, jax.devices())
    out[f"{data}x{model}"] = [max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref),
                              float(np.max(np.abs(loss - ref_loss)
                                           / np.maximum(np.abs(ref_loss), 1.0)))]
print(json.dumps(out))
"""


@pytest.mark.parametrize("sections", [
    TOPK,
    # BatchTopK's sparse path (8x1) and its per-device lists on a model-split dictionary
    # (4x2), with prefix losses and AuxK, k traced per SAE
    {"sae": {"d_sae": 64, "activation": "batchtopk", "k": 4},
     "loss": [{"term": "matryoshka", "prefixes": [16, 64]}, {"term": "auxk", "dead_tokens": 64}]},
    pytest.param({"sae": {"d_sae": 64, "activation": "relu"},
                  "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 0.1}]},
                 marks=pytest.mark.slow),  # (the dense path: test_sharding's default cases)
])
def test_sharded_sweep_matches_one_device(sections):
    tree = {"data": {"path": "x"}, **sections,
            "optim": {"lr": 1e-2, "batch_size": 64, "total_tokens": 6400, "warmup_steps": 1},
            "sweep": ({"sae.k": [2, 4], "optim.lr": [1e-3, 1e-2]} if "k" in sections["sae"]
                      else {"loss.1.coefficient": [0.01, 0.3], "seed": [0, 1]})}
    env = {**os.environ, "XLA_FLAGS": xla_flags(8),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _SHARDED, json.dumps(tree)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for mesh, (param_diff, loss_diff) in json.loads(proc.stdout.splitlines()[-1]).items():
        assert param_diff < 1e-5 and loss_diff < 1e-5, (mesh, param_diff, loss_diff)


def test_a_sweep_sae_s_config_in_the_sweep_s_directory_is_told_to_train_alone(small_data,
                                                                              tmp_path):
    """(fault testing: `jaxsae train runs/S/sweep/00/config.yaml` without run_dir= was refused
    for the base config's coefficient, "0.3 in the checkpoint", which no SAE had trained at)"""
    from jaxsae.checkpoint import check_resume_compatible

    cfg = small_config(small_data, tmp_path, sweep={"loss.1.coefficient": [0.1, 0.3]})
    for current, what in ((cfg.sweep_configs()[1], "is SAE 1 of it (loss.1.coefficient=0.3)"),
                          (dataclasses.replace(cfg, sweep=None, seed=99), "has no sweep")):
        with pytest.raises(JaxsaeError) as e:
            check_resume_compatible(cfg, current, tmp_path)
        assert str(e.value) == (
            f"{tmp_path}: holds a sweep of 2 SAEs and this config {what}: train it alone in "
            f"another directory (run_dir=...), or resume the sweep with {tmp_path}/config.yaml")
    check_resume_compatible(cfg, cfg, tmp_path)


def test_a_restart_removes_the_saes_an_earlier_larger_start_left(small_data, tmp_path):
    """(fault testing: a 64-SAE sweep out of memory at its first step, restarted with 2, kept
    62 stale SAE directories, which `plot` drew) A run starting over removes the SAE
    directories of an earlier start that are not its own, saying so; one holding anything
    else is refused and left as it is."""
    from conftest import train_until_crash

    from jaxsae.train import train

    run = tmp_path / "run"
    three = small_config(small_data, run, sweep={"loss.1.coefficient": [0.1, 0.2, 0.3]})
    train_until_crash(three, at_batch=1)  # before the first checkpoint
    assert sorted(p.name for p in (run / "sweep").iterdir()) == ["00", "01", "02"]
    (run / "sweep" / "02" / "notes.txt").write_text("mine")
    two = small_config(small_data, run, sweep={"loss.1.coefficient": [0.1, 0.2]})
    with pytest.raises(JaxsaeError, match=re.escape(
            f"{run / 'sweep' / '02'}: not an SAE of this run, and not what an earlier start "
            "of it left")):
        train(two, progress=False)
    assert (run / "sweep" / "02" / "notes.txt").read_text() == "mine"
    (run / "sweep" / "02" / "notes.txt").unlink()
    said = []
    train(two, progress=False, log=said.append)
    assert sorted(p.name for p in (run / "sweep").iterdir()) == ["00", "01"]
    assert (f"{run / 'sweep'}: removed 1 SAE directory an earlier start left, not of this run "
            "(02)") in said
    # an SAE trained past a checkpoint, whose checkpoints were moved away, is a history the
    # user may keep: refused (a review: it was removed as an earlier start's)
    kept = tmp_path / "kept"
    train_until_crash(small_config(small_data, kept, sweep={"seed": [1, 2, 3]}), at_batch=13)
    (kept / "checkpoints").rename(tmp_path / "moved")
    with open(kept / "sweep" / "02" / "metrics.jsonl", "a") as f:
        f.write('{"note": "a line of some other making"}\n[1, 2]\n')  # (skipped)
    history = (kept / "sweep" / "02" / "metrics.jsonl").read_text()
    with pytest.raises(JaxsaeError, match=re.escape(
            f"{kept / 'sweep' / '02'}: not an SAE of this run, and its metrics.jsonl logged "
            "step 12, past its first checkpoint")):
        train(small_config(small_data, kept, sweep={"seed": [1, 2]}), progress=False)
    assert (kept / "sweep" / "02" / "metrics.jsonl").read_text() == history
    # a single run where a sweep had started: the whole sweep/ goes
    alone = tmp_path / "alone"
    train_until_crash(small_config(small_data, alone, sweep={"seed": [1, 2]}), at_batch=1)
    train(small_config(small_data, alone), progress=False)
    assert not (alone / "sweep").exists() and (alone / "sae").is_dir()


def test_member_configs_rebuild_the_single_runs(small_data, tmp_path):
    """A sweep SAE's config.yaml trains that SAE alone with `jaxsae train` (no sweep key)."""
    cfg = small_config(small_data, tmp_path, sweep={"seed": [4, 5]})
    member = cfg.sweep_configs()[1]
    assert member.seed == 5 and member.sweep is None
    assert dataclasses.replace(cfg, sweep=None, seed=5) == member


def test_every_bit_of_a_seed_counts(small_data, tmp_path):
    """(fault testing: jax.random.PRNGKey keeps a seed's low 32 bits, so seeds 0 and 2^32
    trained the same SAE, which a bench reports as two seeds; a sweep's seeds were cast to
    int32, and one of 2^31 or more was a traceback.) Seeds in [0, 2^32) keep their keys; the
    others get keys of their own; a sweep's SAE starts as it would alone."""
    for seed in (0, 5, 2**32 - 1):
        np.testing.assert_array_equal(build_mod.seed_key(seed), jax.random.PRNGKey(seed))
    keys = {tuple(np.asarray(build_mod.seed_key(s)).tolist())
            for s in (0, 2**32, -1, 2**32 - 1, 2**63 - 1, -(2**63))}
    assert len(keys) == 6
    seeds = [0, 2**32, 3_000_000_000]
    cfg = config_from_dict(small_config_dict(small_data, tmp_path / "run",
                                             sweep={"seed": seeds}))
    swept = build_mod.build(cfg, 16).init().params["W_dec"]
    assert not np.array_equal(swept[0], swept[1])
    alone = config_from_dict(small_config_dict(small_data, tmp_path / "run", seed=2**32))
    np.testing.assert_array_equal(build_mod.build(alone, 16).init().params["W_dec"], swept[1])
