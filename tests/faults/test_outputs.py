"""Outputs never destroy anything: every command that writes a directory stages it and renames
it into place, and replaces only its own kind of output (or, with --overwrite, a plain
directory), never a file, a run, its own inputs or the working directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxsae import cli
from jaxsae.export import CFG_FILE, load_sae
from jaxsae.outputs import MARKER, SAELENS_FILES
from tests.faults.conftest import refused, snapshot


def _ok(argv: list[str], capsys) -> str:
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_no_output_replaces_the_working_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine.txt").write_text("my notes")
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path.parent)):
        refused(["synth", "--out", out, "--overwrite", "superposition", "--tokens", "64"],
                capsys, match="would replace the working directory", unchanged=[tmp_path])


def test_export_never_replaces_a_file_a_foreign_directory_or_a_run(run_copy, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes")
    foreign = tmp_path / "papers"
    (foreign / "draft").mkdir(parents=True)
    (foreign / "draft" / "paper.tex").write_text("\\section{}")
    runs = run_copy.parent  # a folder holding runs
    for target, match in [(a_file, "is a file"), (foreign, "--overwrite to replace"),
                          (run_copy, "which this command reads"),
                          (runs, "which this command reads")]:
        refused(["export", str(run_copy), "--out", str(target)], capsys, match=match,
                unchanged=[target, run_copy])
    # --overwrite still never deletes a file, a run, or what the command reads.
    other_runs = tmp_path / "archive"
    other_runs.mkdir()
    os.symlink(run_copy / "checkpoints", other_runs / "linked")
    (other_runs / "old-run" / "checkpoints").mkdir(parents=True)
    link = tmp_path / "link"
    os.symlink(foreign, link)
    for target, match in [(a_file, "is a file"), (run_copy, "which this command reads"),
                          (other_runs, "holds the training run"), (link, "symbolic link")]:
        refused(["export", str(run_copy), "--out", str(target), "--overwrite"], capsys,
                match=match, unchanged=[target, run_copy])
    assert _leftovers(tmp_path) == []


def test_an_output_place_that_cannot_be_written_is_refused_before_any_work(
        run_copy, tmp_path, capsys, monkeypatch):
    """(fault testing: export evaluated the SAE, then could not create its staging on a
    read-only mount; `--out FILE/x` said only "cannot use FILE: File exists")"""
    from jaxsae import evaluate

    def no_pass(*args, **kwargs):
        raise AssertionError("evaluated before --out was checked")

    monkeypatch.setattr(evaluate, "ReconstructionSums", no_pass)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes")
    refused(["export", str(run_copy), "--out", str(a_file / "x" / "y")], capsys,
            match=f"--out {a_file / 'x' / 'y'}: {a_file} is a file, not a directory to write "
                  "in", unchanged=[a_file, run_copy])
    read_only = tmp_path / "ro"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        Path(path) != read_only and access(path, mode, **kw)))  # (root writes anywhere)
    refused(["export", str(run_copy), "--out", str(read_only / "new" / "sae")], capsys,
            match=f"cannot write in {read_only} (a read-only file system, or no permission)",
            unchanged=[read_only, run_copy])


def test_export_replaces_its_own_export_and_with_overwrite_a_plain_directory(
        run_copy, tmp_path, capsys):
    out = tmp_path / "exported"
    _ok(["export", str(run_copy), "--out", str(out)], capsys)
    first = snapshot(out)
    _ok(["export", str(run_copy), "--out", str(out), "--dtype", "bfloat16"], capsys)
    assert snapshot(out) != first
    assert json.loads((out / CFG_FILE).read_text())["dtype"] == "bfloat16"
    # a file the user added to it is never replaced without --overwrite
    (out / "notes.md").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_text("mine")
    refused(["export", str(run_copy), "--out", str(out)], capsys,
            match="holds files jaxsae did not write (notes.md, plots/)", unchanged=[out])
    _ok(["export", str(run_copy), "--out", str(out), "--overwrite"], capsys)
    assert sorted(os.listdir(out)) == sorted(SAELENS_FILES)
    # (fault testing: a SAELens directory has no marker, so an edit of its cfg.json, say the
    # hook a user set for SAELens, or weights a user's script wrote back, were replaced)
    cfg = json.loads((out / CFG_FILE).read_text())
    (out / CFG_FILE).write_text(json.dumps({**cfg, "hook_name": "blocks.3.hook_resid_post"}))
    refused(["export", str(run_copy), "--out", str(out)], capsys,
            match="holds files jaxsae did not write (cfg.json (changed))", unchanged=[out])
    (out / CFG_FILE).write_text(json.dumps(cfg, indent=4))  # (the same content: not an edit)
    _ok(["export", str(run_copy), "--out", str(out)], capsys)
    # (fault testing: a copy with new modification times, `cp -r`, was "changed" throughout)
    os.utime(out / "sae_weights.safetensors", ns=(1, 1))
    _ok(["export", str(run_copy), "--out", str(out)], capsys)
    weights = out / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size, another content
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    refused(["export", str(run_copy), "--out", str(out)], capsys, unchanged=[out],
            match="holds files jaxsae did not write (sae_weights.safetensors (changed))")
    _ok(["export", str(run_copy), "--out", str(out), "--overwrite"], capsys)
    plain = tmp_path / "scratch"
    plain.mkdir()
    (plain / "old.txt").write_text("replace me")
    refused(["export", str(run_copy), "--out", str(plain)], capsys, match="not empty",
            unchanged=[plain])
    _ok(["export", str(run_copy), "--out", str(plain), "--overwrite"], capsys)
    assert load_sae(plain).d_in == 16 and not (plain / "old.txt").exists()
    assert _leftovers(tmp_path) == []


def test_staging_left_by_a_killed_command_is_removed_by_the_next(run_copy, tmp_path, capsys):
    """SIGKILL runs no cleanup: its staging directory stays beside the target. The next
    command writing that target removes it, if its process is gone and it is of this host."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    out = tmp_path / "exported"
    left = {name: tmp_path / f".exported.tmp-{name}" for name in (
        f"{host}-{gone}-0123abcd", f"{host}-{os.getppid()}-0123abcd",
        f"other-host-{gone}-0123abcd")}
    for path in left.values():
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "W.npy").write_bytes(b"x" * 1000)
    _ok(["export", str(run_copy), "--out", str(out)], capsys)
    assert [name for name, path in left.items() if path.exists()] == [
        f"{host}-{os.getppid()}-0123abcd", f"other-host-{gone}-0123abcd"]


