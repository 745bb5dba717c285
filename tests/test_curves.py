"""Training curves: curves.png redrawn from metrics.jsonl at every checkpoint, a sweep's SAEs
overlaid, `jaxsae plot` for several runs, and a drawing failure that never stops training.
Trackers (wandb, TensorBoard) are tested for real in tests/interop/test_trackers.py; here,
only that one without its package is refused."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from jaxsae import cli, curves
from jaxsae.errors import DataError
from jaxsae.outputs import save_figure
from jaxsae.train import train
from tests.conftest import small_config, small_config_dict, train_until_crash

PNG = b"\x89PNG\r\n\x1a\n"
CURVES_ON = {"every_steps": 4, "curves": True}


def _record_plots(monkeypatch) -> list:
    calls = []
    draw = curves.plot

    def record(series, out, title=""):
        calls.append((out, [(label, [line["step"] for line in lines]) for label, lines in series]))
        return draw(series, out, title=title)

    monkeypatch.setattr(curves, "plot", record)
    return calls


def test_drawing_leaves_the_caller_s_matplotlib_as_it_was(tmp_path):
    """(fault testing: every training run switched a notebook's backend to Agg, and its own
    plots stopped showing) Drawn outside pyplot: its backend and figures are untouched."""
    import subprocess
    import sys

    code = f"""
import matplotlib; matplotlib.use("svg")
import matplotlib.pyplot as plt
from pathlib import Path
from jaxsae import curves
lines = [{{"step": s, "tokens": 8 * s, "loss": 1.0 / s, "l0": 3.0}} for s in (1, 2, 3)]
curves.plot([("a", lines), ("b", lines)], Path({str(tmp_path / "c.png")!r}), title="t")
print(matplotlib.get_backend(), plt.get_fignums())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "svg []"
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG


def test_curves_are_redrawn_at_every_checkpoint(small_data, tmp_path, monkeypatch):
    monkeypatch.setattr(curves.CurvesHook, "min_interval_s", 0.0)
    calls = _record_plots(monkeypatch)
    cfg = small_config(small_data, tmp_path / "run", log=CURVES_ON)
    train_until_crash(cfg, at_batch=12)  # after the checkpoint of step 8
    assert calls == [(tmp_path / "run" / "curves.png", [("test", [4, 8])])]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == PNG
    train(cfg, progress=False)  # resumes from 8: the lines logged after it were dropped
    steps = [4, 8, 12, 16, 20, 24]
    assert [c[1] for c in calls[1:]] == [[("test", steps[:4])], [("test", steps)]]


def test_a_drawing_the_file_system_refused_is_tried_again(small_data, tmp_path, monkeypatch):
    """(fault testing: a disk full for a moment switched the curves off for the rest of the
    run, which ended with the curves.png of its first steps)"""
    monkeypatch.setattr(curves.CurvesHook, "min_interval_s", 0.0)
    draw, calls = curves.plot, []

    def full_at_first(series, out, title=""):
        calls.append([line["step"] for line in series[0][1]])
        if len(calls) == 1:
            raise OSError(28, "No space left on device", str(out))
        return draw(series, out, title=title)

    monkeypatch.setattr(curves, "plot", full_at_first)
    said = []
    train(small_config(small_data, tmp_path / "run", log=CURVES_ON), progress=False,
          log=said.append)
    warnings = [line for line in said if "log.curves" in line]
    assert warnings == [f"warning: log.curves: drawing curves.png failed (cannot write "
                        f"{tmp_path / 'run' / 'curves.png'}: No space left on device); "
                        "training goes on and tries again at the next checkpoint"]
    assert calls == [[4, 8], [4, 8, 12, 16], [4, 8, 12, 16, 20, 24]]  # (8: refused)
    # the next checkpoint tries again however soon it comes, and a last drawing refused too
    # says the file is left as it was (fault testing: it promised a next checkpoint)
    monkeypatch.setattr(curves.CurvesHook, "min_interval_s", 1e9)
    calls.clear()

    def full(series, out, title=""):
        calls.append([line["step"] for line in series[0][1]])
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(curves, "plot", full)
    said.clear()
    train(small_config(small_data, tmp_path / "again", log=CURVES_ON), progress=False,
          log=said.append)
    assert calls == [[4, 8], [4, 8, 12, 16], [4, 8, 12, 16, 20, 24]]
    assert [line.split("); ")[1] for line in said if "log.curves" in line] == [
        "training goes on and tries again at the next checkpoint",
        "it is left as it was last drawn (metrics.jsonl has every number)"]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == PNG


