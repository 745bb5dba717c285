"""Defaults that fit any run, and logs people can read (SLURM logs, JSON, --help)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
from pathlib import Path

import pytest
import yaml

from jaxsae import cli
from jaxsae.config import load_config
from tests.conftest import small_config_dict, watched_loader
from tests.faults.conftest import refused, snapshot, write_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_fit_a_small_run():
    """300k tokens at batch 512 (585 steps) and a 40k-token cache: no key needs setting."""
    cfg = load_config(None, ["data.path=d", "optim.batch_size=512",
                             "optim.total_tokens=300000"])
    assert cfg.optim.warmup == 29 and cfg.data.held_out(40_000) == 2000
    big = load_config(None, ["data.path=d"])
    assert big.optim.warmup == 1000 and big.data.held_out(10**9) == 65536
    # lanes: 8 wherever the batch allows, else the most that divide it (fault testing: a
    # batch below 8 was refused by the default)
    assert cfg.data.lanes == big.data.lanes == 8
    for batch, lanes in [(100, 4), (6, 2), (1, 1)]:
        assert load_config(None, ["data.path=d", f"optim.batch_size={batch}",
                                  "optim.total_tokens=100000"]).data.lanes == lanes
    with pytest.raises(Exception, match=r"optim.warmup_steps, optim.decay_fraction: the "
                                        r"learning rate's warm-up plus decay \(600 \+ "):
        load_config(None, ["data.path=d", "optim.batch_size=512",
                           "optim.total_tokens=300000", "optim.warmup_steps=600"])
    # a preset shrunk for a smoke test: every ramp that does not fit, in one line, with what
    # fits (fault testing: refused one key at a time)
    smoke, quickstart = ["optim.total_tokens=100000"], ROOT / "configs" / "quickstart.yaml"
    with pytest.raises(Exception, match=r"^optim.warmup_steps, optim.decay_fraction, "
                                        r"loss.l1.warmup_steps: .* lower them \(e.g. "
                                        r"optim.warmup_steps=auto loss.l1.warmup_steps=0\)$"):
        load_config(quickstart, smoke)
    load_config(quickstart,
                [*smoke, "optim.warmup_steps=auto", "loss.l1.warmup_steps=0"])
    # a decay over the whole run fits the automatic warm-up (none is left for it)
    assert load_config(None, ["data.path=d", "optim.decay_fraction=1"]).optim.warmup == 0


def test_a_small_run_trains_with_the_defaults(small_data, tmp_path, capsys):
    tree = {"run_dir": str(tmp_path / "run"), "data": {"path": str(small_data)},
            "sae": {"d_sae": 32}, "optim": {"batch_size": 512, "total_tokens": 512 * 12}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["tokens"] == 16384 // 20 and ev["held_out"]


def test_convert_and_frankenstein_fit_small_data_with_their_defaults(small_data, trained_run,
                                                                      tmp_path, capsys):
    """Their --tokens defaults (65536) once left nothing to calibrate or retrain on below
    131k tokens; now they fit the data: half of it to compare on, and the hold-out of
    training (min(65536, 5 %)) to evaluate a stitched SAE on."""
    config = write_config(tmp_path / "topk.yaml", small_data, tmp_path / "topk",
                          sae={"d_sae": 32, "activation": "topk", "k": 4},
                          loss=[{"term": "mse"}])
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    # (the wide SAE: the session's 64-latent run, only read)
    saes = [str(tmp_path / "topk" / "sae"), str(trained_run / "sae")]
    shared = snapshot(trained_run)
    capsys.readouterr()
    assert cli.main(["convert", saes[0], "--data", str(small_data), "--out",
                     str(tmp_path / "conv"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "conv" / "convert.json").read_text())
    assert report["tokens"] == report["calibration_tokens"] == 16384 // 2
    # one stitch for both: the default --tokens, and a batch the default 8 data lanes do not
    # divide (the retraining's lanes follow it)
    assert cli.main(["stitch", "frankenstein", saes[1], str(tmp_path / "conv" / "sae"),
                     "--data", str(small_data), "--out", str(tmp_path / "fr12"),
                     "--batch-size", "12", "--retrain-decoder-tokens", "120",
                     "--no-progress"]) == 0
    assert f"Evaluated on the last {16384 // 20} tokens" in \
        (tmp_path / "fr12" / "frankenstein.md").read_text()
    assert yaml.safe_load((tmp_path / "fr12" / "retrain" / "config.yaml").read_text()
                          )["data"]["lanes"] == 4
    # an explicit --tokens that leaves too little to retrain on is named, as given
    refused(["stitch", "frankenstein", saes[1], str(tmp_path / "conv" / "sae"), "--data",
             str(small_data), "--out", str(tmp_path / "fr2"), "--tokens", "15000"], capsys,
            match="16384 tokens leave 1384 to retrain the decoder on after the last --tokens "
                  "15000; need at least --batch-size (4096)", unchanged=[small_data])
    assert snapshot(trained_run) == shared


def test_a_sweep_over_a_misspelt_key_names_it(small_data, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", small_data, tmp_path / "run")
    refused(["train", str(config), "sweep.optim.lrr=[1e-3, 3e-3]"], capsys,
            match="sweep.optim.lrr: unknown key (did you mean 'lr'?)", unchanged=[])
    refused(["train", str(config), "sweep.sae.d_sae=[32, 64]"], capsys,
            match="cannot be swept", unchanged=[])


def test_bench_accepts_a_base_k_above_d_sae_when_every_arm_sweeps_k(tmp_path):
    from jaxsae.bench import load_bench_config

    def bench(ks: list[int]):
        path = tmp_path / "b.yaml"
        path.write_text(yaml.safe_dump({
            "out": str(tmp_path / "b"),
            "base": {"data": {"path": "d"}, "sae": {"d_sae": 16, "activation": "topk", "k": 32}},
            "arms": {"topk": {"sweep": {"sae.k": ks}}}}))
        return load_bench_config(path)

    cfg = bench([2, 4])
    assert [m.sae.k for m in cfg.arm_configs()["topk"].sweep_configs()] == [2, 4]
    with pytest.raises(Exception, match=r"sae.k: must be in 1..sae.d_sae \(16\), got 40"):
        bench([2, 40])


def test_bench_never_relabels_an_arm_trained_with_other_values(small_data, tmp_path, capsys):
    tree = {"out": str(tmp_path / "b"),
            "base": yaml.safe_load(write_config(tmp_path / "c.yaml", small_data,
                                                tmp_path / "x").read_text()),
            "arms": {"l1": {"sweep": {"loss.1.coefficient": [0.1]}}}}
    tree["base"]["optim"]["total_tokens"] = 256 * 8
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["bench", str(tmp_path / "b.yaml"), "--no-progress"]) == 0
    results = (tmp_path / "b" / "results.csv").read_text()
    # (fault testing: the refused rerun rewrote the bench's bench.yaml to its own config)
    refused(["bench", str(tmp_path / "b.yaml"), "--no-progress",
             'arms.l1.sweep={"loss.1.coefficient": [0.2]}'], capsys,
            match="arms.l1: ", unchanged=[tmp_path / "b"])
    assert (tmp_path / "b" / "results.csv").read_text() == results
    capsys.readouterr()
    assert cli.main(["bench", str(tmp_path / "b.yaml"), "--no-progress"]) == 0
    assert "already trained with this exact config" in capsys.readouterr().out
    # (fault testing: a run resumed to train longer writes its config first; interrupted
    # then, its results were the shorter run's, and the next call reused them as this config's)
    [arm_config] = (tmp_path / "b").rglob("l1/config.yaml")
    longer = yaml.safe_load(arm_config.read_text())
    longer["optim"]["total_tokens"] = 256 * 12
    arm_config.write_text(yaml.safe_dump(longer))  # what the interrupted resume left
    assert cli.main(["bench", str(tmp_path / "b.yaml"), "--no-progress",
                     "base.optim.total_tokens=3072"]) == 0
    assert "already trained" not in capsys.readouterr().out
    [cfg_json] = arm_config.parent.rglob("sae/cfg.json")
    assert json.loads(cfg_json.read_text())["jaxsae"]["steps"] == 12


def test_progress_in_a_log_file_is_plain_lines(small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXSAE_PROGRESS_SECONDS", "0")
    config = write_config(tmp_path / "c.yaml", small_data, tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["train", str(config)]) == 0  # stderr is not a terminal here
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("test: ")]
    assert len(lines) >= 6
    assert re.fullmatch(r"test: 24/24 step \(100%\) · .* step/s · log step 24 · tokens 6,144 · "
                        r"tok/s [\d,]+ · loss [\d.e+-]+ · L0 [\d.]+ · EV -?[\d.]+ · "
                        r"done in \d+s", lines[-1])
    assert sum("done in" in line for line in lines) == 1  # (fault testing: two, disagreeing)
    assert any("ETA" in line for line in lines)
    # the figures name the step they are of, which the bar's count may have passed
    logged = [re.search(r"log step (\d+) · tokens ([\d,]+)", line) for line in lines]
    assert sum(m is not None for m in logged) >= 2
    assert all(int(m[2].replace(",", "")) == 256 * int(m[1]) for m in logged if m)
    capsys.readouterr()
    (tmp_path / "run").rename(tmp_path / "first")
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    # a value that is not a number of seconds is refused before any work (fault testing:
    # 'abc' fell back to the default, 'nan' and -1 printed a line at every step)
    for bad in ("abc", "nan", "-1"):
        monkeypatch.setenv("JAXSAE_PROGRESS_SECONDS", bad)
        refused(["train", str(config)], capsys, unchanged=[tmp_path / "run"],
                match=f"JAXSAE_PROGRESS_SECONDS: '{bad}' is not a number of seconds (0 or more)")


def test_eval_prints_strict_json():
    from jaxsae.outputs import json_text

    text = json_text({"mse": float("nan"), "ev": [1.0, float("inf")], "n": 3})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "mse": None, "ev": [1.0, None], "n": 3}


def test_help_shows_no_empty_defaults(capsys):
    from jaxsae.commands import registry
    from jaxsae.data.synthetic import GENERATORS

    commands, _ = registry()
    for words in [*commands, *(("synth", kind) for kind in GENERATORS)]:
        with pytest.raises(SystemExit):
            cli.main([*words, "--help"])
        text = capsys.readouterr().out
        assert text.startswith(f"usage: jaxsae {' '.join(words)}"), text
        for empty in ("(default: None)", "(default: False)", "(default: )"):
            assert empty not in text, (words, empty)


def test_sigterm_message_does_not_mention_ctrl_c(capsys):
    from jaxsae.interrupts import SignalFlag

    flag = SignalFlag()
    try:
        flag._handle(signal.SIGTERM, None)
    finally:
        flag.restore()
    err = capsys.readouterr().err
    # one line, with no blank line before it where no progress bar is drawn (a log file)
    assert err == "SIGTERM: saving a checkpoint after this step\n"


def test_the_lm_extra_brings_what_gguf_loading_needs():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extra = " ".join(project["project"]["optional-dependencies"]["lm"])
    assert all(name in extra for name in ("torch", "transformers", "gguf", "accelerate"))


def test_config_defaults_are_auto():
    cfg = load_config(None, ["data.path=d"])
    assert cfg.optim.warmup_steps == "auto" and cfg.data.eval_tokens == "auto"


def test_sigterm_outside_training_removes_what_was_being_written(tmp_path, capsys,
                                                                 monkeypatch):
    """(fault testing: SIGTERM during synth exited -15 with no message and left DIR.partial)"""
    from jaxsae import cli, interrupts
    from jaxsae.data import synthetic

    def terminated(*args, **kwargs):  # SIGTERM arrives while a block is drawn
        interrupts.raise_terminated(signal.SIGTERM, None)

    monkeypatch.setattr(synthetic, "block_rows", terminated)
    assert cli.main(["synth", "--out", str(tmp_path / "s"), "superposition", "--tokens",
                     "64"]) == 128 + signal.SIGTERM
    assert "jaxsae synth: terminated (SIGTERM)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory


def test_sigterm_while_the_command_line_is_read(monkeypatch, capsys):
    """(fault testing: SIGTERM in a command's first ~2 s, while its modules were imported,
    printed a traceback and exited 1)"""
    from jaxsae import interrupts

    def parse(argv):
        interrupts.raise_terminated(signal.SIGTERM, None)

    monkeypatch.setattr(cli, "parse", parse)
    assert cli.main(["train", "x.yaml"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "jaxsae: terminated (SIGTERM)"


def test_a_sigterm_whose_exception_was_lost_stops_training_at_its_first_step(
        small_data, tmp_path, capsys):
    """(fault testing: a SIGTERM that arrived while JAX ran a garbage-collection callback was
    printed as 'Exception ignored' and lost: the run trained to its end and exited 0)"""
    from jaxsae import interrupts

    config = write_config(tmp_path / "c.yaml", small_data, tmp_path / "run")
    with pytest.raises(interrupts.Terminated):  # raised where nobody handles it
        interrupts.raise_terminated(signal.SIGTERM, None)
    try:  # cli.main starts a new command (clears it): run the command without it
        from jaxsae.commands.train import Train
        from jaxsae.hooks import Interrupted

        with pytest.raises(Interrupted, match="interrupted by SIGTERM at step 1;") as stopped:
            Train(config=str(config), no_progress=True).run()
        assert stopped.value.exit_code == 128 + signal.SIGTERM
        assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
    finally:
        interrupts.clear_terminated()


def test_yaml_on_and_off_are_the_words_they_were(tmp_path):
    """(fault testing: `distributed: on`, as the docs write it, was refused: YAML 1.1 reads a
    bare on / off as a boolean)"""
    (tmp_path / "c.yaml").write_text("distributed: on\ndata: {path: d}\n")
    assert load_config(tmp_path / "c.yaml").distributed == "on"
    assert load_config(None, ["data.path=d", "distributed=off"]).distributed == "off"


def test_a_launch_jax_cannot_join_is_one_line(monkeypatch, capsys):
    """(fault testing: SLURM variables without srun, or `distributed: on` outside a cluster,
    ended in a traceback: 'coordinator_address should be defined')"""
    import jax

    from jaxsae import processes
    from jaxsae.errors import ConfigError

    def initialize(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(ConfigError, match=r"SLURM_JOB_ID is set .* cannot start: "
                       r"coordinator_address should be defined\. Launch every process"):
        processes.initialize_distributed("auto")
    # a coordinator port another program holds (fault testing: the advice above, which did
    # not apply)

    def taken(**kwargs):
        raise RuntimeError("UNKNOWN: Failed to start RPC server")

    monkeypatch.setattr(jax.distributed, "initialize", taken)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:23466")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ConfigError, match=r"the coordinator \(127\.0\.0\.1:23466\) cannot "
                                          r"listen: .* \(its port in use\?\)"):
        processes.initialize_distributed("auto")
    # processes of different device counts (fault testing: a traceback from a gather)
    monkeypatch.setattr(jax, "device_count", lambda: 3)
    monkeypatch.setattr(jax, "local_device_count", lambda: 2)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"3 devices over 2 processes, 2 on process 0: every "
                                          r"process needs the same number"):
        processes.check_even_devices()


def test_a_grouped_command_names_its_subcommand_in_errors(tmp_path, capsys):
    assert cli.main(["data", "inspect", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("jaxsae data inspect: error: ")


def test_a_short_batchtopk_run_exports_the_l0_it_trained_at(small_data, tmp_path):
    """(fault testing: the inference threshold averaged the first 100 batches, so a run of
    ~100-300 steps exported a threshold of its first steps: L0 2.1 at k 8 after 117 steps)"""
    from jaxsae.train import train
    from tests.conftest import small_config

    cfg = small_config(small_data, tmp_path / "run", loss=[{"term": "mse"}],
                       sae={"d_sae": 64, "activation": "batchtopk", "k": 4},
                       optim={"total_tokens": 256 * 60, "lr": 1e-2})
    result = train(cfg, progress=False)
    assert result.eval["l0"] == pytest.approx(4, rel=0.15), result.eval["l0"]


def test_a_lost_signal_exception_is_not_printed(monkeypatch):
    """A Terminated or KeyboardInterrupt raised where Python can only report it (a finalizer)
    prints nothing: the command's one-line message is the only one. Other such exceptions are
    still reported."""
    import sys
    import types

    from jaxsae import interrupts

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        interrupts.install_signal_handlers()
        assert signal.getsignal(signal.SIGTERM) is interrupts.raise_terminated
        assert signal.getsignal(signal.SIGINT) is interrupts.raise_interrupted
        for error in (interrupts.Terminated(), KeyboardInterrupt(), ValueError("kept")):
            sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error,
                                                     exc_traceback=None, err_msg=None,
                                                     object=None))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert [type(u.exc_value) for u in seen] == [ValueError]


def test_a_lost_ctrl_c_still_stops_the_command_before_it_publishes(tmp_path, capsys,
                                                                    monkeypatch):
    """(fault testing: a Ctrl-C raised inside JAX's garbage-collection callback was printed as
    'Exception ignored' and lost: analyze ran on, exited 0 and replaced its output)"""
    from jaxsae import cli, interrupts
    from jaxsae.data import synthetic

    real = synthetic.block_rows

    def interrupted_in_a_callback(*args, **kwargs):  # the exception goes nowhere
        with contextlib.suppress(KeyboardInterrupt):
            interrupts.raise_interrupted(signal.SIGINT, None)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "block_rows", interrupted_in_a_callback)
    assert cli.main(["synth", "--out", str(tmp_path / "s"), "superposition", "--tokens",
                     "64", "--no-progress"]) == 130
    assert "jaxsae synth: aborted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory
    assert interrupts.pending() == 0


def test_a_reader_that_stops_early_ends_the_command_quietly(small_data):
    """`jaxsae data inspect DIR | head`: no 'Broken pipe' error line, SIGPIPE's status."""
    import os
    import subprocess
    import sys

    from tests.faults.conftest import ROOT

    # (and `jaxsae synth superposition --help | head`: the help is printed while the command
    # line is read, before any command runs)
    for argv in (["data", "inspect", str(small_data), "--no-progress"],
                 ["synth", "superposition", "--help"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxsae.cli", *argv], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env={**os.environ, "JAXSAE_HUGE_PAGES": "0", "PYTHONPATH": str(ROOT)})
        proc.stdout.close()  # before it prints anything (starting takes seconds)
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, (argv, err)
        assert err == "", argv


def test_a_signal_during_the_last_save_stops_before_the_export(small_data, tmp_path, capsys,
                                                               monkeypatch):
    """(fault testing: SIGTERM while the final checkpoint was written was acknowledged, and
    the run then evaluated, exported and exited 0.) It stops with 143 and the checkpoint;
    the same command again exports."""
    import os

    from jaxsae.checkpoint import Checkpointer

    config = write_config(tmp_path / "c.yaml", small_data, tmp_path / "run")
    real = Checkpointer.save

    def save(self, step, *args, **kwargs):
        real(self, step, *args, **kwargs)
        if step == 24:  # the last step's checkpoint
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Checkpointer, "save", save)
    assert cli.main(["train", str(config), "--no-progress"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    # no "error:": a stop asked for (fault testing: it alarmed readers of cluster logs)
    assert "jaxsae train: interrupted by SIGTERM after the last step (24)" in err
    assert "evaluate and export" in err
    assert not (tmp_path / "run" / "sae").exists()
    assert (tmp_path / "run" / "checkpoints" / "24").is_dir()
    monkeypatch.setattr(Checkpointer, "save", real)
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    assert (tmp_path / "run" / "sae" / "cfg.json").is_file()


def test_a_resumed_run_says_when_its_log_lacks_steps(run_copy, small_data, tmp_path, capsys):
    """(fault testing: a metrics.jsonl deleted, or with a damaged line, was rewritten without
    those steps and not a word said)"""
    config = write_config(tmp_path / "c.yaml", small_data, run_copy)
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")
    capsys.readouterr()
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    assert (f"{metrics}: dropped 1 line(s) that do not read as JSON metrics"
            in capsys.readouterr().out)
    assert metrics.read_text().splitlines() == lines[1:]
    metrics.unlink()
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    assert (f"{metrics}: not found; the resumed run logs the steps after 24 only"
            in capsys.readouterr().out)


def test_ctrl_c_after_the_last_step_says_the_command_continues(run_copy, small_data, tmp_path,
                                                               capsys, monkeypatch):
    """(fault testing: a Ctrl-C while a finished run evaluated and exported said only
    "aborted", where the same command finishes it)"""
    from jaxsae import export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    config = write_config(tmp_path / "c.yaml", small_data, run_copy)
    monkeypatch.setattr(export, "export_sae", interrupted)
    capsys.readouterr()
    assert cli.main(["train", str(config), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().endswith(
        "jaxsae train: aborted; run the same command again to continue where it stopped")
    monkeypatch.undo()
    assert cli.main(["train", str(config), "--no-progress"]) == 0


def test_the_progress_rate_leaves_out_what_came_before_the_first_step(monkeypatch):
    """(fault testing: the first step's compile counted in the rate: a 13 s run's first line
    said ETA 3h53m)"""
    import io

    from jaxsae import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    monkeypatch.setenv("JAXSAE_PROGRESS_SECONDS", "0")
    out = io.StringIO()
    bar = progress.Progress(total=100, desc="run", unit="step", stream=out)
    now[0] = 100.0  # the first step, after a 100 s compile: no pace yet to tell, no ETA
    bar.update(1)
    now[0] = 101.0  # 10 steps in 1 s
    bar.update(10)
    lines = out.getvalue().splitlines()
    assert lines[0] == "run: 1/100 step (1%)"
    assert lines[1] == "run: 11/100 step (11%) · 10 step/s · ETA 9s"


def test_the_progress_throughput_is_steady_across_a_checkpoint(monkeypatch):
    """(fault testing: the bar's tok/s was the last log interval's, 14k in one holding a
    checkpoint's save and 653k in the next, beside a steady step/s) It is the tokens a second
    over the last span_s seconds of logged steps."""
    from jaxsae import hooks

    now = [0.0]
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: now[0])

    class Bar:
        n, postfix = 0, {}

        def update(self, k):
            self.n += k

        def set_postfix(self, values, refresh=True):
            self.postfix = values

    display = hooks.ProgressDisplay(Bar())
    now[0] = 50.0  # step 1's end (after its compile)
    display.on_step(1)
    shown = []
    for done, at, window_rate in ((11, 51.0, 40960.0), (21, 61.0, 4096.0),  # a save: 9 s
                                  (31, 61.1, 409600.0), (41, 62.1, 40960.0)):
        now[0] = at
        display.on_step(done)
        display.on_log(done, [{"tokens": done * 4096, "tokens_per_s": window_rate,
                               "loss": 1.0, "l0": 3.0, "explained_variance": 0.5}])
        shown.append(display.bar.postfix["tok/s"])
    assert shown == [f"{r:,.0f}" for r in (40960, 20 * 4096 / 11, 30 * 4096 / 11.1,
                                           40 * 4096 / 12.1)]
    now[0] = 62.1 + display.span_s + 1  # later marks drop the oldest beyond the span
    display.on_log(51, [{"tokens": 51 * 4096, "tokens_per_s": 1.0, "loss": 1.0, "l0": 3.0,
                         "explained_variance": 0.5}])
    assert display.bar.postfix["tok/s"] == f"{10 * 4096 / (display.span_s + 1):,.0f}"


def test_a_refused_resume_says_nothing_else(run_copy, small_data, tmp_path, capsys):
    """(fault testing: "data: optim.total_tokens ... passes over the training tokens N times"
    came before the refusal of a changed config)"""
    config = write_config(tmp_path / "c.yaml", small_data, run_copy, sae={"d_sae": 32},
                          optim={"total_tokens": 256 * 100})
    capsys.readouterr()
    assert cli.main(["train", str(config), "--no-progress"]) == 2
    said = capsys.readouterr()
    assert "cannot resume with a changed sae.d_sae" in said.err
    assert "passes over" not in said.out


def test_a_run_from_before_auto_resumes_as_it_was_trained(small_data, tmp_path, capsys):
    """A run trained with other defaults than today's (here free rows started from a bias of
    0, 0.2.0's, and no normalising, before 0.2.0), its config leaving them unset, resumes as
    it was trained, saying so (it was refused: the defaults had changed under it); a config
    that sets another value is still refused."""
    run = tmp_path / "run"
    before = small_config_dict(small_data, run, sae={"d_sae": 32, "decoder_norm": "free",
                                                     "init_l0": None},
                               optim={"total_tokens": 256 * 8})
    (tmp_path / "before.yaml").write_text(yaml.safe_dump(before))
    assert cli.main(["train", str(tmp_path / "before.yaml"), "--no-progress"]) == 0

    after = small_config_dict(small_data, run, sae={"d_sae": 32},
                              optim={"total_tokens": 256 * 16})
    after["sae"].pop("decoder_norm")
    after["data"].pop("normalize")  # (and init_l0 is not given)
    (tmp_path / "after.yaml").write_text(yaml.safe_dump(after))
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "after.yaml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (f"{run}: resuming as its checkpoints were trained, with sae.decoder_norm: free "
            "(auto now gives unit), data.normalize: none (auto now gives "
            "unit_mean_squared_norm); set them in the config to choose") in out
    assert "init_l0" not in out  # (the start's, kept without a word: it sets step 0 alone)
    assert f"resuming {run} from step 8" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["sae"]["decoder_norm"], saved["sae"]["init_l0"],
            saved["data"]["normalize"]) == ("free", None, "none")

    refused(["train", str(tmp_path / "after.yaml"), "--no-progress",
             "sae.decoder_norm=unit", "optim.total_tokens=6144"], capsys,
            match="cannot resume with a changed sae.decoder_norm ('free' in the checkpoint, "
                  "'unit' now)", unchanged=[run])
    # a resume refused for another key says that alone (fault testing: the note came first)
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "after.yaml"), "--no-progress",
                     "sae.d_sae=48", "optim.total_tokens=6144"]) == 2
    said = capsys.readouterr()
    assert "cannot resume with a changed sae.d_sae" in said.err and said.out == ""
    # data.lanes, left to auto, follows the batch size there too: the batch alone is named
    assert cli.main(["train", str(tmp_path / "after.yaml"), "--no-progress",
                     "optim.batch_size=4", "optim.total_tokens=6144"]) == 2
    assert ("a changed optim.batch_size (256 in the checkpoint, 4 now); restore it"
            in capsys.readouterr().err)
    # what the checkpoints were trained with is read from them, not from config.yaml
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(
        "normalize: none", "normalize: auto"))
    assert cli.main(["train", str(tmp_path / "after.yaml"), "--no-progress",
                     "optim.total_tokens=6144"]) == 0
    assert "data.normalize: none (auto now gives" in capsys.readouterr().out
    # a bench compares an arm as its config states it (the tables name no value it took)
    from jaxsae.config import config_from_dict
    from jaxsae.errors import JaxsaeError
    from jaxsae.train import train

    with pytest.raises(JaxsaeError, match=re.escape(
            "cannot resume with a changed data.normalize ('none' in the checkpoint, "
            "'unit_mean_squared_norm' now: what auto gives since jaxsae 0.2.0), "
            "sae.decoder_norm ('free' in the checkpoint, 'unit' now: what auto gives since "
            "jaxsae 0.3.0); restore them")):
        train(config_from_dict({**after, "optim": {**after["optim"], "total_tokens": 8192}}),
              progress=False, resume_as_trained=False)