def test_export_with_data_of_another_width_sets_no_checkpoint_aside(run_copy, tmp_path,
                                                                   capsys):
    """(fault testing: every good checkpoint was renamed .corrupt, and the next `jaxsae
    train` started the run over from step 0)"""
    from jaxsae.data.synthetic import SuperpositionSpec, generate_superposition

    narrow = generate_superposition(SuperpositionSpec(n_features=16, d_in=8, tokens=4096),
                                    tmp_path / "narrow", progress=False)
    refused(["export", str(run_copy), "--out", str(tmp_path / "x"), "--data", str(narrow)],
            capsys, match="d_in is 8, but the run was trained on d_in 16",
            unchanged=[run_copy])


def test_export_never_writes_inside_a_run(run_copy, tmp_path, capsys):
    """(fault testing: `export B --out A/sae` replaced run A's final SAE with B's)"""
    other = tmp_path / "other-run"
    (other / "checkpoints").mkdir(parents=True)
    (other / "sae").mkdir()
    (other / "sae" / "cfg.json").write_text('{"jaxsae": {}}')  # looks like a jaxsae export
    for target, match in ((other / "sae", "lies inside the training run"),
                          (run_copy / "sae", f"lies inside {run_copy}, which this command "
                                             "reads"),
                          (other / "deeper" / "x", "lies inside the training run")):
        refused(["export", str(run_copy), "--out", str(target)], capsys, match=match,
                unchanged=[other, run_copy])


def test_a_failed_export_leaves_the_previous_one(run_copy, tmp_path, capsys):
    out = tmp_path / "exported"
    _ok(["export", str(run_copy), "--out", str(out)], capsys)
    before = snapshot(out)
    refused(["export", str(run_copy), "--out", str(out), "--data", str(tmp_path / "gone")],
            capsys, match="gone", unchanged=[out, run_copy])
    assert snapshot(out) == before and _leftovers(tmp_path) == []


def test_no_output_goes_inside_another_output_or_replaces_a_run_s_files(run_copy, small_data,
                                                                         tmp_path, capsys):
    """(fault testing: `plot --out RUN/curves.png --overwrite` replaced the run's curves, which
    analyze and export --hub then copied as the run's; `export --out EXPORT/sub`, `repair --out
    REPAIR/sae --overwrite` and `import --out IMPORT/imported-sae --overwrite` wrote into or
    replaced part of another output)"""
    import shutil

    refused(["plot", str(run_copy), "--out", str(run_copy / "curves.png"), "--overwrite"],
            capsys, match=f"is the training run {run_copy}'s own curves.png; jaxsae never "
                          "replaces it", unchanged=[run_copy])
    _ok(["plot", str(run_copy), "--out", str(run_copy / "mine.png")], capsys)  # a new file
    # nor a finished run's whose checkpoints were moved away (fault testing: replaced then)
    moved = tmp_path / "moved"
    shutil.copytree(run_copy, moved, ignore=shutil.ignore_patterns("checkpoints"))
    refused(["plot", str(run_copy), "--out", str(moved / "curves.png"), "--overwrite"],
            capsys, match=f"is the training run {moved}'s own curves.png", unchanged=[moved])
    exported = tmp_path / "exported"
    _ok(["export", str(run_copy), "--out", str(exported), "--no-progress"], capsys)
    for extra in ([], ["--overwrite"]):
        refused(["export", str(run_copy), "--out", str(exported / "sub"), "--no-progress",
                 *extra], capsys, match=f"lies inside {exported}, a jaxsae sae output",
                unchanged=[exported])
    imported = tmp_path / "imported"
    _ok(["import", str(run_copy / "sae"), "--out", str(imported), "--data", str(small_data)],
        capsys)
    shutil.copytree(run_copy / "sae", imported / "imported-sae")  # (a sparsify import's copy)
    refused(["import", str(run_copy / "sae"), "--out", str(imported / "imported-sae"),
             "--data", str(small_data), "--overwrite"], capsys,
            match="the SAE the import", unchanged=[imported])