def test_a_run_resumed_at_its_end_draws_what_a_kill_cut_short(small_data, tmp_path):
    """(fault testing: killed while drawing curves.png after its last step, a run resumed at
    that step never drew it, and kept the killed call's empty temporary file)"""
    cfg = small_config(small_data, tmp_path / "run", log=CURVES_ON)
    train(cfg, progress=False)
    run = tmp_path / "run"
    (run / "curves.png").unlink()
    (run / "eval.json").unlink()  # (what the killed call never reached)
    stale = run / f".curves.png.{socket.gethostname()}-{2**22 + 7}-0123abcd.partial"
    stale.touch()  # (pid beyond Linux's pid_max: no such process)
    train(cfg, progress=False)
    assert (run / "curves.png").read_bytes()[:8] == PNG and not stale.exists()


def test_a_sweep_draws_its_saes_together(small_data, tmp_path, monkeypatch):
    calls = _record_plots(monkeypatch)
    cfg = small_config(small_data, tmp_path / "run", log=CURVES_ON,
                       sweep={"loss.1.coefficient": [0.01, 0.3]})
    result = train(cfg, progress=False)
    labels = [label for label, _ in calls[-1][1]]
    assert labels == ["test (loss.1.coefficient=0.01)", "test (loss.1.coefficient=0.3)"]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == PNG
    assert [m.run_dir.parent for m in result.sweep] == [tmp_path / "run" / "sweep"] * 2
    assert not any((m.run_dir / "curves.png").exists() for m in result.sweep)


def test_run_series_reads_what_metrics_jsonl_holds(small_data, tmp_path):
    train(small_config(small_data, tmp_path / "run"), progress=False)
    (label, lines), = curves.run_series(tmp_path / "run")
    written = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert label == "run" and lines == written
    with pytest.raises(DataError, match=r"no metrics\.jsonl"):
        curves.run_series(tmp_path)