def test_an_import_keeps_the_decoder_rows_its_source_trained_with(small_data, tmp_path):
    """(fault testing: a TopK SAE trained with unit rows on normalised inputs exports rows of
    norm 1/s, and `import` wrote decoder_norm free from their lengths)"""
    tree = small_config_dict(small_data, tmp_path / "run", sae={
        "d_sae": 32, "activation": "topk", "k": 4, "decoder_norm": "unit"},
        loss=[{"term": "mse"}])
    tree["data"]["normalize"] = "unit_mean_squared_norm"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    assert cli.main(["import", str(tmp_path / "run" / "sae"), "--out", str(tmp_path / "ft"),
                     "--data", str(small_data), "optim.total_tokens=2048"]) == 0
    written = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert written["sae"]["decoder_norm"] == "unit"
    assert written["data"]["normalize"] == "unit_mean_squared_norm"
    assert "assumed" not in (tmp_path / "ft" / "config.yaml").read_text()
    assert cli.main(["train", str(tmp_path / "ft" / "config.yaml"), "--no-progress",
                     "log.curves=false"]) == 0  # (curves: drawn where tested)
    # an export of jaxsae before 0.2.0 does not say: the config says what it assumed (review)
    import json

    cfg_json = tmp_path / "run" / "sae" / "cfg.json"
    cfg = json.loads(cfg_json.read_text())
    del cfg["jaxsae"]["normalize"]
    cfg_json.write_text(json.dumps(cfg))
    assert cli.main(["import", str(tmp_path / "run" / "sae"), "--out", str(tmp_path / "old"),
                     "--data", str(small_data)]) == 0
    text = (tmp_path / "old" / "config.yaml").read_text()
    assert "# data.normalize: none assumed: the source, exported by jaxsae before 0.2.0" in text
    assert yaml.safe_load(text)["data"]["normalize"] == "none"


