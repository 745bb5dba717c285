"""The run directory: one training process at a time, a file or a foreign directory refused,
a read-only directory and a full disk reported in one line, metrics lines whole."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxsae import checkpoint, cli, tensorfile
from jaxsae.config import config_from_dict
from jaxsae.runlock import LOCK_FILE, RunLock
from tests.conftest import small_config_dict
from tests.faults.conftest import assert_one_line_error, refused, run_jaxsae, write_config


def test_a_second_training_on_a_run_directory_stops_at_once(run_copy, small_data, tmp_path,
                                                            capsys):
    config = write_config(tmp_path / "c.yaml", small_data, run_copy,
                          optim={"total_tokens": 256 * 32})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from jaxsae.runlock import RunLock; "
         f"RunLock({str(run_copy)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(["train", str(config), "--no-progress"], capsys,
                       match="another jaxsae process is training here", unchanged=[run_copy])
        assert f"pid {holder.pid} on " in line and str(run_copy) in line
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and taken over with a warning.
    capsys.readouterr()
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"taking over a stale lock (pid {holder.pid} on " in out
    assert (run_copy / LOCK_FILE).read_text() == ""  # released (a file it did not make stays)


@pytest.mark.parametrize("kind", ["notes", "{}", "link"])
def test_a_users_lock_file_is_not_taken_over(small_data, tmp_path, capsys, kind):
    """A directory holding only `.lock` may be a start killed before it wrote anything, but a
    `.lock` that is not jaxsae's record is someone's file: neither emptied nor written through
    (fault testing: `{}` was taken for an empty lock)."""
    run = tmp_path / "run"
    run.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("do not lose this\n")
    if kind != "link":
        (run / LOCK_FILE).write_text('{"pid": 12, "note": "mine"}\n' if kind == "notes"
                                     else kind)
        match = "exists and is not a jaxsae lock file"
    else:
        (run / LOCK_FILE).symlink_to(notes)
        match = "cannot be used as the lock file"
    config = write_config(tmp_path / "c.yaml", small_data, run)
    refused(["train", str(config), "--no-progress"], capsys, match=match,
            unchanged=[run, notes])
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    if kind == "notes":  # held by some other program: still not a jaxsae process training
        import fcntl

        fd = os.open(run / LOCK_FILE, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with pytest.raises(Exception, match="exists and is not a jaxsae lock file"):
                RunLock(run).acquire()
        finally:
            os.close(fd)


def test_a_finished_run_without_checkpoints_is_left_untouched(run_copy, small_data, tmp_path,
                                                              capsys):
    """Refused before the lock or checkpoints/ is added (a sweep's SAE directory, trained as a
    run of its own, got both)."""
    shutil.rmtree(run_copy / "checkpoints")
    config = write_config(tmp_path / "c.yaml", small_data, run_copy)
    refused(["train", str(config), "--no-progress"], capsys, unchanged=[run_copy],
            match="finished before (eval.json) and has no checkpoints/ to resume from")
    sweep = tmp_path / "sw"
    shutil.copytree(run_copy, sweep / "sweep" / "00")
    write_config(sweep / "config.yaml", small_data, sweep)
    config = write_config(tmp_path / "m.yaml", small_data, sweep / "sweep" / "00")
    refused(["train", str(config), "--no-progress"], capsys, unchanged=[sweep],
            match=f"is an SAE of the sweep in {sweep}, whose checkpoints it shares")


def test_a_refused_run_leaves_no_directory_it_made(small_data, tmp_path, capsys, monkeypatch):
    """(fault testing: a preset whose data was missing, run from a fresh directory, left an
    empty runs/ behind)"""
    monkeypatch.chdir(tmp_path)
    tree = small_config_dict(tmp_path / "missing", tmp_path / "unused")
    del tree["run_dir"]
    tree["name"] = "fresh"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    refused(["train", str(tmp_path / "c.yaml"), "--no-progress"], capsys,
            match="does not exist", unchanged=[tmp_path])  # (its mtime too: `ls -t`)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_refused_command_leaves_a_directory_that_was_there_as_it_was(
        run_copy, small_data, tmp_path, capsys):
    """(fault testing: a refused train left the `.lock` it made in an existing empty run_dir,
    and an export of a run copied without its `.lock` added one)"""
    empty = tmp_path / "empty"
    empty.mkdir()
    config = write_config(tmp_path / "c.yaml", tmp_path / "missing", empty)
    refused(["train", str(config), "--no-progress"], capsys, match="does not exist",
            unchanged=[empty])
    assert list(empty.iterdir()) == []
    assert not (run_copy / LOCK_FILE).exists()  # (training takes away the lock file it made)
    refused(["train", str(run_copy / "config.yaml"), "optim.lr=0.5", "--no-progress"],
            capsys, match="cannot resume with a changed optim.lr", unchanged=[run_copy])
    assert not (run_copy / LOCK_FILE).exists()
    assert cli.main(["export", str(run_copy), "--out", str(tmp_path / "out")]) == 0
    assert not (run_copy / LOCK_FILE).exists()
    (run_copy / LOCK_FILE).write_text("")  # one that was there stays
    assert cli.main(["export", str(run_copy), "--out", str(tmp_path / "out2")]) == 0
    assert (run_copy / LOCK_FILE).read_text() == ""
    # a train refused while an export holds the run says so (it said "training here")
    lock = RunLock(run_copy, doing="exporting").acquire()
    try:
        refused(["train", str(run_copy / "config.yaml"), "--no-progress"], capsys,
                match="this process is already exporting here", unchanged=[])
    finally:
        lock.release()


def test_a_start_whose_directory_a_refused_start_removed_makes_it_again(
        small_data, tmp_path, monkeypatch):
    """(fault testing: two starts at once, one refused for its data, removed the directory it
    had made between the other's check and its lock: "cannot find RUN/.lock")"""
    from jaxsae import train as train_mod

    real, calls = RunLock.acquire, []

    def acquire(self):
        calls.append(self.path)
        if len(calls) == 1:  # the other start's clean-up, just before this one locks
            shutil.rmtree(tmp_path / "runs")
        return real(self)

    monkeypatch.setattr(RunLock, "acquire", acquire)
    tree = small_config_dict(small_data, tmp_path / "runs" / "a", optim={"total_tokens": 2048})
    result = train_mod.train(config_from_dict(tree), progress=False)
    assert result.step == 8 and len(calls) == 2 and (tmp_path / "runs" / "a" / "sae").is_dir()
    # refused after that, it removes what it made again
    calls.clear()
    tree = small_config_dict(tmp_path / "missing", tmp_path / "runs" / "b")
    with pytest.raises(Exception, match="does not exist"):
        train_mod.train(config_from_dict(tree), progress=False)
    assert len(calls) == 2 and not (tmp_path / "runs").exists()


def test_a_lock_deleted_by_its_holder_is_never_held_twice(tmp_path, monkeypatch):
    """A process that opened the lock file before its holder deleted it (`discard`) and got
    the lock after must not go on holding a file that nobody else finds: it tries again on the
    path's file, so a third process cannot lock a new one at the same time."""
    import fcntl

    from jaxsae import runlock

    holder = RunLock(tmp_path).acquire()
    assert holder.created
    real, calls = fcntl.flock, []

    def flock(fd, op):  # the waiter's first try comes just after the holder discarded
        calls.append(fd)
        if len(calls) == 1:
            holder.discard()
        return real(fd, op)

    monkeypatch.setattr(runlock.fcntl, "flock", flock)
    waiter = RunLock(tmp_path).acquire()
    monkeypatch.setattr(runlock.fcntl, "flock", real)
    assert len(calls) == 2 and waiter.created  # (the first file was deleted: a new one)
    with pytest.raises(runlock.RunLocked, match="this process is already training here"):
        RunLock(tmp_path).acquire()  # the file at the path is the one held
    waiter.discard()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_is_held_while_training_and_released_after(run_copy, small_data, tmp_path):
    lock = RunLock(run_copy).acquire()
    with pytest.raises(Exception, match="this process is already training here"):
        RunLock(run_copy).acquire()
    lock.release()
    RunLock(run_copy).acquire().release()


def test_run_dir_that_is_a_file_or_a_foreign_directory(small_data, tmp_path, capsys):
    a_file = tmp_path / "results.csv"
    a_file.write_text("a,b\n1,2\n")
    config = write_config(tmp_path / "c.yaml", small_data, a_file)
    refused(["train", str(config)], capsys, match="is a file", unchanged=[a_file])
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("...")
    config = write_config(tmp_path / "c.yaml", small_data, foreign)
    refused(["train", str(config)], capsys, match="not a jaxsae run directory",
            unchanged=[foreign])


def test_the_data_is_not_a_run_directory(small_data, tmp_path, capsys):
    for run_dir in (small_data, small_data / "run"):
        config = write_config(tmp_path / "c.yaml", small_data, run_dir)
        refused(["train", str(config)], capsys, match="is data.path", unchanged=[small_data])
    generated = tmp_path / "generated"  # data.generate would write it: the same refusal
    tree = small_config_dict(generated, generated)
    tree["data"]["generate"] = {"kind": "superposition", "tokens": 8192}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tree))
    refused(["train", str(config)], capsys, match="is data.path", unchanged=[])
    assert not generated.exists()