def test_a_failed_drawing_warns_once_and_training_goes_on(small_data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(curves, "plot", broken)
    messages = []
    result = train(small_config(small_data, tmp_path / "run", log=CURVES_ON), progress=False,
                   log=messages.append)
    assert result.step == 24
    warnings = [m for m in messages if "log.curves" in m]
    assert len(warnings) == 1 and "no fonts" in warnings[0] and "goes on" in warnings[0]


def test_plot_command_overlays_runs_and_refuses_what_it_must_not_touch(small_data, tmp_path,
                                                                       capsys, monkeypatch):
    for name in ("a", "b"):
        train(small_config(small_data, tmp_path / name), progress=False)
    out = tmp_path / "both.png"
    assert cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and "2 runs drawn" in capsys.readouterr().out
    before = out.read_bytes()
    for argv, match in [
        (["plot", str(tmp_path / "a"), "--out", str(out)], "exists"),
        (["plot", str(tmp_path / "a"), "--out", str(tmp_path / "x.jpg")], "must end with .png"),
        (["plot", str(tmp_path), "--out", str(tmp_path / "y.png")], "no metrics.jsonl"),
        (["plot", str(tmp_path / "c"), "--out", str(tmp_path / "y.png")],
         "c: does not exist (expected a jaxsae run directory)"),
        # (export too: a mistyped run was said to have no checkpoints/)
        (["export", str(tmp_path / "c"), "--out", str(tmp_path / "e")],
         "c: does not exist (expected a run directory)"),
        (["export", str(tmp_path), "--out", str(tmp_path / "e")], "no checkpoints/ directory"),
        (["plot", str(tmp_path / "a"), "--out", str(tmp_path / "plots" / "z.png")],
         "plots does not exist"),
        (["plot", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a" / "."),
          "--out", str(tmp_path / "y.png")], "given twice"),
        # never into an SAE (or any jaxsae output), nor a run's checkpoints
        (["plot", str(tmp_path / "a"), "--out", str(tmp_path / "a" / "sae" / "c.png")],
         "a jaxsae sae output"),
        (["plot", str(tmp_path / "a"), "--out", str(tmp_path / "a" / "checkpoints" / "c.png")],
         "lies inside the checkpoints of the run"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert out.read_bytes() == before and not (tmp_path / "y.png").exists()
    # a title that is not valid matplotlib math is drawn as written (it was a traceback)
    assert cli.main(["plot", str(tmp_path / "a"), "--out", str(out), "--overwrite",
                     "--title", r"lr $\foo{$ sweep"]) == 0
    # without --title, one run is named above its panels (fault testing: nowhere), several in
    # the legend
    titles, draw = [], curves.plot
    monkeypatch.setattr(curves, "plot", lambda series, path, title="": (
        titles.append((title, [label for label, _ in series])), draw(series, path, title))[1])
    for runs in (["a"], ["a", "b"]):
        assert cli.main(["plot", *(str(tmp_path / r) for r in runs), "--out", str(out),
                         "--overwrite"]) == 0
    assert titles[0][0] and titles[0] == (titles[0][1][0], titles[0][1]), titles
    assert titles[1][0] == "", titles


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None,
                    reason="this environment has the extra `wandb`")
def test_a_tracker_without_its_package_is_refused_before_any_work(small_data, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small_config_dict(
        small_data, tmp_path / "run", log={"wandb": {"project": "p"}})))
    assert cli.main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jaxsae train: error: log.wandb: needs the wandb package: "
                   "pip install 'jaxsae[wandb]'")
    assert not (tmp_path / "run").exists()