def test_import_never_overwrites_a_run(run_copy, small_data, tmp_path, capsys):
    sae = run_copy / "sae"
    refused(["import", str(sae), "--out", str(run_copy), "--data", str(small_data)], capsys,
            match="which this command reads", unchanged=[run_copy])
    trained = tmp_path / "other-run"
    (trained / "checkpoints").mkdir(parents=True)
    (trained / "config.yaml").write_text("name: mine\n")
    for extra in ([], ["--overwrite"]):
        refused(["import", str(sae), "--out", str(trained), "--data", str(small_data), *extra],
                capsys, match="holds the training run", unchanged=[trained])
    # An import that was not trained yet is replaced (re-importing with other overrides).
    fresh = tmp_path / "fresh"
    _ok(["import", str(sae), "--out", str(fresh), "--data", str(small_data)], capsys)
    _ok(["import", str(sae), "--out", str(fresh), "--data", str(small_data), "seed=3"], capsys)
    assert "seed: 3" in (fresh / "config.yaml").read_text()


def test_synth_and_cache_targets(tmp_path, capsys):
    a_file = tmp_path / "data.npy"
    a_file.write_bytes(b"\x93NUMPY")
    argv = ["synth", "superposition", "--n-features", "8", "--d-in", "4", "--tokens", "64",
            "--no-progress", "--out"]
    refused([*argv, str(a_file)], capsys, match="already exists", unchanged=[a_file])
    refused([*argv, str(a_file), "--overwrite"], capsys, match="is a file",
            unchanged=[a_file])
    out = tmp_path / "sp"
    _ok([*argv, str(out)], capsys)
    before = snapshot(out)
    refused([*argv, str(out)], capsys, match="already exists", unchanged=[out])
    _ok([*argv, str(out), "--overwrite", "--seed", "1"], capsys)
    assert snapshot(out) != before
    # A run kept inside an output, at any depth, is never replaced with it.
    (out / "mine" / "runs" / "a" / "checkpoints").mkdir(parents=True)
    (out / "mine" / "runs" / "a" / "checkpoints" / "step").write_text("weeks of GPU time")
    refused([*argv, str(out), "--overwrite"], capsys, match="holds the training run",
            unchanged=[out])
    deep = tmp_path / "nest" / "proj" / "runs" / "b"
    (deep / "checkpoints").mkdir(parents=True)
    refused([*argv, str(tmp_path / "nest"), "--overwrite"], capsys,
            match="holds the training run", unchanged=[tmp_path / "nest"])
    squatter = tmp_path / "next.partial"
    squatter.mkdir()
    (squatter / "mine.txt").write_text("not a shard")
    refused([*argv, str(tmp_path / "next")], capsys, match="not an interrupted jaxsae",
            unchanged=[squatter])
    (squatter / "mine.txt").unlink()  # an empty directory of that name is not a staging either
    refused([*argv, str(tmp_path / "next")], capsys, match="not an interrupted jaxsae",
            unchanged=[squatter])
    assert _leftovers(tmp_path) == []


def test_generated_data_larger_than_the_free_space_is_refused_before_writing(tmp_path, capsys,
                                                                            monkeypatch):
    """(fault testing: --tokens 10^12 wrote shards until the disk was full)"""
    import shutil
    from collections import namedtuple

    import pytest

    from jaxsae.config import config_from_dict
    from jaxsae.errors import JaxsaeError
    from jaxsae.train import train
    from tests.conftest import small_config_dict

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**31, 2**31 - 4096, 4096))
    refused(["synth", "superposition", "--n-features", "8", "--d-in", "4", "--tokens", "1000",
             "--no-progress", "--out", str(tmp_path / "sp")], capsys, unchanged=[],
            match=f"--tokens 1,000: the shards need 15.6 KiB, more than the 4.0 KiB free on "
                  f"{tmp_path}")
    tree = small_config_dict(tmp_path / "gen", tmp_path / "run", data={"generate": {
        "kind": "superposition", "n_features": 8, "d_in": 4, "tokens": 1000}, "eval_tokens": 100})
    with pytest.raises(JaxsaeError, match=r"data\.generate\.tokens 1,000: the shards need"):
        train(config_from_dict(tree), progress=False, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_place_with_no_space_to_count_is_not_blamed_on_the_tokens(tmp_path, capsys,
                                                                   monkeypatch):
    """(fault testing: --out /proc/x was refused as "--tokens 1,000: the shards need 250 KiB,
    more than the 0 bytes free on /proc": a pseudo filesystem counts no space at all; the
    write itself then names the path it cannot create)"""
    import shutil
    from collections import namedtuple

    import pytest

    from jaxsae.data import synthetic
    from jaxsae.errors import ConfigError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 0))
    spec = synthetic.parse_spec({"kind": "superposition", "n_features": 8, "d_in": 4,
                                 "tokens": 1000})[1]
    synthetic.check_space(spec, tmp_path / "sp")  # (nothing to compare: no refusal)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**31, 2**31, 0))
    with pytest.raises(ConfigError, match="tokens 1,000: the shards need"):
        synthetic.check_space(spec, tmp_path / "sp")


