"""Two local JAX processes (gloo CPU collectives, 2 devices each) train through the real
`train()`, each reading only its own lanes, and match one process with 4 devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxsae import tensorfile

ROOT = Path(__file__).resolve().parents[1]

# The workers start jax.distributed the way a launcher would: through the environment
# (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), found by `distributed: auto`.
_WORKER = r"""
import sys
import jax
data, run_dir = sys.argv[1], sys.argv[2]
from jaxsae.config import config_from_dict
from jaxsae.train import train
from tests.conftest import small_config_dict
tree = small_config_dict(data, run_dir)
tree["optim"]["total_tokens"] = 256 * 20
tree["checkpoint"] = {"every_steps": 10, "keep": 2}
tree["data"]["drop_norm_above"] = 2.5
train(config_from_dict(tree), progress=False)
print("worker done", jax.process_count(), len(jax.devices()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(pid: int, n: int, port: int, data: Path, run_dir: Path, devices: int):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    if n > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                   JAX_PROCESS_ID=str(pid))
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(data), str(run_dir)],
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in
            tensorfile.read(run_dir / "sae" / "sae_weights.safetensors").items()}


def test_two_processes_match_one(small_data, tmp_path):
    single = _launch(0, 1, 0, small_data, tmp_path / "single", devices=4)
    out, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    port = _free_port()
    workers = [_launch(pid, 2, port, small_data, tmp_path / "multi", devices=2)
               for pid in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
        assert "worker done 2 4" in out
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "multi")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=1e-5, err_msg=name)
    lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5  # only process 0 writes metrics (steps 4, 8, ..., 20)


def test_cluster_detection(monkeypatch):
    from jaxsae import sharding
    from jaxsae.errors import ConfigError

    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS",
                "TPU_WORKER_HOSTNAMES", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.cluster_environment() is None
    assert sharding.initialize_distributed("auto") is None  # a plain single process
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sharding.cluster_environment() is None  # one task: nothing to coordinate
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding.cluster_environment() == "SLURM_JOB_ID"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-a,host-b")
    assert sharding.cluster_environment() == "TPU_WORKER_HOSTNAMES"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    assert sharding.cluster_environment() == "JAX_COORDINATOR_ADDRESS"
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        sharding.initialize_distributed("auto")
