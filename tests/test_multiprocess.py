"""Two local JAX processes (gloo CPU collectives, 2 devices each) train through the real
`train()`, each reading only its own lanes, and match one process with 4 devices."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxsae import tensorfile
from jaxsae.data.synthetic import generate_superposition
from tests.conftest import SMALL_SPEC, xla_flags

ROOT = Path(__file__).resolve().parents[1]

# The workers start jax.distributed the way a launcher would: through the environment
# (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), found by `distributed: auto`.
_WORKER = r"""
import sys
import jax
data, run_dir, steps, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from jaxsae.config import config_from_dict
from jaxsae.train import train
from tests.conftest import small_config_dict
tree = small_config_dict(data, run_dir)
tree["optim"]["total_tokens"] = 256 * steps
tree["checkpoint"] = {"every_steps": every, "keep": 2}
tree["log"] = {"every_steps": 4, "curves": False}
tree["data"]["drop_norm_above"] = 2.0
import json
for key, value in json.loads(sys.argv[5] if len(sys.argv) > 5 else "{}").items():
    section, name = key.split(".")
    tree[section][name] = value
from jaxsae.errors import JaxsaeError
try:
    train(config_from_dict(tree), progress=False)
except JaxsaeError as e:  # as the command line: one line, its exit status
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))
print("worker done", jax.process_count(), len(jax.devices()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(pid: int, n: int, port: int, data: Path, run_dir: Path, devices: int,
            steps: int = 20, every: int = 10, overrides: dict | None = None):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    if n > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                   JAX_PROCESS_ID=str(pid))
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(data), str(run_dir), str(steps),
                             str(every), json.dumps(overrides or {})],
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _outputs(workers, timeout: float) -> list[tuple[str, str]]:
    """(stdout, stderr) of every worker; one that has not exited by `timeout` fails the test
    with what every worker printed (all are killed first)."""
    try:
        return [w.communicate(timeout=timeout) for w in workers]
    except subprocess.TimeoutExpired:
        for w in workers:
            w.kill()
        printed = [w.communicate() for w in workers]
        pytest.fail("a worker did not exit in time:\n" + "\n".join(
            f"process {pid} (exit {w.returncode}):\n{err[-2000:]}"
            for pid, (w, (_, err)) in enumerate(zip(workers, printed, strict=True))))


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in
            tensorfile.read(run_dir / "sae" / "sae_weights.safetensors").items()}


def test_two_processes_match_one(small_data, tmp_path):
    single = _launch(0, 1, 0, small_data, tmp_path / "single", devices=4)
    out, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    dropped = re.findall(r"data: dropped \d+ tokens.*", out)
    assert len(dropped) == 1 and " 0 tokens" not in dropped[0], out
    port = _free_port()
    workers = [_launch(pid, 2, port, small_data, tmp_path / "multi", devices=2)
               for pid in range(2)]
    for pid, w in enumerate(workers):
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
        assert "worker done 2 4" in out
        # the tokens every process's lanes left out, summed, printed once (by process 0)
        assert re.findall(r"data: dropped \d+ tokens.*", out) == (dropped if pid == 0 else [])
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "multi")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=1e-5, err_msg=name)
    lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5  # only process 0 writes metrics (steps 4, 8, ..., 20)