def test_a_topk_run_from_before_auto_resumes_with_its_l1_term(small_data, tmp_path, capsys):
    """Until 0.2.0 a config without `loss` trained TopK with the L1 term too; such a run
    resumes with it (and its other defaults of then), saying so."""
    run = tmp_path / "run"
    before = small_config_dict(small_data, run, optim={"total_tokens": 256 * 8},
                               sae={"d_sae": 32, "activation": "topk", "k": 4,
                                    "decoder_norm": "unit"},
                               loss=[{"term": "mse"}, {"term": "l1", "coefficient": 5.0}])
    (tmp_path / "before.yaml").write_text(yaml.safe_dump(before))
    assert cli.main(["train", str(tmp_path / "before.yaml"), "--no-progress"]) == 0
    after = {**before, "optim": {**before["optim"], "total_tokens": 256 * 16},
             "sae": {"d_sae": 32, "activation": "topk", "k": 4}}
    del after["loss"]
    after["data"] = {k: v for k, v in before["data"].items() if k != "normalize"}
    (tmp_path / "after.yaml").write_text(yaml.safe_dump(after))
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "after.yaml"), "--no-progress"]) == 0
    assert ("resuming as its checkpoints were trained, with loss: [mse, l1 5] (auto now gives "
            "[mse]), data.normalize: none (auto now gives unit_mean_squared_norm)"
            ) in capsys.readouterr().out