@pytest.mark.parametrize("inside", ["checkpoints", "sae", "checkpoints/data"])
def test_the_data_is_not_where_training_writes(tmp_path, capsys, inside):
    run = tmp_path / "run"
    generated = run / inside  # generated there, then set aside or replaced by training
    tree = small_config_dict(generated, run)
    tree["data"]["generate"] = {"kind": "superposition", "tokens": 8192}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tree))
    refused(["train", str(config)], capsys, match=f"data.path {generated}: lies in {run}/",
            unchanged=[])
    assert not run.exists()
    tree["data"]["target"] = str(run / "sweep" / "01")  # a sweep's SAE directory
    tree["data"]["path"] = str(tmp_path / "elsewhere")
    tree["sweep"] = {"seed": [0, 1]}
    config.write_text(yaml.safe_dump(tree))
    refused(["train", str(config)], capsys,
            match=f"data.target {run}/sweep/01: lies in {run}/sweep,", unchanged=[])
    assert not run.exists() and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("theirs", [
    "model: resnet\nlr: 0.1\n",
    "name: my-experiment\nseed: 42\n",  # keys jaxsae also has: still not a jaxsae config
    "name: x\ndata: {path: d}\nsae: {d_sae: 64}\nlog: {level: debug}\n",
])
def test_a_config_yaml_of_another_program_does_not_make_a_run(small_data, tmp_path, capsys,
                                                              theirs):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text(theirs)
    (project / "metrics.jsonl").write_text('{"my": "results"}\n')
    (project / "eval.json").write_text('{"acc": 0.93}\n')
    config = write_config(tmp_path / "c.yaml", small_data, project)
    refused(["train", str(config)], capsys, match="not a jaxsae run directory",
            unchanged=[project])
    # nor does a `..` after a directory that does not exist hide it
    hidden = tmp_path / "nope" / ".." / "project"
    config = write_config(tmp_path / "c.yaml", small_data, hidden)
    refused(["train", str(config)], capsys, match="not a jaxsae run directory",
            unchanged=[project])
    assert not (tmp_path / "nope").exists()