def test_analysis_outputs_are_staged_and_refuse_foreign_targets(run_copy, small_data, tmp_path,
                                                                capsys):
    sae = str(run_copy / "sae")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "a.md").write_text("keep")
    common = ["--data", str(small_data), "--tokens", "2048", "--batch-size", "1024",
              "--no-progress"]
    for argv in (["analyze", sae], ["stitch", "compare", sae, sae]):
        refused([*argv, *common, "--out", str(foreign)], capsys, match="--overwrite",
                unchanged=[foreign, run_copy])
        refused([*argv, *common, "--out", str(small_data)], capsys,
                match="which this command reads", unchanged=[small_data])
        # nothing is written inside what the command reads, or inside a run's checkpoints
        refused([*argv, *common, "--out", str(run_copy / "sae" / "an")], capsys,
                match="lies inside", unchanged=[run_copy])
        refused([*argv, *common, "--out", str(run_copy / "checkpoints" / "an")], capsys,
                match="lies inside the checkpoints of the run", unchanged=[run_copy])
    out = tmp_path / "geometry"
    _ok(["analyze", sae, *common, "--out", str(out)], capsys)
    _ok(["analyze", sae, *common, "--out", str(out)], capsys)  # its own output: replaced
    assert (out / "index.html").is_file() and _leftovers(tmp_path) == []
    # ... unless something was added to it (a file, or a file in one of its directories)
    (out / "my_notes.txt").write_text("keep")
    refused(["analyze", sae, *common, "--out", str(out)], capsys,
            match="holds files jaxsae did not write (my_notes.txt)", unchanged=[out])
    marker = json.loads((out / MARKER).read_text())
    assert "index.html" in marker["files"] and MARKER not in marker["files"]
    # ... or a file it wrote was changed, or replaced by a directory
    (out / "my_notes.txt").unlink()
    with open(out / "index.html", "a") as page:
        page.write("<!-- my edit -->")
    (out / "latents.csv").unlink()
    (out / "latents.csv").mkdir()
    refused(["analyze", sae, *common, "--out", str(out)], capsys,
            match="holds files jaxsae did not write (index.html (changed), latents.csv "
                  "(changed))", unchanged=[out])
    (out / "latents.csv").rmdir()
    # an output of an earlier jaxsae (no list of its files) is replaced only with --overwrite
    (out / MARKER).write_text(json.dumps({"kind": "analyze"}))
    refused(["analyze", sae, *common, "--out", str(out)], capsys,
            match="did not record its files, so files added to it since cannot be told apart; "
                  "pass --overwrite to replace it (first check that it holds nothing of yours)",
            unchanged=[out])
    _ok(["analyze", sae, *common, "--out", str(out), "--overwrite"], capsys)


def test_frankenstein_failure_leaves_no_output_and_reruns_finish(tmp_path, small_data, capsys,
                                                                  monkeypatch):
    import numpy as np

    from jaxsae.analysis import stitch
    from tests.test_stitch import random_sae

    rng = np.random.default_rng(1)
    small = random_sae(tmp_path / "small", 12, rng)
    random_sae(tmp_path / "large", 40, rng, parents=small.params["W_dec"][:5])
    family = [tmp_path / "small", tmp_path / "large"]
    out = tmp_path / "frank"
    argv = ["stitch", "frankenstein", *map(str, family), "--data", str(small_data), "--out",
            str(out), "--tokens", "2048", "--batch-size", "512", "--retrain-decoder-tokens",
            "3072", "--no-progress"]

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out) + ".partial/frankenstein.csv")

    monkeypatch.setattr(stitch, "write_csv", broken)
    refused(argv, capsys, match="No space left on device", unchanged=[])
    assert not out.exists()  # nothing half-written under the name of the result
    monkeypatch.undo()
    monkeypatch.setattr(stitch.outputs, "publish", broken)  # then fails at the very end
    refused(argv, capsys, match="No space left on device", unchanged=[])
    assert not out.exists()
    monkeypatch.undo()
    _ok(argv, capsys)  # continues from <out>.partial (its retraining is complete)
    assert (out / "sae" / CFG_FILE).is_file() and (out / "frankenstein.md").is_file()
    assert not (tmp_path / "frank.partial").exists()
    config = (out / "retrain" / "config.yaml").read_text()
    assert f"run_dir: {out / 'retrain'}" in config
    # (fault testing: init_from named the staging directory, gone once published, so the
    # retraining could not be run again from its config)
    assert f"init_from: {out / 'stitched'}" in config
    # (fault testing: the output held its retraining's checkpoints, a training run, which
    # jaxsae never replaces: the same call could not be made again, even with --overwrite)
    assert not (out / "retrain" / "checkpoints").exists()
    _ok([*argv, "--overwrite"], capsys)
    assert (out / "sae" / CFG_FILE).is_file() and not (tmp_path / "frank.partial").exists()


