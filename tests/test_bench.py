"""`jaxsae bench`: arms x swept values x seeds, trained as sweeps; tables and plots."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from jaxsae import bench, cli
from jaxsae.errors import ConfigError, JaxsaeError
from jaxsae.outputs import MARKER


def _bench_tree(tmp_path, **more):
    tree = {
        "name": "b", "out": str(tmp_path / "bench"), "seeds": [0, 1],
        "base": {
            "data": {"path": str(tmp_path / "data"), "eval_tokens": 2048,
                     "generate": {"kind": "hierarchy_small", "tokens": 12288}},
            "sae": {"d_sae": 3},
            "optim": {"lr": 1e-2, "batch_size": 256, "total_tokens": 256 * 12,
                      "warmup_steps": 1},
            # (no training curves: nothing here reads an arm's curves.png; drawn where
            # tested, test_curves.py)
            "checkpoint": {"every_steps": 100}, "log": {"every_steps": 6, "curves": False}},
        "arms": {
            "l1": {"loss": [{"term": "mse"}, {"term": "l1"}],
                   "sweep": {"loss.1.coefficient": [0.01, 0.1]}},
            "topk": {"sae": {"activation": "topk", "k": 1}, "loss": [{"term": "mse"}],
                     "sweep": [{"sae.k": 1}, {"sae.k": 2}]},
        },
    }
    tree.update(more)
    return tree


def _write(tmp_path, tree) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_arm_configs_cross_the_seeds(tmp_path):
    cfg = bench.load_bench_config(_write(tmp_path, _bench_tree(tmp_path)))
    arms = cfg.arm_configs()
    assert list(arms) == ["l1", "topk"]
    l1 = arms["l1"].sweep_configs()
    assert [(m.loss[1].coefficient, m.seed) for m in l1] == [
        (0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)]
    assert [(m.sae.k, m.seed) for m in arms["topk"].sweep_configs()] == [
        (1, 0), (1, 1), (2, 0), (2, 1)]
    assert arms["topk"].sae.d_sae == 3 and arms["topk"].sae.activation == "topk"  # merged
    assert arms["l1"].run_dir == str(tmp_path / "bench" / "l1")


def test_an_override_reaches_an_arm_whose_name_holds_dots(tmp_path):
    """(fault testing: `arms.a.b.sae.k=3` for the arm `a.b` was refused as `arms.a: b:
    unknown key`)"""
    tree = _bench_tree(tmp_path)
    tree["arms"] = {"a": {"sae": {"activation": "topk", "k": 1}}, "a.b": tree["arms"]["topk"],
                    "c.d": None}
    cfg = bench.load_bench_config(_write(tmp_path, tree), [
        "arms.a.b.sae.d_sae=5", "arms.a.b.sweep=[{sae.k: 1}, {sae.k: 3}]", "arms.a.sae.k=3",
        "arms.c.d.sae.d_sae=4"])
    arms = cfg.arm_configs()
    assert arms["a.b"].sae.d_sae == 5 and [p["sae.k"] for p in arms["a.b"].sweep.points][
        ::2] == [1, 3]
    # a key the arm's sweep sets for every SAE (a review: written, and used by none), or that
    # every arm's sweep sets, given in the base
    with pytest.raises(ConfigError, match=r"^arms\.a\.b: override arms\.a\.b\.sae\.k: the "
                                          r"sweep sets sae\.k for every SAE"):
        bench.load_bench_config(_write(tmp_path, tree), [
            "arms.a.b.sae.k=2", "arms.a.b.sweep=[{sae.k: 1}, {sae.k: 3}]"])
    with pytest.raises(ConfigError, match=r"^base: override base\.sae\.k: .* \(in every "
                                          r"arm\)$"):
        bench.load_bench_config(_write(tmp_path, tree), [
            "base.sae.k=2", "arms.a.b.sweep=[{sae.k: 1}, {sae.k: 3}]", "arms.c.d=null",
            "arms.a.sweep.sae.k=[1, 2]"])
    bench.load_bench_config(_write(tmp_path, tree), [  # (arm a sweeps no k)
        "base.sae.k=2", "arms.a.b.sweep=[{sae.k: 1}, {sae.k: 3}]", "arms.c.d=null"])
    assert arms["a"].sae.k == 3 and arms["c.d"].sae.d_sae == 4
    # an arm that is not there is named, not added (fault testing: a misspelt arm trained
    # from the base alone); a new arm is given whole
    with pytest.raises(ConfigError, match=r"override arms\.ab\.sae\.k: no arm named 'ab' "
                                          r"\(did you mean 'a\.b'\?\)"):
        bench.load_bench_config(_write(tmp_path, tree), ["arms.ab.sae.k=2"])
    cfg = bench.load_bench_config(_write(tmp_path, _bench_tree(tmp_path)),
                                  ["arms.e={sae: {d_sae: 5}}"])
    assert cfg.arm_configs()["e"].sae.d_sae == 5
    # an axis of an arm's (or the base's) sweep keeps its dots, as `jaxsae train` takes it
    # (fault testing: split at the dots, "sweep.loss: expected a list of values")
    cfg = bench.load_bench_config(_write(tmp_path, _bench_tree(tmp_path)), [
        "arms.l1.sweep.loss.1.coefficient=[0.5, 2]", "base.sweep.optim.lr=[0.01]"])
    arms = cfg.arm_configs()
    assert [p["loss.1.coefficient"] for p in arms["l1"].sweep.points][::2] == [0.5, 2]
    assert cfg.base["sweep"] == {"optim.lr": [0.01]}
    with pytest.raises(ConfigError, match=r"^override arms\.topk\.sweep\.optim\.lr: the sweep "
                                          r"there is a list of points; replace it whole with "
                                          r"arms\.topk\.sweep="):
        bench.load_bench_config(_write(tmp_path, _bench_tree(tmp_path)),
                                ["arms.topk.sweep.optim.lr=[1]"])
    # and one is left out of a run with null (fault testing: "expected a mapping")
    cfg = bench.load_bench_config(_write(tmp_path, tree), ["arms.a.b=null", "arms.c.d="])
    assert list(cfg.arm_configs()) == ["a"]
    with pytest.raises(ConfigError, match=r"override arms\.x\.y: no arm named 'x'"):
        bench.load_bench_config(_write(tmp_path, tree), ["arms.x.y=null"])


@pytest.mark.parametrize(("change", "match"), [
    ({"arms": {}}, "arms: at least one arm"),
    ({"arms": {"x": 3}}, r"arms\.x: expected a mapping"),
    ({"arms": {"x": {"sae": {"d_sea": 3}}}}, r"arms\.x: sae\.d_sea: unknown key"),
    ({"arms": {"x": {"sweep": {"seed": [1]}}}}, r"arms\.x\.sweep\.seed: set seeds"),
    ({"sedes": [1]}, r"sedes: unknown key"),
    # (fault testing: blamed on the base, "base: name: ...")
    *(({"name": name, "out": None}, rf"^name: must be a relative name below runs/ .* got "
                                    rf"{name!r}; use out")
      for name in ("../../x", "/abs", "a/./b", ".")),
    ({"name": "../../x"}, r"^name: the arms' runs are named '\.\./\.\./x'-<arm>, which must be "
                          r"relative names"),
    ({"seeds": []}, r"^seeds: at least one seed"),
    # (fault testing: blamed on the first arm, "arms.l1: sweep: SAE 1 (...) repeats SAE 0")
    ({"seeds": [0, 3, 0]}, r"^seeds: 0 is listed twice; each seed trains every arm's SAEs once$"),
    # an arm's name is a directory below out: never a path that leaves it or names it
    *(({"arms": {name: {}}}, r"an arm's name is its directory's")
      for name in ("../escaped", ".", "a/b", ".hidden")),
    ({"arms": {"x": {"run_dir": "/elsewhere"}}}, r"arms\.x\.run_dir: set by the bench"),
    # (fault testing: a seed of an arm, of the base or of a sweep point was replaced by the
    # bench's seeds without a word)
    ({"arms": {"x": {"seed": 7}}}, r"arms\.x\.seed: the bench's seeds \(top level\) set"),
    ({"base": {"seed": 7}}, r"^base\.seed: the bench's seeds"),
    ({"arms": {"x": {"sweep": [{"seed": 3}, {"sae.k": 2}]}}},
     r"arms\.x\.sweep: a point sets seed"),
    # (fault testing: a 300-character name was an OS error, after the bench's directory was made)
    ({"arms": {"x" * 300: {}}}, r"arms\.x{40}\.\.\.: .* at most 100 characters, not 300"),
    # nor one of the bench's own files (the arm would train, then its tables could not be written)
    *(({"arms": {name: {}}}, rf"arms\.{re.escape(name)}: the bench writes a file of that name")
      for name in ("results.csv", "results.md", "bench.yaml", "l0_vs_ev.png")),
    # (fault testing: `yes:`, `1:` and `null:` as arm names were a traceback, exit 1)
    *(({"arms": {name: {}}}, rf"arms\.{name}: an arm's name is text; YAML reads {name!r} as a "
                             rf"{type(name).__name__}: quote it")
      for name in (True, 1)),
])
def test_bad_bench_configs_name_the_key(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        bench.load_bench_config(_write(tmp_path, _bench_tree(tmp_path, **change)))


def test_a_fault_of_the_base_is_the_bases_and_configs_of_the_other_command_are_named(tmp_path):
    """(fault testing: base.optim.lr=-1 was reported as the first arm's; a training config
    given to bench was "data: unknown key", a bench config given to train "seeds: unknown
    key (did you mean 'seed'?)")"""
    from jaxsae.config import load_config

    path = _write(tmp_path, _bench_tree(tmp_path))
    with pytest.raises(ConfigError, match=r"^base: optim\.lr: must be > 0, got -1\.0 \(arm l1, "
                                          r"and every arm that keeps it\)$"):
        bench.load_bench_config(path, ["base.optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"^arms\.topk: optim\.lr: must be > 0"):
        bench.load_bench_config(path, ["arms.topk.optim.lr=-1"])
    # the suggested fix as the bench's command line takes it (fault testing: "e.g.
    # optim.warmup_steps=auto", which bench refuses as an unknown key)
    with pytest.raises(ConfigError, match=r"^base: optim\.warmup_steps.*\(e\.g\. "
                                          r"base\.optim\.warmup_steps=auto\) \(arm l1"):
        bench.load_bench_config(path, ["base.optim.warmup_steps=100"])
    with pytest.raises(ConfigError, match=r"^arms\.topk: optim\.warmup_steps.*\(e\.g\. "
                                          r"arms\.topk\.optim\.warmup_steps=auto\)"):
        bench.load_bench_config(path, ["arms.topk.optim.warmup_steps=100"])
    with pytest.raises(ConfigError, match=r"^override base\.optim\.lr: given twice"):  # (review:
        bench.load_bench_config(path, ["base.optim.lr=1e-3", "base.optim.lr=3e-3"])  # the last
        # was taken)
    with pytest.raises(ConfigError, match=r"^override arms\.topk: replaces what "
                                          r"arms\.topk\.optim\.lr=1e-3 set"):
        bench.load_bench_config(path, ["arms.topk.optim.lr=1e-3", "arms.topk={sae: {k: 4}}"])
    with pytest.raises(ConfigError, match=r"^override base\.loss\.1\.coefficient: the bench's "
                                          r"base gives no loss terms to edit"):  # (fault
        bench.load_bench_config(path, ["base.loss.1.coefficient=2"])  # testing: "base: loss:
        # expected a list, got dict")
    with pytest.raises(ConfigError, match=r"a bench config \(base, arms\); run it with `jaxsae "
                                          r"bench`$"):
        load_config(path)
    train_config = tmp_path / "train.yaml"
    train_config.write_text(yaml.safe_dump(_bench_tree(tmp_path)["base"]))
    with pytest.raises(ConfigError, match=r"a training config \(it has no arms:\); train it "
                                          r"with `jaxsae train`"):
        bench.load_bench_config(train_config)


def test_the_bench_directory_never_takes_somebody_elses_files(tmp_path, capsys, monkeypatch):
    from tests.faults.conftest import refused

    path = _write(tmp_path, _bench_tree(tmp_path))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "results.md").write_text("my precious results")
    (notes / "l0_vs_ev.png").write_text("my figure")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    monkeypatch.chdir(tmp_path)
    # (fault testing: a bench inside an export trained an arm there, then failed, leaving the
    # export holding files it did not write; one in a run's checkpoints/ was written whole)
    from jaxsae import outputs

    export = tmp_path / "export"
    export.mkdir()
    outputs.write_marker(export, "sae")
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for out, match in [(notes, "is not a bench directory"), (data, "which arm l1 reads"),
                       (a_file, "is a file"), (tmp_path, "working directory"),
                       (export / "b", f"lies inside {export}, a jaxsae sae output"),
                       (checkpoints / "b", "lies inside the checkpoints of the run")]:
        refused(["bench", str(path), f"out={out}", "--no-progress"], capsys, match=match,
                unchanged=[notes, data, a_file, export, checkpoints])
    # an arm's run directory holding the data it reads
    tree = _bench_tree(tmp_path)
    tree["base"]["data"]["path"] = str(tmp_path / "bench" / "l1" / "data")
    refused(["bench", str(_write(tmp_path, tree)), "--no-progress"], capsys,
            match="which arm l1 reads", unchanged=[notes])
    # a bench directory of an earlier version (no marker) is still a bench's
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    dumped = {**_bench_tree(tmp_path), "out": str(earlier)}
    (earlier / "bench.yaml").write_text(yaml.safe_dump(dumped))
    cfg = bench.load_bench_config(_write(tmp_path, dumped))
    bench.check_directory(earlier, cfg.arm_configs())  # no error


def test_an_arms_refusal_gives_advice_in_the_benchs_terms(tmp_path, capsys, monkeypatch):
    """An arm's run_dir is the bench's directory / the arm, not a key of the bench config:
    train()'s "choose another name or run_dir" is said as the bench's out or name."""
    from jaxsae import outputs
    from tests.faults.conftest import refused

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, _bench_tree(tmp_path))
    directory = tmp_path / "bench"
    directory.mkdir()
    outputs.write_marker(directory, "bench")
    (directory / "l1").mkdir()
    (directory / "l1" / "notes.txt").write_text("mine")
    err = refused(["bench", str(path), "--no-progress"], capsys,
                  match=f"arms.l1: run_dir {directory / 'l1'}: exists and is not a jaxsae "
                        "run directory",
                  unchanged=[directory / "l1"])
    assert "choose another bench directory (out, or name)" in err and "run_dir)" not in err
    assert "another name or run_dir" not in err


@pytest.mark.parametrize(("arm", "match"), [
    ({"data": {"path": "nonexistent"}}, r"nonexistent: data directory does not exist"),
    ({"data": {"eval_tokens": 16300}}, r": 16384 tokens leave 84 for training after "
                                       r"data\.eval_tokens \(16300\); need at least "
                                       r"optim\.batch_size \(256\)"),
    (None, r"run_dir \S+/z: exists and is not a jaxsae run directory"),  # (notes.txt)
])
def test_every_arm_is_checked_before_the_first_trains(tmp_path, monkeypatch, small_data, arm,
                                                      match):
    """An arm's run directory and data are checked (as train() checks them) before any arm
    trains (fault testing: an arm whose data did not exist, or whose out/<arm> held somebody
    else's files, was refused after every arm before it had trained)."""
    from jaxsae import outputs
    from jaxsae import train as train_mod

    calls = []

    def record(cfg, **kwargs):
        calls.append(cfg.run_dir)
        raise JaxsaeError("trained")

    monkeypatch.setattr(train_mod, "train", record)
    monkeypatch.chdir(tmp_path)
    tree = _bench_tree(tmp_path)
    tree["base"]["data"] = {"path": str(small_data), "eval_tokens": 2048}
    tree["arms"]["z"] = arm or {}
    directory = tmp_path / "bench"
    (directory / "z").mkdir(parents=True)
    outputs.write_marker(directory, "bench")
    if arm is None:
        (directory / "z" / "notes.txt").write_text("mine")
    with pytest.raises(JaxsaeError, match=r"^arms\.z: .*" + match):
        bench.run_bench(bench.load_bench_config(_write(tmp_path, tree)), progress=False,
                        log=lambda m: None)
    assert calls == []  # (no arm trained)
    if arm is None:
        assert (directory / "z" / "notes.txt").read_text() == "mine"


def test_a_refused_new_bench_leaves_no_directory(tmp_path, monkeypatch, small_data):
    """(fault testing: a bench refused before any arm trained left its new directory behind,
    empty but marked as a bench's.) The directory it made is removed; one that existed, and
    its parents, stay."""
    monkeypatch.chdir(tmp_path)
    tree = _bench_tree(tmp_path, out=str(tmp_path / "new" / "bench"))
    tree["base"]["data"] = {"path": str(small_data), "eval_tokens": 2048}
    tree["arms"]["z"] = {"data": {"path": str(tmp_path / "none")}}
    with pytest.raises(JaxsaeError, match=r"^arms\.z: .*does not exist"):
        bench.run_bench(bench.load_bench_config(_write(tmp_path, tree)), progress=False,
                        log=lambda m: None)
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "bench").exists()
    (tmp_path / "new" / "bench").mkdir()  # one that existed (empty) stays
    with pytest.raises(JaxsaeError, match=r"^arms\.z: "):
        bench.run_bench(bench.load_bench_config(_write(tmp_path, tree)), progress=False,
                        log=lambda m: None)
    assert (tmp_path / "new" / "bench").is_dir()