def test_checkpoints_of_another_program_are_never_set_aside(small_data, tmp_path, capsys):
    run = tmp_path / "lightning"
    (run / "checkpoints" / "1000").mkdir(parents=True)
    (run / "checkpoints" / "1000" / "model.ckpt").write_text("weights")
    config = write_config(run / "config.yaml", small_data, run)
    refused(["train", str(config)], capsys,
            match="checkpoints/ holds 1000, which no jaxsae save wrote", unchanged=[run])


def test_an_sae_dir_training_would_replace_is_checked_before_training(run_copy, small_data,
                                                                       tmp_path, capsys):
    # a run directory (its config written there by hand) whose sae/ is not an SAE jaxsae
    # wrote: refused before any step, nothing touched
    fresh = tmp_path / "fresh"
    (fresh / "sae").mkdir(parents=True)
    (fresh / "sae" / "notes.txt").write_text("mine")
    config = write_config(fresh / "config.yaml", small_data, fresh)
    line = refused(["train", str(config), "--no-progress"], capsys,
                   match="sae/ is not an SAE jaxsae wrote", unchanged=[fresh])
    assert "--overwrite" not in line and "--out" not in line
    assert sorted(os.listdir(fresh)) == ["config.yaml", "sae"]
    # the run's own SAE with a file added: a resumed run would replace it, so it is refused
    (run_copy / "sae" / "NOTES.md").write_text("mine")
    config = write_config(tmp_path / "c.yaml", small_data, run_copy,
                          optim={"total_tokens": 256 * 32})
    refused(["train", str(config), "--no-progress"], capsys,
            match="sae/: holds files jaxsae did not write (NOTES.md)", unchanged=[run_copy])
    (run_copy / "sae" / "NOTES.md").unlink()
    assert cli.main(["train", str(config), "--no-progress"]) == 0