def test_a_dotdot_through_a_missing_directory_hides_nothing(run_copy, tmp_path, capsys):
    """(fault testing: `--out nope/../victim` passed every check while nope/ did not exist,
    and replaced victim/, a folder of the user's, or a whole run)"""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("mine")
    for target, match in ((victim, "--overwrite to replace"),
                          (run_copy, "which this command reads")):
        hidden = tmp_path / "nope" / ".." / target.name
        refused(["export", str(run_copy), "--out", str(hidden)], capsys, match=match,
                unchanged=[victim, run_copy])
    assert not (tmp_path / "nope").exists()
    # a `..` that names a new place is written there, and nowhere else
    _ok(["export", str(run_copy), "--out", str(tmp_path / "new" / ".." / "sae")], capsys)
    assert sorted(os.listdir(tmp_path / "sae")) == sorted(SAELENS_FILES)
    assert not (tmp_path / "new").exists()


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_signal_between_the_two_renames_waits_for_the_second(tmp_path, monkeypatch):
    """(fault testing: a SIGTERM after the previous output was renamed aside removed the new
    one: neither was left under the output's name, the old only in a hidden .old directory)"""
    import signal

    from jaxsae import outputs

    target, new = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    real = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # the old output set aside: Ctrl-C now
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(outputs.os, "replace", replace_then_interrupt)
    try:
        outputs.replace_directory(new, target)
        raise AssertionError("the Ctrl-C was lost")
    except KeyboardInterrupt:  # handled once the new output is in place
        pass
    assert len(calls) == 2 and (target / "a").read_text() == "new"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # the replaced output is gone before the Ctrl-C is acted on (fault testing: it was left
    # beside the new one, as .out.old-...)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_signal_while_a_resumable_output_is_published_leaves_it_resumable(tmp_path,
                                                                            monkeypatch):
    """(fault testing: a SIGTERM while `publish` wrote the final marker, or between removing
    the staging's lock and renaming it, left OUT.partial that every later call refused)"""
    import signal

    import pytest

    from jaxsae import outputs

    target = tmp_path / "out"
    real = outputs.write_marker

    def marker_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)

    with (pytest.raises(KeyboardInterrupt),
          outputs.resumable_staging(target, "thing", {"seed": 1}) as partial):
        (partial / "x").write_text("first")
        monkeypatch.setattr(outputs, "write_marker", marker_then_interrupt)
        outputs.publish(partial, target, "thing")
    monkeypatch.setattr(outputs, "write_marker", real)
    assert not target.exists() and (partial / "x").is_file()
    with outputs.resumable_staging(target, "thing", {"seed": 1}) as again:  # taken, afresh
        assert again == partial and not (partial / "x").exists()
        (partial / "x").write_text("second")
        outputs.publish(partial, target, "thing")
    assert (target / "x").read_text() == "second" and not partial.exists()
    assert not (target / ".lock").exists()


def test_a_resumable_output_killed_as_it_is_renamed_is_taken_over(tmp_path, monkeypatch):
    """A publish stopped just before its rename (SIGKILL: no cleanup runs, as here) leaves
    the staging with its lock, so the next call takes it over (it unlinked the lock first, and
    every later call refused OUT.partial as not jaxsae's); a `.lock` left in an output by a
    kill just after the rename is no foreign file."""
    import pytest

    from jaxsae import outputs

    target = tmp_path / "out"

    def killed(new, old):
        raise SystemExit(137)

    with (pytest.raises(SystemExit),
          outputs.resumable_staging(target, "thing", {"seed": 1}) as partial):
        (partial / "x").write_text("first")
        monkeypatch.setattr(outputs, "replace_directory", killed)
        outputs.publish(partial, target, "thing")
    monkeypatch.undo()
    assert not target.exists() and (partial / ".lock").is_file()
    with outputs.resumable_staging(target, "thing", {"seed": 1}) as again:
        (again / "x").write_text("second")
        outputs.publish(again, target, "thing")
    assert (target / "x").read_text() == "second" and not partial.exists()
    (target / ".lock").write_text("")  # (killed between the rename and the lock's removal)
    assert outputs.foreign_entries(target) == []


def test_a_replaced_output_that_cannot_be_removed_is_named(tmp_path, capsys, monkeypatch):
    """(fault testing: a set-aside `.out.old-…` that could not be deleted was left silently)"""
    from jaxsae import outputs

    target, new = tmp_path / "out", tmp_path / "new"
    for directory, text in ((target, "old"), (new, "new")):
        directory.mkdir()
        (directory / "a").write_text(text)
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda *a, **k: None)  # (as if undeletable)
    outputs.replace_directory(new, target)
    assert (target / "a").read_text() == "new"
    (aside,) = tmp_path.glob(".out.old-*")
    assert (aside / "a").read_text() == "old"
    err = capsys.readouterr().err
    assert f"warning: {target} is written, but the output it replaced, set aside as {aside}, " \
           "could not be removed" in err


def test_a_killed_replacement_is_undone_or_finished_by_the_next_command(tmp_path):
    """(fault testing: SIGKILL between the two renames left the previous output only in a
    hidden .old directory that nothing restored or removed)"""
    import socket

    from jaxsae import outputs

    target = tmp_path / "out"
    host, pid = socket.gethostname(), _dead_pid()
    aside = tmp_path / f".out.old-{host}-{pid}-0123abcd"
    aside.mkdir()
    (aside / "a").write_text("old")
    outputs.remove_stale_staging(target)  # the new one never took its place: put back
    assert (target / "a").read_text() == "old" and not aside.exists()
    aside.mkdir()
    (aside / "a").write_text("older")
    staging = tmp_path / f".out.tmp-{host}-{pid}-0123abcd"
    staging.mkdir()
    live = tmp_path / f".out.old-{host}-{os.getpid()}-0123abcd"  # a running process's
    live.mkdir()
    assert sorted(outputs.remove_stale_staging(target)) == sorted([aside, staging])
    assert (target / "a").read_text() == "old" and live.is_dir()


