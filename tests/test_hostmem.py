"""jaxsae.hostmem: the command restarts itself once with glibc's huge-page tunable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxsae import hostmem

PROBE = ("import os; from jaxsae import hostmem; hostmem.restart_with_huge_pages(); "
         "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def run_probe(**env_changes: str | None) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], out[1]


def test_wanted_respects_opt_out_and_existing_setting():
    assert not hostmem.wanted({hostmem.OPT_OUT: "0"})
    for off in ("off", "False", " no"):  # (fault testing: only "0" turned them off)
        assert not hostmem.wanted({hostmem.OPT_OUT: off})
    assert not hostmem.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"})


@pytest.mark.skipif(not hostmem.wanted({}), reason="needs Linux, glibc >= 2.35 and THP")
def test_restart_adds_the_tunable_once_and_keeps_others():
    _, tunables = run_probe()
    assert tunables == hostmem.TUNABLE
    _, tunables = run_probe(GLIBC_TUNABLES="glibc.malloc.check=0")
    assert tunables == f"glibc.malloc.check=0:{hostmem.TUNABLE}"
    _, tunables = run_probe(**{hostmem.OPT_OUT: "0"})
    assert tunables == "None"


def test_command_restarts_only_as_the_program(monkeypatch):
    """`jaxsae` (main() without argv) restarts first; main(argv) from Python code does not."""
    from jaxsae import cli

    calls = []
    monkeypatch.setattr(hostmem, "restart_with_huge_pages", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["jaxsae", "synth", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [1]
    with pytest.raises(SystemExit):
        cli.main(["synth", "--help"])
    assert calls == [1]
