"""Fault injection through the real `jaxsae` command line: every bad input or failing
environment ends in one line naming the culprit (no traceback), with the documented exit
status, and nothing that existed before is lost or changed (hashed before and after).

Most cases call `jaxsae.cli.main(argv)` in this process (the command line minus the process
start, which costs seconds per case); cases that need a second process, a file-size limit or
another user start `python -m jaxsae.cli` (see `run_jaxsae`)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxsae import cli
from tests.conftest import small_config_dict

ROOT = Path(__file__).resolve().parents[2]


def snapshot(path: Path) -> dict[str, str]:
    """Every file (content hash), directory (with its mtime: `ls -t` reads it) and link under
    `path` (or `path` itself)."""
    path = Path(path)
    if path.is_symlink():
        return {"": f"link:{os.readlink(path)}"}
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    out = {"": f"dir {path.stat().st_mtime_ns}"}
    for p in sorted(path.rglob("*")):
        key = str(p.relative_to(path))
        if p.is_symlink():
            out[key] = f"link:{os.readlink(p)}"
        elif p.is_dir():
            out[key] = f"dir {p.stat().st_mtime_ns}"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_line_error(code: int, err: str, *, command: str, match: str,
                          status: int = 2) -> str:
    err = err.strip()
    assert code == status, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.match(rf"jaxsae {command}( [a-z_]+)?: error: ", lines[0]), err  # ( subcommand)
    assert match in lines[0], err
    return lines[0]


def refused(argv: list[str], capsys, *, match: str, unchanged: list[Path],
            status: int = 2) -> str:
    """Runs the command in this process and checks it is refused in one line that contains
    `match`, with nothing under `unchanged` touched."""
    before = {str(p): snapshot(p) for p in unchanged}
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    line = assert_one_line_error(code, err, command=argv[0], match=match, status=status)
    assert {str(p): snapshot(p) for p in unchanged} == before
    return line


def run_jaxsae(argv: list[str], *, cwd: Path | None = None, env: dict | None = None,
               preexec_fn=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`jaxsae ARGV` in a process of its own (no huge-page restart: not what is tested)."""
    return subprocess.run(
        [sys.executable, "-m", "jaxsae.cli", *argv], cwd=cwd or ROOT, capture_output=True,
        text=True, timeout=timeout, preexec_fn=preexec_fn,
        env={**os.environ, "JAXSAE_HUGE_PAGES": "0", "PYTHONPATH": str(ROOT), **(env or {})})


def write_config(path: Path, data: Path, run_dir: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(small_config_dict(data, run_dir, **sections)))
    return path


@pytest.fixture(scope="session")
def trained_run(small_data, tmp_path_factory) -> Path:
    """A finished 24-step run (checkpoints 8, 16, 24, sae/) made once; tests copy it."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "config.yaml", small_data, root / "run")
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    return root / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of `trained_run` (its config points at the copy)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "run_dir": str(run)}))
    return run