def test_a_lost_sigterm_stops_a_command_at_its_next_progress_update(tmp_path):
    """(fault testing: a SIGTERM whose exception JAX's garbage-collection callback swallowed
    let synth, convert and frankenstein run to the end and exit 0)"""
    import signal

    import pytest

    from jaxsae import interrupts
    from jaxsae.data.synthetic import SuperpositionSpec, generate_superposition

    with pytest.raises(interrupts.Terminated):  # raised where nobody handles it
        interrupts.raise_terminated(signal.SIGTERM, None)
    try:
        with pytest.raises(interrupts.Terminated):
            generate_superposition(SuperpositionSpec(n_features=8, d_in=4, tokens=256),
                                   tmp_path / "s", progress=False)
        assert list(tmp_path.iterdir()) == []  # no output, no staging directory
    finally:
        interrupts.clear_terminated()


def test_a_resumable_staging_is_one_process_s_at_a_time(tmp_path):
    """(as the shard writers': a second frankenstein of the same --out with other inputs
    cleared the staging directory of one in progress)"""
    import pytest

    from jaxsae import outputs

    target = tmp_path / "f"
    with outputs.resumable_staging(target, "frankenstein", {"a": 1}) as work:
        (work / "retrain").mkdir()
        for key in ({"a": 1}, {"a": 2}):
            # (held by this process here: said so, see runlock)
            with pytest.raises(outputs.OutputError, match=rf"{work}: this process is already "
                                                          "writing f here"), \
                    outputs.resumable_staging(target, "frankenstein", key):
                pass
        assert (work / "retrain").is_dir()
    with outputs.resumable_staging(target, "frankenstein", {"a": 2}) as work:  # another call's
        assert sorted(p.name for p in work.iterdir()) == [MARKER, ".lock"]
        outputs.publish(work, target, "frankenstein")
    assert sorted(p.name for p in target.iterdir()) == [MARKER]
    # a link named as the staging is refused, even to an interrupted staging (it was
    # followed: the write went on, and was cleared, wherever it pointed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / MARKER).write_text('{"kind": "frankenstein-partial", "key": {"a": 3}}\n')
    (tmp_path / "f.partial").symlink_to(elsewhere)
    with pytest.raises(outputs.OutputError, match=r"f\.partial: exists and is not an "
                                                  "interrupted jaxsae frankenstein"), \
            outputs.resumable_staging(target, "frankenstein", {"a": 4}):
        pass
    assert sorted(p.name for p in elsewhere.iterdir()) == [MARKER]


def test_overwrite_never_replaces_a_run_s_own_outputs(run_copy, small_data, tmp_path, capsys):
    """(fault testing: `analyze --out RUN/sweep --overwrite` replaced a sweep's SAEs with
    their training histories, and `synth` / `convert` / `frankenstein --out RUN/sae
    --overwrite` the run's SAE: only `export` refused an --out inside a run)"""
    import shutil

    sae = tmp_path / "sae"
    shutil.copytree(run_copy / "sae", sae)
    common = ["--data", str(small_data), "--tokens", "2048", "--batch-size", "1024",
              "--no-progress"]
    for argv in (["analyze", str(sae), *common], ["stitch", "compare", str(sae), str(sae),
                                                   *common],
                 ["synth", "superposition", "--tokens", "1024", "--no-progress"]):
        refused([*argv, "--out", str(run_copy / "sae"), "--overwrite"], capsys,
                match=f"lies inside the training run {run_copy} and is not a jaxsae",
                unchanged=[run_copy])
    # a new output inside a run is written, and replaced as its own kind
    _ok(["analyze", str(sae), *common, "--out", str(run_copy / "geometry")], capsys)
    _ok(["analyze", str(sae), *common, "--out", str(run_copy / "geometry"), "--overwrite"],
        capsys)


def test_overwrite_never_replaces_a_home_directory_or_the_running_python(tmp_path, capsys,
                                                                         monkeypatch):
    """(fault testing: `convert --out ~ --overwrite` replaced the tester's home directory, and
    with it the Python installation jaxsae ran from)"""
    import sys

    import pytest

    from jaxsae import outputs

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine\n")
    monkeypatch.setenv("HOME", str(home))
    argv = ["synth", "superposition", "--n-features", "8", "--d-in", "4", "--tokens", "64",
            "--no-progress", "--overwrite"]
    for out in (home, tmp_path):
        refused([*argv, "--out", str(out)], capsys, match="would replace your home directory",
                unchanged=[home])
    # (checked, not tried: a regression here would replace the environment the tests run in)
    with pytest.raises(outputs.OutputError, match="would replace the Python environment "
                                                  "running jaxsae"):
        outputs.check_target(sys.prefix, "synth", overwrite=True)
    # beside or below it is written as anywhere else
    assert cli.main([*argv, "--out", str(home / "synth")]) == 0
    assert (home / "notes.txt").read_text() == "mine\n"