def test_a_resume_keeps_the_start_it_had(small_data, tmp_path, capsys):
    """`sae.init_l0` sets the first step alone: a resume keeps the checkpoint's (in config.yaml
    too) and is never refused for it (a review: a topk run resumed with init_l0 null, and a
    bench's arms trained before 0.3.0, were refused though nothing would differ); a value the
    config sets otherwise is said."""
    from jaxsae.config import config_from_dict
    from jaxsae.train import train

    run = tmp_path / "run"
    tree = small_config_dict(small_data, run, sae={"d_sae": 32, "activation": "topk", "k": 4,
                                                   "decoder_norm": "unit", "init_l0": None},
                             loss=[{"term": "mse"}], optim={"total_tokens": 256 * 8})
    train(config_from_dict(tree), progress=False)
    longer = {**tree, "optim": {**tree["optim"], "total_tokens": 256 * 12}}
    longer["sae"] = {k: v for k, v in tree["sae"].items() if k != "init_l0"}  # (auto)
    said = []
    # (as a bench resumes its arms: keys left to auto compared as if set)
    assert train(config_from_dict(longer), progress=False, log=said.append,
                 resume_as_trained=False).step == 12
    assert not any("init_l0" in line for line in said), said
    assert yaml.safe_load((run / "config.yaml").read_text())["sae"]["init_l0"] is None
    relu = small_config_dict(small_data, tmp_path / "relu", sae={"d_sae": 32},
                             optim={"total_tokens": 256 * 8})
    train(config_from_dict(relu), progress=False)
    relu["sae"]["init_l0"] = 5
    # (16 steps: the step test_a_run_from_before_auto_resumes_as_it_was_trained resumes to,
    # read from the compilation cache where it ran first, as the 8 above)
    relu["optim"]["total_tokens"] = 256 * 16
    said = []
    assert train(config_from_dict(relu), progress=False, log=said.append).step == 16
    assert (f"{tmp_path / 'relu'}: sae.init_l0 5 sets a start, and the run started with auto: "
            "kept") in said
    assert yaml.safe_load((tmp_path / "relu" / "config.yaml").read_text())["sae"][
        "init_l0"] == "auto"


