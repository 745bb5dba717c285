"""Two local JAX processes (gloo CPU collectives, 2 devices each) train through the real
`train()`, each reading only its own lanes, and match one process with 4 devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxsae import tensorfile

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r"""
import sys
pid, n, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data, run_dir = sys.argv[4], sys.argv[5]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if n > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n,
                               process_id=pid)
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
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(pid), str(n), str(port),
                             str(data), str(run_dir)], cwd=ROOT, env=env,
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