def test_a_run_whose_files_are_of_the_wrong_kind_is_refused_before_training(run_copy,
                                                                          small_data, tmp_path,
                                                                          capsys):
    """(fault testing: a file named checkpoints made training start over, dropping the steps
    metrics.jsonl had logged, then fail at its first save; a directory named eval.json
    failed the run after its export)"""
    config = write_config(tmp_path / "c.yaml", small_data, run_copy,
                          optim={"total_tokens": 256 * 32})
    (run_copy / "checkpoints").rename(tmp_path / "moved")
    (run_copy / "checkpoints").write_text("")
    refused(["train", str(config), "--no-progress"], capsys, unchanged=[run_copy],
            match=f"run_dir {run_copy}: checkpoints is not a directory")
    (run_copy / "checkpoints").unlink()
    (tmp_path / "moved").rename(run_copy / "checkpoints")
    (run_copy / "eval.json").unlink()
    (run_copy / "eval.json").mkdir()
    refused(["train", str(config), "--no-progress"], capsys, unchanged=[run_copy],
            match=f"run_dir {run_copy}: eval.json is not a file; training writes it")
    (run_copy / "eval.json").rmdir()
    # its config.yaml damaged (fault testing: "not a jaxsae run directory", of a run)
    (run_copy / "config.yaml").write_text("garbage: [")
    refused(["train", str(config), "--no-progress"], capsys, unchanged=[run_copy],
            match=f"run_dir {run_copy}: holds checkpoints, but its config.yaml is missing or "
                  "not a jaxsae config (damaged?)")


@contextlib.contextmanager
def _read_only(directory: Path):
    """`directory` made read-only for this process: without write permission, or, for root
    (who writes through permission bits), immutable (`chattr +i`, ext4 and most others)."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        undo = ["chmod", "755", str(directory)]
    else:
        if shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i", str(directory)], capture_output=True).returncode:
            pytest.skip("running as root on a file system without chattr +i")
        undo = ["chattr", "-i", str(directory)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_read_only_run_directory(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    config = write_config(run / "config.yaml", small_data, run)
    with _read_only(run):
        line = refused(["train", str(config), "--no-progress"], capsys, match=str(run),
                       unchanged=[run])
    assert re.search(r"cannot write .*: (Permission denied|Operation not permitted|Read-only)",
                     line), line


# The size limit would cut the compilation cache's files too (the suite shares one).
NO_JIT_CACHE = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


def _file_size_limit(limit: int):
    """preexec_fn: every write past `limit` bytes of a file fails (EFBIG), like a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _weights(run: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in
            tensorfile.read(run / "sae" / "sae_weights.safetensors").items()}


@pytest.mark.parametrize("text", [
    # the layouts tensorstore has used for one failed write (which layer reports it depends
    # on how orbax batched the writes); each carries the OS's error code
    'OUT_OF_RANGE: Error writing local file "c/8.tmp/_sharding": Failed writing: "c/8.tmp/'
    '_sharding.__lock": Failed to write 2035 bytes to file 15: File too large '
    "[os_error_code='27']",
    'OUT_OF_RANGE: Error opening "zarr" driver: Error writing "nonfinite_steps/.zarray" in '
    'OCDBT database at local file "c/8.tmp/ocdbt.process_0/": Failed writing: "c/d/1a": '
    "File too large [source locations='tensorstore/internal/os/file_util_posix.cc:110'] "
    "[os_error_code='27']",
    "OUT_OF_RANGE: Error writing manifest: os_error_code=27",
    "INTERNAL: flush failed: File too large",
])
def test_checkpoint_write_errors_name_the_os_reason(text):
    assert checkpoint._os_reason(RuntimeError(text)) == os.strerror(errno.EFBIG)