def test_a_refused_resume_names_what_auto_gives():
    """(where the run's config.yaml cannot tell what the checkpoints were trained with)"""
    from jaxsae.checkpoint import check_resume_compatible
    from jaxsae.config import UNIT_ROW_L1

    saved = load_config(None, ["data.path=d", "sae.decoder_norm=free"])
    with pytest.raises(Exception, match=re.escape(
            "cannot resume with a changed sae.decoder_norm ('free' in the checkpoint, 'unit' "
            "now: what auto gives since jaxsae 0.3.0), loss.1.coefficient (5.0 in the "
            f"checkpoint, {UNIT_ROW_L1} now: what auto gives since jaxsae 0.3.0); restore")):
        check_resume_compatible(saved, load_config(None, ["data.path=d"]), Path("run"))
    # an override editing the default terms: where their coefficient came from (a review:
    # "2.0 now", which nobody wrote)
    with pytest.raises(Exception, match=re.escape(
            f"loss.1.coefficient (5.0 in the checkpoint, {UNIT_ROW_L1} now: the default terms "
            "for unit decoder rows, edited)")):
        check_resume_compatible(saved, load_config(None, ["data.path=d",
                                                          "loss.l1.warmup_steps=0"]),
                                Path("run"))
    # another activation's default rows and loss have not changed since 0.2.0 (a review)
    saved = load_config(None, ["data.path=d", "sae.activation=jumprelu",
                               "sae.decoder_norm=unit"])
    with pytest.raises(Exception, match=re.escape(
            "sae.decoder_norm ('unit' in the checkpoint, 'free' now: what auto gives since "
            "jaxsae 0.2.0)")):
        check_resume_compatible(saved, load_config(None, ["data.path=d",
                                                          "sae.activation=jumprelu"]),
                                Path("run"))
    # a checkpoint saved before sae.init_l0 existed started from a bias of 0: read as null
    from jaxsae.checkpoint import _as_started

    tree = saved.to_dict()
    del tree["sae"]["init_l0"]
    assert _as_started(tree)["sae"]["init_l0"] is None and "init_l0" not in tree["sae"]
    assert _as_started(saved.to_dict()) == saved.to_dict()