def test_checkpoints_in_quick_succession_draw_once_a_minute_and_at_the_end(small_data, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(curves.CurvesHook, "min_interval_s", 1e9)  # no clock in the test
    calls = _record_plots(monkeypatch)
    train(small_config(small_data, tmp_path / "run", log=CURVES_ON), progress=False)
    assert [c[1] for c in calls] == [[("test", [4, 8])], [("test", [4, 8, 12, 16, 20, 24])]]


@pytest.mark.parametrize("n", [12, 45])
def test_the_legend_names_every_run_of_an_overlay(tmp_path, monkeypatch, n):
    """(fault testing: the legend was cut at 16 runs × terms entries, so most SAEs of a sweep
    or a bench had none, and runs past the 10th reused the first colours)"""
    lines = [{"step": s, "tokens": 8 * s, "loss": 1.0 / s, "loss.mse": 0.8 / s,
              "loss.l1": 0.2 / s, "l0": 3.0} for s in (1, 2, 3)]
    series = [(f"run {i}", lines) for i in range(n)]
    drawn = {}

    def keep(fig, path, **kwargs):
        drawn["legend"] = [t.get_text() for t in fig.legends[0].get_texts()]
        drawn["colors"] = {line.get_color() for line in fig.axes[1].get_lines()}  # the L0s
        save_figure(fig, path, **kwargs)

    monkeypatch.setattr(curves, "save_figure", keep)
    assert curves.plot(series, tmp_path / "c.png").read_bytes()[:8] == PNG
    named = min(n, curves._LEGEND_RUNS)
    assert drawn["legend"][:named] == [f"run {i}" for i in range(named)]
    assert ("... and 5 more" in drawn["legend"]) is (n == 45)
    assert drawn["legend"][-3:] == ["loss: total", "loss: l1", "loss: mse"]
    assert len({str(c) for c in drawn["colors"]}) == n


def test_garbled_metrics_lines_are_left_out(tmp_path, monkeypatch):
    """(fault testing: tokens given as a mapping, or a value of 300-odd digits, ended plot in a
    traceback; tokens given as text were drawn on a categorical axis)"""
    path = tmp_path / "metrics.jsonl"
    good = [{"step": s, "tokens": 256 * s, "loss": 1.0 / s} for s in (1, 2, 3)]
    bad = [{"tokens": {"a": 1}, "loss": 1.0}, {"tokens": "512", "loss": 1.0},
           {"tokens": None, "loss": 1.0}, {"tokens": True, "loss": 1.0},
           {"tokens": 10**400, "loss": 1.0}, {"tokens": float("nan"), "loss": 1.0},
           {"tokens": float("inf"), "loss": 1.0}]
    path.write_text("\n".join(json.dumps(x) for x in [good[0], *bad, *good[1:]])
                    + '\n{"step": 4, "tokens": 1024, "loss": 1' + "0" * 400 + "}\n")
    lines = curves.read_metrics(path)
    assert lines[:3] == good and len(lines) == 4  # the last: its loss is left out
    drawn = {}

    def keep(fig, out, **kwargs):
        drawn["x"] = [list(line.get_xdata()) for line in fig.axes[0].get_lines()]
        save_figure(fig, out, **kwargs)

    monkeypatch.setattr(curves, "save_figure", keep)
    curves.plot([("run", lines)], tmp_path / "c.png")
    assert drawn["x"] == [[256.0, 512.0, 768.0]]


def test_a_run_of_one_logged_line_is_drawn(tmp_path, monkeypatch):
    """(fault testing: a run shorter than two log.every_steps logs one line, and a line
    through one point drew nothing: its curves.png was empty)"""
    one = [{"step": 10, "tokens": 2560, "loss": 0.5, "l0": 3.0, "explained_variance": 0.4}]
    more = [{"step": s, "tokens": 256 * s, "loss": 1.0 / s} for s in (1, 2)]
    drawn = {}

    def keep(fig, path, **kwargs):
        drawn["markers"] = [line.get_marker() for line in fig.axes[0].get_lines()]
        drawn["points"] = [len(line.get_xdata()) for line in fig.axes[0].get_lines()]
        save_figure(fig, path, **kwargs)

    monkeypatch.setattr(curves, "save_figure", keep)
    curves.plot([("one", one), ("more", more)], tmp_path / "c.png")
    assert drawn["points"] == [1, 2] and drawn["markers"] == ["o", "None"]


def test_non_finite_values_are_gaps_not_lines(tmp_path, monkeypatch):
    """(fault testing: metrics.jsonl writes a NaN or inf as null, and the steps a run skipped
    as non-finite were bridged by a straight line, as if measured; a NaN first made a loss
    panel linear) A null is a gap, a finite value between nulls a marker, a panel never
    finite says so."""
    values = [1.0, 0.5, None, 0.3, None, None, 0.2, 0.1]
    lines = [{"step": s, "tokens": 256 * s, "loss": v, "l0": None}
             for s, v in enumerate(values, 1)]
    lines[0]["loss"], lines[1]["loss"] = None, 0.9  # (a NaN first)
    drawn = {}

    def keep(fig, out, **kwargs):
        loss = fig.axes[0].get_lines()[0]
        drawn["y"] = [float(y) for y in loss.get_ydata()]
        drawn["markers"] = (loss.get_marker(), loss.get_markevery())
        drawn["scale"] = fig.axes[0].get_yscale()
        drawn["l0"] = [t.get_text() for t in fig.axes[1].texts]
        save_figure(fig, out, **kwargs)

    monkeypatch.setattr(curves, "save_figure", keep)
    curves.plot([("run", lines)], tmp_path / "c.png")
    assert str(drawn["y"]) == "[nan, 0.9, nan, 0.3, nan, nan, 0.2, 0.1]"
    assert drawn["markers"] == ("o", [1, 3]) and drawn["scale"] == "log"
    assert drawn["l0"] == ["never finite"]


def test_plot_of_a_bench_directory_names_its_arms(tmp_path, capsys):
    """(fault testing: a bench directory given to plot was "not a jaxsae run directory")"""
    from jaxsae.outputs import write_marker

    bench = tmp_path / "bench"
    (bench / "relu").mkdir(parents=True)
    write_marker(bench, "bench")
    assert cli.main(["plot", str(bench), "--out", str(tmp_path / "p.png")]) == 2
    assert "give the runs of its arms, once they have trained" in capsys.readouterr().err
    (bench / "relu" / "config.yaml").write_text("name: relu\n")
    assert cli.main(["plot", str(bench), "--out", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err.endswith(
        f"{bench}: a jaxsae bench directory; give the runs of its arms ({bench / 'relu'})\n")


def test_token_counts_are_short_below_the_panels(tmp_path, monkeypatch):
    """(fault testing: a run of 200k tokens had its tick labels 125000, 150000, ... run into
    one another: "175000200000") Tokens read 150k, 2.5M, 1G."""
    lines = [{"step": s, "tokens": 128 * s, "loss": 1.0 / s} for s in range(1, 1600, 50)]
    drawn = {}

    def keep(fig, out, **kwargs):
        drawn["ticks"] = [fig.axes[0].xaxis.get_major_formatter()(x, 0)
                          for x in (0, 2500, 150_000, 2.5e6, 1e9)]
        save_figure(fig, out, **kwargs)

    monkeypatch.setattr(curves, "save_figure", keep)
    curves.plot([("run", lines)], tmp_path / "c.png")
    assert drawn["ticks"] == ["0", "2.5k", "150k", "2.5M", "1G"]


@pytest.mark.filterwarnings("error::UserWarning")  # (the font's warning)
def test_plot_names_what_it_leaves_out_and_draws_no_sae_twice(small_data, tmp_path, capsys):
    """(fault testing: a run without metrics beside others was dropped unnamed; a sweep's SAE
    given with its sweep was drawn twice; a control character in a title printed a font
    warning; a run that had logged nothing yet, an import's, was "not a jaxsae run
    directory", and a sweep whose SAEs had none was left out unnamed)"""
    sweep = small_config_dict(small_data, tmp_path / "sweep", sweep={"optim.lr": [1e-3, 1e-2]})
    sweep["optim"]["total_tokens"] = 256 * 8
    from jaxsae.config import config_from_dict

    train(config_from_dict(sweep), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    started, starting = tmp_path / "started", tmp_path / "starting"
    (starting / "sweep" / "00").mkdir(parents=True)
    for run in (started, starting):
        run.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "sweep" / "config.yaml", run)
    capsys.readouterr()
    out = str(tmp_path / "p.png")
    assert cli.main(["plot", str(started), str(tmp_path / "sweep"), str(empty), str(starting),
                     "--out", out, "--title", "a\x01b"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "".join(f"note: {name}: no metrics logged yet, not drawn\n"
                                   for name in ("started", "empty", "starting"))
    assert "wrote" in captured.out and "(2 runs drawn)" in captured.out
    assert cli.main(["plot", str(tmp_path / "sweep"), str(tmp_path / "sweep" / "sweep" / "00"),
                     "--out", str(tmp_path / "q.png")]) == 2
    assert (f"RUN {tmp_path / 'sweep' / 'sweep' / '00'}: its metrics.jsonl is drawn already "
            f"(through {tmp_path / 'sweep'})") in capsys.readouterr().err


def test_a_long_series_is_drawn_from_its_extremes():
    """(fault testing: a week-long run's 200k metrics lines took 5 s a redraw, in the training
    loop) A series longer than the limit keeps, in order, the lowest and highest point of
    each run of consecutive points, and its ends: a spike is never dropped."""
    rng = __import__("numpy").random.default_rng(0)
    ys = rng.random(100_000).tolist()
    ys[31_337], ys[77_777] = 50.0, -3.0
    xs = list(range(0, 400_000, 4))
    kept_x, kept_y = curves.thin(xs, ys, limit=1000)
    assert len(kept_x) <= 1000 and kept_x == sorted(kept_x)
    assert kept_x[0] == 0 and kept_x[-1] == xs[-1]
    assert [ys[x // 4] for x in kept_x] == kept_y
    assert {(31_337 * 4, 50.0), (77_777 * 4, -3.0)} <= set(zip(kept_x, kept_y, strict=True))
    # each of the 499 runs of consecutive points keeps its own minimum and maximum
    run = [x // 4 * 499 // 100_000 for x in kept_x]
    for r in (0, 250, 498):
        inside = [y for y, s in zip(ys, [i * 499 // 100_000 for i in range(100_000)],
                                    strict=True) if s == r]
        mine = [y for y, s in zip(kept_y, run, strict=True) if s == r]
        assert min(mine) == min(inside) and max(mine) == max(inside)
    assert curves.thin([1, 2, 3], [3.0, 2.0, 1.0]) == ([1, 2, 3], [3.0, 2.0, 1.0])
    # a NaN beside a spike (a file from elsewhere: jaxsae writes null) hides neither extreme
    ys[31_338], ys[77_778] = float("nan"), float("nan")
    kept_x, kept_y = curves.thin(xs, ys, limit=1000)
    assert {(31_337 * 4, 50.0), (77_777 * 4, -3.0)} <= set(zip(kept_x, kept_y, strict=True))


def test_redrawing_takes_a_bounded_share_of_the_training(tmp_path, monkeypatch):
    """A drawing that took t seconds waits at least t / max_share before the next (the last
    checkpoint's is always drawn)."""
    clock = [1000.0]
    monkeypatch.setattr(curves.time, "monotonic", lambda: clock[0])
    hook = curves.CurvesHook(tmp_path, "t", total_steps=100, warn=print)
    drawn = []

    def draw():
        drawn.append(clock[0])
        clock[0] += 3.0  # a slow drawing: 3 s
    hook.draw = draw
    for step in range(10, 100, 10):
        hook.on_checkpoint(step)
        clock[0] += 60.0
    hook.on_checkpoint(100)
    wait = 3.0 / curves.CurvesHook.max_share
    assert drawn[0] == 1000.0
    assert all(b - a >= wait for a, b in itertools.pairwise(drawn[:-1]))
    assert len(drawn) >= 3 and drawn[-1] == clock[0] - 3.0  # the end is drawn regardless


def test_plot_refuses_a_place_it_cannot_write_before_drawing(tmp_path, capsys, monkeypatch):
    """(fault testing: plot --out in a read-only directory drew the curves, then failed naming
    its hidden staging file, `.c.png.HOST-PID.partial`, not --out.) The place is refused
    first, in one line naming --out."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 256, "loss": 1.0}))
    read_only = tmp_path / "ro"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        Path(path) != read_only and access(path, mode, **kw)))  # (root writes anywhere)

    def no_drawing(*args, **kwargs):
        raise AssertionError("drawn before --out was checked")

    monkeypatch.setattr(curves, "plot", no_drawing)
    out = read_only / "c.png"
    assert cli.main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"jaxsae plot: error: --out {out}: cannot write in {read_only} (a read-only "
                   "file system, or no permission)")
    assert list(read_only.iterdir()) == []