def test_sigterm_to_one_process_stops_every_process_after_the_same_step(small_data, tmp_path):
    """(fault testing: SIGTERM reaching one process, or the processes at different moments,
    left both waiting forever in a collective: each stopped on its own.) Every process saves
    the same step and exits 143; a refusal only process 0 meets stops the others too."""
    run_dir, port = tmp_path / "run", _free_port()
    workers = [_launch(pid, 2, port, small_data, run_dir, 2, steps=100_000, every=100_000)
               for pid in range(2)]
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").is_file()
               and (run_dir / "metrics.jsonl").read_text().strip()):
        assert all(w.poll() is None for w in workers), workers[0].communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGTERM)  # process 1 alone: process 0 must stop with it
    outputs = _outputs(workers, 120)
    steps = []
    for w, (_, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 128 + signal.SIGTERM, err
        steps.append(re.search(r"interrupted by SIGTERM at step (\d+)", err).group(1))
    assert steps[0] == steps[1]
    assert (run_dir / "checkpoints" / steps[0]).is_dir()

    port = _free_port()  # run_dir a file: process 0 refuses it, process 1 learns why
    (tmp_path / "file").write_text("not a run")
    workers = [_launch(pid, 2, port, small_data, tmp_path / "file", 2) for pid in range(2)]
    outputs = _outputs(workers, 120)
    assert [w.returncode for w in workers] == [2, 2], outputs
    assert "is a file" in outputs[1][1] and "(on process 0)" in outputs[1][1]
    assert "Traceback" not in outputs[0][1] + outputs[1][1]


def test_processes_given_different_configs_or_data_are_refused(small_data, tmp_path):
    """(fault testing: two processes given different learning rates, seeds or data trained a
    mix of both and exited 0; different widths crashed in a gloo collective.) Every process
    stops with one line naming the key, before the run directory is made; data of the same
    shape but other rows is told apart by its rows."""
    other = generate_superposition(dataclasses.replace(SMALL_SPEC, seed=4),
                                   tmp_path / "other", progress=False)
    for process_1, match in (
            ({"sae.d_sae": 32, "optim.lr": 0.5},
             "process 1 was not given what process 0 was: sae.d_sae is 32 there, 64 on "
             "process 0 (and 1 more key)"),
            ({"data.path": str(other)},
             f"process 1 was not given what process 0 was: data.path {other} holds other data "
             "there (16,384 tokens 16 wide, rows "),
            # an error only one process meets stops both (the other waited for good)
            ({"data.path": str(tmp_path / "none")}, "data directory does not exist"),
            ({"sae.activation": "nope"}, "sae.activation")):
        port, run_dir = _free_port(), tmp_path / "run"
        workers = [_launch(pid, 2, port, small_data, run_dir, 2,
                           overrides=process_1 if pid else None) for pid in range(2)]
        outputs = _outputs(workers, 120)
        assert [w.returncode for w in workers] == [2, 2], outputs
        for _, err in outputs:
            assert match in err and "Traceback" not in err, err
        if "process 1 was not" not in match:  # process 0 says whose error it is
            assert "(on process 1)" in outputs[0][1], outputs[0][1]
        assert not run_dir.exists()


def test_cluster_detection(monkeypatch):
    from jaxsae import processes
    from jaxsae.errors import ConfigError

    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS",
                "TPU_WORKER_HOSTNAMES", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    assert processes.cluster_environment() is None
    assert processes.initialize_distributed("auto") is None  # a plain single process
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert processes.cluster_environment() is None  # one task: nothing to coordinate
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert processes.cluster_environment() == "SLURM_JOB_ID"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-a,host-b")
    assert processes.cluster_environment() == "TPU_WORKER_HOSTNAMES"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    assert processes.cluster_environment() == "JAX_COORDINATOR_ADDRESS"
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        processes.initialize_distributed("auto")
    # refused on every process, before joining (process 1 waited 5 minutes for port -1)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    for address in ("127.0.0.1:-1", "127.0.0.1:70000", "127.0.0.1", ":1234"):
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", address)
        with pytest.raises(ConfigError, match=f"JAX_COORDINATOR_ADDRESS '{address}' is not "
                                              "HOST:PORT with a port from 1 to 65535"):
            processes.initialize_distributed("auto")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ConfigError, match=r"JAX_PROCESS_ID 2 is not one of the "
                                          r"JAX_NUM_PROCESSES \(2\) processes 0\.\.1"):
        processes.initialize_distributed("auto")


@pytest.mark.slow  # ~60 s on 2 cores: three launches of two processes. The default run keeps
# the two-process equivalence above and the single-process kill / resume (tests/test_cli.py).
def test_kill_one_process_then_restart_both(small_data, tmp_path):
    """SIGKILL one of two processes after a checkpoint; restarting both resumes exactly: the
    result equals an uninterrupted run of the same two processes."""
    steps, every = 240, 24

    def two_processes(run_dir):
        port = _free_port()
        return [_launch(pid, 2, port, small_data, run_dir, 2, steps, every) for pid in range(2)]

    def finish(workers):
        outputs = [w.communicate(timeout=600) for w in workers]
        for w, (_, err) in zip(workers, outputs, strict=True):
            assert w.returncode == 0, err
        return outputs

    finish(two_processes(tmp_path / "straight"))

    workers = two_processes(tmp_path / "multi")
    deadline = time.time() + 300
    while not (tmp_path / "multi" / "checkpoints" / str(every)).is_dir():
        assert all(w.poll() is None for w in workers), workers[0].communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    assert workers[1].poll() is None, "the run ended before it could be interrupted"
    workers[1].send_signal(signal.SIGKILL)
    workers[1].wait(timeout=60)
    try:  # its partner waits in a collective for a peer that is gone: the job is down
        workers[0].wait(timeout=2)
    except subprocess.TimeoutExpired:
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(timeout=60)
    assert not (tmp_path / "multi" / "sae").exists()

    outputs = finish(two_processes(tmp_path / "multi"))  # the same command again
    assert "resuming" in outputs[0][0]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "multi")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    steps_logged = [json.loads(x)["step"] for x in
                    (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(4, steps + 1, 4))