def test_a_run_with_auto_ramps_is_extended_on_resume(small_data, tmp_path, capsys):
    """A loss term's `warmup_steps: auto` (the default L1's) is resolved for the run's length
    when the step is built: a run extended on resume ramps for its new length, as its learning
    rate does (review: 0.2.0 resolved it when the config was read, so a longer
    optim.total_tokens changed the loss and a bench arm extended that way was refused);
    a checkpoint of 0.2.0, which kept the resolved ramp, is the same run."""
    from jaxsae.checkpoint import check_resume_compatible
    from jaxsae.config import config_from_dict
    from jaxsae.errors import JaxsaeError
    from jaxsae.train import train

    run = tmp_path / "run"
    # (the default loss's L1 coefficient with free rows, 5.0: the runs of the default loss
    # at the end train the same steps, read from the compilation cache)
    tree = small_config_dict(small_data, run, sae={"d_sae": 32},
                             loss=[{"term": "mse"}, {"term": "l1", "coefficient": 5.0,
                                                     "warmup_steps": "auto"}],
                             optim={"batch_size": 64, "total_tokens": 64 * 40},
                             checkpoint={"every_steps": 20})  # (the resumes need no other saves)
    cfg = config_from_dict(tree)
    assert cfg.loss[1].warmup_steps == "auto" and cfg.resolved_loss[1].warmup_steps == 2
    train(cfg, progress=False, resume_as_trained=False)
    longer = config_from_dict({**tree, "optim": {**tree["optim"], "total_tokens": 64 * 80}})
    assert longer.resolved_loss[1].warmup_steps == 4
    said = []
    assert train(longer, progress=False, resume_as_trained=False, log=said.append).step == 80
    assert any(line.startswith(f"resuming {run} from step 40") for line in said), said
    exported = json.loads((run / "sae" / "cfg.json").read_text())["jaxsae"]
    assert exported["loss"][1]["warmup_steps"] == 4  # what it trained with
    # 0.2.0 saved the ramp resolved: resumable by the config that says auto, extended or not
    saved = config_from_dict({**tree, "loss": [{"term": "mse"}, {"term": "l1",
                                               "coefficient": 5.0, "warmup_steps": 2}]})
    check_resume_compatible(saved, cfg, run)
    check_resume_compatible(saved, longer, run)
    with pytest.raises(JaxsaeError, match=re.escape("cannot resume with a changed loss")):
        check_resume_compatible(saved, config_from_dict({**tree, "loss": [
            {"term": "mse"}, {"term": "l1", "coefficient": 5.0, "warmup_steps": 3}]}), run)
    with pytest.raises(JaxsaeError, match=re.escape(  # (a ramp of 0 read "null now")
            "changed loss.1.warmup_steps (2 in the checkpoint, 0 now)")):
        check_resume_compatible(cfg, config_from_dict({**tree, "loss": [
            {"term": "mse"}, {"term": "l1", "coefficient": 5.0}]}), run)
    # a run extended while still inside the new length's ramp says the ramp moved (said as
    # it resumes: the extended run stops at its first batch, not 1920 steps and 240 saves on;
    # the run above, at step 80 with its ramp of 4, extended to 2000 steps: a ramp of 100)
    said = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config_from_dict({**tree, "optim": {**tree["optim"], "total_tokens": 64 * 2000}}),
              progress=False, resume_as_trained=False, log=said.append,
              make_loader=watched_loader(crash_at=0))
    assert ("warm-ups: loss.l1.warmup_steps now 100 steps (was 4), for the new length: from "
            "step 80 they ramp on to the end of the new warm-up (from below where they were)"
            ) in said, said
    # the default loss, left unset, resumes extended without a note that it kept anything
    del tree["loss"]
    tree["run_dir"] = str(tmp_path / "default")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(tmp_path / "d.yaml"), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "d.yaml"), "--no-progress",
                     "optim.total_tokens=5120"]) == 0
    out = capsys.readouterr().out
    assert "from step 40" in out and "as its checkpoints were trained" not in out, out


def test_many_passes_over_small_data_say_how_to_train_one(small_data, tmp_path):
    """(fault testing: a run given only its data set out to pass over 8k tokens 12,848 times,
    for 7 hours, said in one line that did not say what to change.) From 10 passes on, the
    line gives the optim.total_tokens of one pass."""
    from jaxsae.config import config_from_dict
    from jaxsae.train import train

    for steps, hint in ((1000, True), (100, False)):
        cfg = config_from_dict(small_config_dict(
            small_data, tmp_path / f"run{steps}",
            optim={"batch_size": 256, "total_tokens": 256 * steps}))
        said = []
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg, progress=False, log=said.append, make_loader=watched_loader(crash_at=0))
        lines = [line for line in said if "passes over" in line]
        assert len(lines) == 1, said
        found = re.search(r"passes over the ([\d,]+) training tokens [\d.,]+ times"
                          r"(?: \(one pass: optim\.total_tokens=(\d+)\))?$", lines[0])
        assert found and bool(found.group(2)) == hint, lines[0]
        if hint:
            n_train = int(found.group(1).replace(",", ""))
            assert int(found.group(2)) == n_train // 256 * 256