def test_full_disk_while_saving_a_checkpoint(trained_run, small_data, tmp_path):
    """A checkpoint that cannot be written stops the run in one line; the next run cleans up
    what the failed save left and ends exactly where an uninterrupted run ends."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", small_data, run)
    result = run_jaxsae(["train", str(config), "--no-progress"], env=NO_JIT_CACHE,
                        preexec_fn=_file_size_limit(12_000))
    # Which save first crosses the limit depends on how orbax batches its writes (8 or 16).
    line = assert_one_line_error(result.returncode, result.stderr, command="train",
                                 match="could not write checkpoint ")
    failed = re.search(r"could not write checkpoint (\d+): File too large", line)
    assert failed, line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] for line in lines)
    assert any(p.name.startswith(failed[1]) for p in (run / "checkpoints").iterdir())
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["16", "24", "8"]
    for name, value in _weights(trained_run).items():
        np.testing.assert_array_equal(_weights(run)[name], value)


def test_full_disk_cuts_no_metrics_line(small_data, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", small_data, run,
                          checkpoint={"every_steps": 1000}, log={"every_steps": 1})
    result = run_jaxsae(["train", str(config), "--no-progress"], env=NO_JIT_CACHE,
                        preexec_fn=_file_size_limit(2_000))
    assert_one_line_error(result.returncode, result.stderr, command="train",
                          match=f"cannot write {run / 'metrics.jsonl'}")
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n") and 0 < len(text) <= 2_000
    steps = [json.loads(line)["step"] for line in text.splitlines()]
    assert steps == list(range(1, len(steps) + 1))


def test_a_start_killed_before_it_wrote_anything_leaves_a_run_that_starts(small_data, tmp_path,
                                                                           capsys):
    """(fault testing: `kill -9` while a run generated its data left run_dir holding only its
    .lock (and an empty checkpoints/); every later call refused it as not a jaxsae run
    directory, and so did a second call while the first was starting, naming no process)"""
    from jaxsae.runlock import LOCK_FILE, RunLock

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = write_config(tmp_path / "c.yaml", small_data, run)
    holder = RunLock(run, log=lambda _: None).acquire()  # a start still running
    try:
        refused(["train", str(config), "--no-progress"], capsys, unchanged=[run],
                match=f"{run}: this process is already training here")
    finally:
        holder.release()
    (run / LOCK_FILE).write_text('{"pid": 999999999, "host": "h", "since": "then"}\n')
    assert cli.main(["train", str(config), "--no-progress"]) == 0  # killed: taken over
    assert "taking over a stale lock" in capsys.readouterr().out
    assert (run / "sae" / "cfg.json").is_file()


def test_resuming_on_another_data_path_says_so(run_copy, small_data, tmp_path, capsys):
    """(fault testing: resuming with data.path changed to other data of the same shape was
    neither refused nor logged: the run mixed two data sets, the export naming the second)"""
    moved = tmp_path / "moved"
    shutil.copytree(small_data, moved)
    capsys.readouterr()
    assert cli.main(["train", str(run_copy / "config.yaml"), f"data.path={moved}",
                     "optim.total_tokens=7168", "--no-progress"]) == 0
    assert (f"data.path: {moved}, where the checkpoint trained on {small_data}"
            in capsys.readouterr().out)


def test_a_refusal_names_the_new_holder_of_a_stale_lock(tmp_path):
    """(fault testing: two starts racing for a killed run's lock: the loser named the killed
    process, read before the winner wrote its own record)"""
    import fcntl
    import json
    import socket
    import threading

    from jaxsae.runlock import RunLocked

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = {"host": socket.gethostname(), "since": "2026-12-06 00:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, **record}) + "\n")
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the winner, about to write its record
    winner = os.getppid()  # (a live process other than this one)
    mine = (json.dumps({"pid": winner, **record}) + "\n").encode()
    writer = threading.Timer(0.2, lambda: (os.ftruncate(fd, 0), os.pwrite(fd, mine, 0)))
    writer.start()
    try:
        with pytest.raises(RunLocked, match=f"pid {winner} on"):
            RunLock(tmp_path).acquire()
    finally:
        writer.join()
        os.close(fd)