def test_a_bench_compares_its_arms_as_its_config_states_them(tmp_path, monkeypatch):
    """An arm whose checkpoints were trained with other values of keys left to `auto` is
    refused, not resumed with them (train's resume_as_trained=False): the tables would
    compare arms trained otherwise than the config says (fault testing)."""
    from jaxsae import train as train_mod

    calls = []

    def record(cfg, **kwargs):
        calls.append(kwargs)
        raise JaxsaeError("stop")

    monkeypatch.setattr(train_mod, "train", record)
    with pytest.raises(JaxsaeError, match=r"arms\.l1: stop"):
        bench.run_bench(bench.load_bench_config(_write(tmp_path, _bench_tree(tmp_path))),
                        progress=False, log=lambda m: None)
    assert calls and calls[0]["resume_as_trained"] is False


def test_pareto_frontier():
    pts = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.9), (4.0, 0.8), (0.5, 0.1)]
    assert bench.pareto_frontier(pts) == [5, 0, 2, 3]


def test_tables_and_plots_leave_out_undefined_values(tmp_path):
    """(fault testing: an SAE evaluated on tokens that do not vary has explained variance
    null, and the frontier failed on it: a traceback after results.csv, before results.md)"""
    rows = [{"arm": "a", "values": "", "seed": 0, "l0": 2.0, "explained_variance": None,
             "sae": "x"},
            {"arm": "a", "values": "", "seed": 1, "l0": 3.0, "explained_variance": 0.5,
             "sae": "y"}]
    bench.write_results(rows, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| a |  | 0 | 2 | null |  |" in md and "| a |  | 1 | 3 | 0.5 | * |" in md
    assert (tmp_path / "l0_vs_ev.png").read_bytes()[:4] == b"\x89PNG"


def test_an_sae_with_l0_0_is_drawn_at_the_edge_of_the_log_axis(tmp_path, monkeypatch):
    """(fault testing: a JumpReLU arm whose thresholds let no latent fire was left out of
    l0_vs_ev.png unsaid, log(0) being off the axis, while its arm was in the legend and the
    y axis stretched to its explained variance)"""
    figures = {}
    monkeypatch.setattr(bench, "save_figure", lambda fig, path: figures.update({path.name: fig}))
    rows = [{"arm": arm, "values": "", "seed": 0, "l0": l0, "explained_variance": ev,
             "mcc": 0.5, "sae": "x"}
            for arm, l0, ev in [("a", 3.0, 0.5), ("a", 8.0, 0.7), ("dead", 0, -0.14)]]
    bench.write_results(rows, tmp_path)
    for name in ("l0_vs_ev.png", "mcc_vs_l0.png"):
        ax = figures[name].axes[0]
        figures[name].canvas.draw()
        left, right = ax.get_xlim()
        xs = [x for c in ax.collections for x, _ in c.get_offsets()]
        assert sorted(xs) == [left, 3.0, 8.0] and left == 2.0 < right, name
        labels = {t.get_position()[0]: t.get_text() for t in [
            *ax.get_xticklabels(), *ax.get_xticklabels(minor=True)] if t.get_text()}
        assert labels[left] == "0" and "2" not in labels.values()
        assert "L0 0, drawn at the edge" in [t.get_text() for t in ax.get_legend().get_texts()]
    # on its arm's frontier (no SAE has a lower L0), however poor its explained variance
    assert "| dead |  | 0 | 0 | -0.14 | 0.5 | * |" in (tmp_path / "results.md").read_text()


def test_bench_end_to_end(tmp_path, monkeypatch, capsys):
    tree = _bench_tree(tmp_path)  # (no training curves: 4 figures at each of the 9 trainings)
    path = _write(tmp_path, tree)
    # (the command in this process: a process of its own costs seconds of imports, and the
    # reruns below compile again what it compiled)
    code = cli.main(["bench", str(path), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "8 SAEs in 2 arms" in printed.out
    out = tmp_path / "bench"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert [r["arm"] for r in rows] == ["l1"] * 4 + ["topk"] * 4
    assert [r["values"] for r in rows[:2]] == ["loss.1.coefficient=0.01"] * 2
    assert [r["seed"] for r in rows[:2]] == ["0", "1"]
    for key in ("l0", "explained_variance", "mcc", "absorption", "f1"):
        assert all(r[key] != "" for r in rows), key
    assert 0 < float(rows[4]["l0"]) <= 1.0 < float(rows[6]["l0"]) <= 2.0  # topk k=1, k=2
    md = (out / "results.md").read_text()
    assert "## l1" in md and "## topk" in md and "| * |" in md
    for png in ("l0_vs_ev.png", "mcc_vs_l0.png", "absorption_vs_l0.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run reuses the trained arms (nothing is retrained) and rewrites the tables.
    from jaxsae import train as train_mod

    def fail(*a, **k):
        raise AssertionError("retrained a finished arm")

    monkeypatch.setattr(train_mod, "train", fail)
    (out / "results.csv").unlink()
    rows = bench.run_bench(bench.load_bench_config(path), progress=False, log=lambda m: None)
    assert len(rows) == 8 and (out / "results.csv").is_file()
    # An eval.json edited or damaged since its training wrote it, or left from before an
    # interrupted finish (the SAEs exported, their eval.json not yet written), and a
    # sweep.csv left from before one, are not reported: the arm is finished again from its
    # last checkpoint (nothing trained again) and the tables hold what was measured (fault
    # testing: edited numbers were reported as measured; a damaged one was a traceback; a
    # longer run's table held the shorter run's numbers, or the arm was refused for good)
    monkeypatch.undo()
    evaluation = out / "l1" / "sweep" / "00" / "eval.json"
    kept = json.loads(evaluation.read_text())
    table = out / "l1" / "sweep.csv"
    kept_table = table.read_text()
    stale_table = kept_table.replace(f",{kept['l0']!r},", ",0.5,", 1)
    assert stale_table != kept_table
    curves = (out / "l1" / "sweep" / "00" / "metrics.jsonl").read_bytes()
    stale = f"its training wrote in {table}: finishing it again from its checkpoints"
    for path_, text, why in [
            (evaluation, json.dumps({**kept, "explained_variance": 0.999}),
             f"explained_variance 0.999 disagrees with the {kept['explained_variance']!r} "
             f"{stale}"),
            (evaluation, json.dumps({**kept, "mcc": 0.5, "l0": 0.5}),
             f"l0 0.5 disagrees with the {kept['l0']!r} {stale}"),
            (evaluation, '{"mcc": 0.5', "not a readable evaluation (Expecting ',' delimiter: "
                                        "line 1 column 12 (char 11)): finishing it again from "
                                        "its checkpoints"),
            (evaluation, '{"mcc": 0.5}', "not a jaxsae evaluation (no number l0): finishing "
                                         "it again from its checkpoints"),
            # a metric sweep.csv does not hold: the export's record of every metric tells
            (evaluation, json.dumps({**kept, "mcc": 0.99}), "not the evaluation the SAE "
             "exported beside it recorded: finishing it again from its checkpoints"),
            (table, stale_table, f"l0 {kept['l0']!r} disagrees with the 0.5 {stale}")]:
        path_.write_text(text)
        said = []
        bench.run_bench(bench.load_bench_config(path), progress=False, log=said.append)
        assert f"l1: {evaluation}: {why}" in said, said
        assert json.loads(evaluation.read_text()) == kept
        assert table.read_text() == kept_table
        assert (out / "l1" / "sweep" / "00" / "metrics.jsonl").read_bytes() == curves
    # (the SAE's own record of its evaluation, where sweep.csv agrees: an eval.json written
    # before the export, by the shorter run)
    for member in (out / "l1" / "sweep").iterdir():
        (member / "eval.json").write_text(json.dumps(
            {**json.loads((member / "eval.json").read_text()), "dead_fraction": 0.75}))
    rows = list(csv.DictReader(table.open()))
    for row in rows:
        row["dead_fraction"] = "0.75"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    said = []
    bench.run_bench(bench.load_bench_config(path), progress=False, log=said.append)
    assert (f"l1: {evaluation}: not the evaluation the SAE exported beside it recorded: "
            "finishing it again from its checkpoints") in said, said
    assert json.loads(evaluation.read_text()) == kept and table.read_text() == kept_table
    # An exported SAE changed since: its eval.json is not of it, so the arm is not reused,
    # and training refuses to replace the change (the tables are left as they were).
    monkeypatch.undo()
    weights = next((out / "l1").glob("sweep/*/sae/sae_weights.safetensors"))
    changed = bytearray(weights.read_bytes())
    changed[-1] ^= 1
    weights.write_bytes(bytes(changed))  # the same size, another content
    tables = (out / "results.csv").read_bytes()
    marker = (out / MARKER).stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"arms\.l1: .*sae_weights\.safetensors \(changed\)"):
        bench.run_bench(bench.load_bench_config(path), progress=False, log=lambda m: None)
    assert (out / "results.csv").read_bytes() == tables
    # (fault testing: a refused rerun rewrote the bench directory's marker)
    assert (out / MARKER).stat().st_mtime_ns == marker


def test_an_arm_trained_on_other_data_is_not_reused(tmp_path):
    """Data replaced by other data of the same shape since an arm finished: the arm is not
    reused (its resume is refused, naming the data) and the tables are left as they were
    (fault testing: the finished arms were reused beside a new arm trained on the new data,
    one table over two data sets)."""
    from jaxsae.data import synthetic

    data, other = tmp_path / "data", tmp_path / "other"
    for seed, where in ((0, data), (1, other)):
        synthetic.generate({"kind": "hierarchy_small", "tokens": 12288, "seed": seed}, where,
                           progress=False)
    tree = _bench_tree(tmp_path, seeds=[0])
    del tree["base"]["data"]["generate"]
    del tree["arms"]["topk"]
    path = _write(tmp_path, tree)
    bench.run_bench(bench.load_bench_config(path), progress=False, log=lambda m: None)
    out = tmp_path / "bench"
    tables = (out / "results.csv").read_bytes()
    data.rename(tmp_path / "first")
    other.rename(data)
    with pytest.raises(JaxsaeError, match=rf"^arms\.l1: {re.escape(str(data))}: holds other "
                                          r"values than the data this arm's SAEs were trained"):
        bench.run_bench(bench.load_bench_config(path), progress=False, log=lambda m: None)
    assert (out / "results.csv").read_bytes() == tables
    # and so it is when the checkpoints were deleted to save space: the exports record the
    # data's fingerprint (fault testing: reused over the replaced data)
    import shutil

    shutil.rmtree(out / "l1" / "checkpoints")
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(JaxsaeError, match=rf"^arms\.l1: {re.escape(str(data))}: holds other "
                                          r"values than the data this arm's SAEs were trained"):
        bench.run_bench(bench.load_bench_config(path), progress=False, log=lambda m: None)
    assert (out / "results.csv").read_bytes() == tables
    assert sorted(str(p) for p in out.rglob("*")) == before
    # the data back: reused as it was
    data.rename(other)
    (tmp_path / "first").rename(data)
    said = []
    bench.run_bench(bench.load_bench_config(path), progress=False, log=said.append)
    assert any("l1: already trained with this exact config" in m for m in said), said


def test_one_bench_at_a_time_in_a_directory(tmp_path, capsys, monkeypatch):
    """A second bench in the directory of one running is refused naming it, and one that
    cannot write there is refused before any arm trains (fault testing: two benches both
    said they wrote the tables, which held a mix of the two; an unwritable directory was
    found after every arm had trained)."""
    from jaxsae import train as train_mod
    from jaxsae.runlock import RunLock
    from tests.faults.conftest import refused

    def fail(*a, **k):
        raise AssertionError("trained an arm")

    monkeypatch.setattr(train_mod, "train", fail)
    path = _write(tmp_path, _bench_tree(tmp_path))
    out = tmp_path / "bench"
    out.mkdir()
    holder = RunLock(out, doing="running a bench").acquire()
    try:
        refused(["bench", str(path), "--no-progress"], capsys,
                match=f"{out}: this process is already running a bench here", unchanged=[out])
    finally:
        holder.discard()
    assert not any(out.iterdir())

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(RunLock, "acquire", denied)
    refused(["bench", str(path), "--no-progress"], capsys,
            match=f"out {out}: cannot write {out / '.lock'} (Permission denied)",
            unchanged=[out])


def test_the_l0_axis_is_labelled_in_plain_numbers_that_do_not_collide():
    """(fault testing: matplotlib labelled every minor tick of a log axis over 2-40,
    "3×10⁰4×10⁰", running into each other)"""
    from jaxsae.outputs import subplots

    for values, minor in [([2.0, 40.0], ["2", "5", "20"]), ([12.0, 12.3], None)]:
        fig, ax = subplots(figsize=(6, 4.2), dpi=120)
        ax.scatter(values, [0.0, 1.0])
        bench._log_l0_axis(ax, values)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
        shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        if minor is not None:
            assert labels[:3] == minor and all(t[0] in "25" and set(t[1:]) <= {"0"}
                                               for t in labels) and "10" in shown
        else:  # (a narrow span: its minor ticks are all the labels there are)
            assert labels and all(re.fullmatch(r"[0-9.]+", t) for t in labels)


def test_what_an_export_records_of_its_evaluation_is_compared(tmp_path):
    """An export of a jaxsae before 2026-12-07 (no digest of its evaluation) is compared by
    the metrics its metadata records; an explained variance that is null (tokens that do not
    vary) agrees with the nan sweep.csv writes for it (fault testing: such an arm was refused
    as edited on its first bench, and again on every rerun)."""
    (tmp_path / "eval.json").write_text(json.dumps(
        {"l0": 2.0, "explained_variance": None, "dead_fraction": 0.1, "mse": 1.0}))
    exported = {"metadata": {"eval_l0": 2.0, "eval_explained_variance": None,
                             "eval_dead_fraction": 0.1}, "jaxsae": {"steps": 3}}
    row = {"l0": "2.0", "explained_variance": "nan", "dead_fraction": "0.1", "mse": "1.0"}
    assert bench._not_of_export(tmp_path, exported, row) is None
    exported["metadata"]["eval_l0"] = 3.0
    assert bench._not_of_export(tmp_path, exported, row) == (
        f"{tmp_path / 'eval.json'}: l0 2.0 is not the 3.0 of the SAE exported beside it")


def test_a_cfg_json_holding_nan_reads_back_as_written(tmp_path):
    """(fault testing: its digest was taken over NaN, the file holds null, so an SAE whose
    explained variance is null was "cfg.json (changed)" for good: never replaced, its run
    never resumed)"""
    from jaxsae import outputs

    cfg = {"architecture": "standard", "metadata": {"eval_explained_variance": float("nan")},
           "jaxsae": {"steps": 3}}
    outputs.record_sae_files(tmp_path, cfg)
    (tmp_path / "cfg.json").write_text(outputs.json_text(cfg, indent=2))
    assert outputs.foreign_entries(tmp_path) == []