def test_a_single_file_output_never_writes_through_a_fixed_temporary_name(tmp_path):
    """(fault testing: `plot --out p/b.png` deleted a user's p/b.png.partial, and wrote the
    PNG through a link of that name into the file it pointed at)"""
    from jaxsae import outputs

    mine, thesis = tmp_path / "b.png.partial", tmp_path / "thesis.txt"
    mine.write_text("data\n")
    thesis.write_text("thesis\n")
    (tmp_path / "d.png.partial").symlink_to(thesis)
    outputs.atomic_write(tmp_path / "b.png", "one\n")
    fig, _ = outputs.subplots(figsize=(2, 2))
    outputs.save_figure(fig, tmp_path / "d.png")
    assert mine.read_text() == "data\n" and thesis.read_text() == "thesis\n"
    assert (tmp_path / "b.png").read_text() == "one\n"
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "d.png").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b.png", "b.png.partial", "d.png", "d.png.partial", "thesis.txt"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """(fault testing: kill -9 during a write left `.b.png.<pid>-<id>.partial` for ever)"""
    import socket

    from jaxsae import outputs

    host = socket.gethostname()
    dead = tmp_path / f".b.png.{host}-{_dead_pid()}-0123abcd.partial"
    live = tmp_path / f".b.png.{host}-{os.getpid()}-0123abcd.partial"  # (a write in progress)
    other_host = tmp_path / f".b.png.elsewhere-{_dead_pid()}-0123abcd.partial"
    other_file = tmp_path / f".c.png.{host}-{_dead_pid()}-0123abcd.partial"
    for path in (dead, live, other_host, other_file):
        path.write_text("half")
    outputs.atomic_write(tmp_path / "b.png", "one\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["b.png", live.name, other_host.name, other_file.name])


def test_a_run_copied_without_its_times_still_resumes(trained_run, small_data, tmp_path,
                                                      capsys):
    """(fault testing: `cp -r` of a finished run, every file's content the same but its
    modification time new, was refused: sae/ "holds files jaxsae did not write (changed)")"""
    import shutil

    from tests.faults.conftest import write_config

    copy = Path(shutil.copytree(trained_run, tmp_path / "copy", copy_function=shutil.copyfile))
    weights = copy / "sae" / "sae_weights.safetensors"
    assert weights.stat().st_mtime_ns != (trained_run / "sae" / weights.name).stat().st_mtime_ns
    config = write_config(tmp_path / "c.yaml", small_data, copy)
    _ok(["train", str(config), "--no-progress"], capsys)
    assert weights.read_bytes() == (trained_run / "sae" / weights.name).read_bytes()


def test_a_frankenstein_whose_retraining_diverges_says_so_and_leaves_nothing(
        tmp_path, small_data, capsys):
    """(fault testing: --lr 1e30 ended in advice to export `RUN` at an earlier step, and
    OUT.partial stayed behind for good; its numpy overflow warning is
    test_a_diverged_sae_is_not_exported's)"""
    import numpy as np

    from tests.test_stitch import random_sae

    rng = np.random.default_rng(1)
    small = random_sae(tmp_path / "small", 12, rng)
    random_sae(tmp_path / "large", 40, rng, parents=small.params["W_dec"][:5])
    out = tmp_path / "frank"
    err = refused(["stitch", "frankenstein", str(tmp_path / "small"), str(tmp_path / "large"),
                   "--data", str(small_data), "--out", str(out), "--tokens", "2048",
                   "--batch-size", "512", "--retrain-decoder-tokens", "3072", "--lr", "1e30",
                   "--no-progress"], capsys, match="the decoder's retraining diverged",
                  unchanged=[])
    assert "lower --lr" in err and "RUN" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large", "small"]


def test_frankenstein_on_nan_data_names_no_key_it_has_no_flag_for(tmp_path, small_data,
                                                                   capsys):
    """(fault testing: NaN data told the user to set optim.skip_nonfinite, which stitch
    frankenstein has no flag for; and its OUT.partial stayed behind)"""
    import shutil

    import numpy as np

    from tests.test_stitch import random_sae

    data = Path(shutil.copytree(small_data, tmp_path / "data"))
    for shard in sorted(data.glob("shard-*.npy")):
        rows = np.load(shard, mmap_mode="r+")
        rows[::7, 0] = np.nan  # every 7th token: the statistics' sample meets one
        rows.flush()
        del rows
    rng = np.random.default_rng(1)
    small = random_sae(tmp_path / "small", 12, rng)
    random_sae(tmp_path / "large", 40, rng, parents=small.params["W_dec"][:5])
    err = refused(["stitch", "frankenstein", str(tmp_path / "small"), str(tmp_path / "large"),
                   "--data", str(data), "--out", str(tmp_path / "frank"), "--tokens", "2048",
                   "--batch-size", "512", "--retrain-decoder-tokens", "3072", "--no-progress"],
                  capsys, match="NaN or inf", unchanged=[])
    assert err.endswith("repair the data") and "optim." not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "large", "small"]


def test_a_signal_as_a_resumable_shard_write_is_renamed_into_place_waits_for_it(tmp_path,
                                                                                 monkeypatch):
    """(fault testing: between removing the staging's lock and renaming it, an interruption
    left DIR.partial that every later write of DIR refused)"""
    import signal

    import numpy as np
    import pytest

    from jaxsae import outputs
    from jaxsae.data.shards import ShardSet, ShardWriter

    real = outputs.replace_directory

    def interrupt_then_replace(new, target):
        signal.raise_signal(signal.SIGINT)
        real(new, target)

    monkeypatch.setattr(outputs, "replace_directory", interrupt_then_replace)
    out = tmp_path / "shards"
    with (pytest.raises(KeyboardInterrupt),  # acted on once the output is in place
          ShardWriter(out, 4, shard_tokens=8, resume_key={"model": "m"}) as writer):
        writer.write(np.ones((20, 4), np.float32))
    assert ShardSet(out).n_tokens == 20 and sorted(p.name for p in tmp_path.iterdir()) == [
        "shards"]


_KILLED_BETWEEN_RENAMES = r"""
import os, signal, sys
import numpy as np
from jaxsae import outputs
from jaxsae.data.shards import ShardWriter
real, seen = os.replace, []
def replace(src, dst):
    if os.path.isdir(src):
        seen.append(dst)
        if len(seen) == 2:  # the old output set aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
outputs.os.replace = replace
with ShardWriter(sys.argv[1], 4, shard_tokens=8, overwrite=True) as writer:
    writer.write(np.full((20, 4), 2.0, np.float32))
"""


def test_a_shard_write_killed_as_it_is_renamed_leaves_nothing_the_next_refuses(tmp_path):
    """(fault testing: SIGKILL between the lock's removal and the renames left DIR.partial
    without its lock, which every later write of DIR refused)"""
    import subprocess
    import sys

    import numpy as np

    from jaxsae.data.shards import ShardSet, ShardWriter

    out = tmp_path / "shards"
    with ShardWriter(out, 4, shard_tokens=8) as writer:
        writer.write(np.ones((12, 4), np.float32))
    killed = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(out)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    with ShardWriter(out, 4, shard_tokens=8, overwrite=True) as writer:  # not refused
        writer.write(np.full((16, 4), 3.0, np.float32))
    assert ShardSet(out).n_tokens == 16 and sorted(p.name for p in tmp_path.iterdir()) == [
        "shards"]
    assert not (out / ".lock").exists()


def test_a_write_failing_as_its_file_closes_names_the_file(tmp_path):
    """A buffered write to a full disk fails when the file is closed, with an OSError naming
    no file (fault testing: "error: No space left on device" from train, export, analyze,
    import, synth, stitch); a directory copy's error was a list's repr."""
    import shutil

    import numpy as np
    import pytest

    from jaxsae import outputs, tensorfile
    from jaxsae.errors import describe_os_error

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError) as err:  # (every write to /dev/full: ENOSPC)
        outputs.write_file(Path("/dev/full"), "x")
    assert describe_os_error(err.value) == "cannot write /dev/full: No space left on device"
    target = tmp_path / "w.safetensors"
    (tmp_path / f".w.safetensors.tmp-{os.getpid()}").symlink_to("/dev/full")  # its staging
    with pytest.raises(OSError) as err:
        tensorfile.write(target, {"a": np.zeros(3, np.float32)})
    assert describe_os_error(err.value) == f"cannot write {target}: No space left on device"
    assert sorted(os.listdir(tmp_path)) == []
    copied = shutil.Error([("src/a.safetensors", "dst/a.safetensors",
                            "[Errno 28] No space left on device: 'src/a' -> 'dst/a'")])
    assert describe_os_error(copied) == ("cannot write dst/a.safetensors: No space left on "
                                         "device")


def test_export_refuses_other_data_behind_a_relative_data_path(small_data, tmp_path, capsys,
                                                               monkeypatch):
    """(fault testing: exported from another working directory, a run's relative data.path
    read other data of the same width there; the export was evaluated on it and recorded it
    as the data trained on; where it named nothing, the refusal did not say why)"""
    import shutil

    from jaxsae.data.synthetic import SuperpositionSpec, generate_superposition
    from jaxsae.train import train
    from tests.conftest import small_config

    there, elsewhere = tmp_path / "there", tmp_path / "elsewhere"
    there.mkdir()
    shutil.copytree(small_data, there / "data")
    monkeypatch.chdir(there)
    train(small_config(Path("data"), there / "run"), progress=False)
    # (fault testing: where the relative path names nothing, it said only that the data
    # directory does not exist)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    refused(["export", str(there / "run"), "--out", str(tmp_path / "x"), "--no-progress"],
            capsys, match="data: data directory does not exist (a relative data.path is read "
                          "from the working directory", unchanged=[there / "run"])
    generate_superposition(SuperpositionSpec(n_features=48, d_in=16, tokens=8192, seed=9),
                           elsewhere / "data", progress=False)
    refused(["export", str(there / "run"), "--out", str(tmp_path / "x"), "--no-progress"],
            capsys, match="data: holds other values than the data the run "
                          f"{there / 'run'} trained on (a relative data.path is read from "
                          "the working directory", unchanged=[there / "run"])
    _ok(["export", str(there / "run"), "--out", str(tmp_path / "x"), "--data",
         str(there / "data"), "--no-progress"], capsys)
