"""jaxsae <-> EleutherAI sparsify, against the real `eai-sparsify` package: a TopK export that
SparseCoder.load_from_disk reads and encodes to the same top-k, and a sparsify SAE that
`jaxsae import` starts a run from, encoding as sparsify does."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxsae import cli, sae
from jaxsae.export import load_sae
from jaxsae.sparsify import read_sparsify
from jaxsae.train import train
from tests.conftest import small_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _sparsify(job: dict, tmp_path: Path) -> dict[str, np.ndarray]:
    python = os.environ.get("JAXSAE_INTEROP_PYTHON") or str(ROOT / ".venv-interop/bin/python")
    if not Path(python).exists():
        pytest.skip("no PyTorch environment: scripts/test.sh builds .venv-interop")
    probe = subprocess.run([python, "-c", "import sparsify"], capture_output=True)
    if probe.returncode:
        pytest.skip("eai-sparsify is not installed in .venv-interop")
    job = {**job, "out": str(tmp_path / "sparsify_out.npz")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([python, str(HERE / "sparsify_side.py"), str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(job["out"]))


def _same_topk(ours_acts: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
    for row, (idx, val) in enumerate(zip(indices, values, strict=True)):
        nonzero = np.flatnonzero(ours_acts[row])
        assert set(nonzero) <= set(idx.tolist()), row  # sparsify keeps exact zeros too
        np.testing.assert_allclose(ours_acts[row, idx], val, rtol=1e-5, atol=1e-5)


def test_topk_export_loads_in_sparsify_with_the_same_codes(small_data, tmp_path):
    cfg = small_config(small_data, tmp_path / "run", sae={"activation": "topk", "k": 4})
    result = train(cfg, progress=False)
    out = tmp_path / "sp"
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(out), "--format",
                     "sparsify"]) == 0
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32) * 2
    np.save(tmp_path / "x.npy", x)
    got = _sparsify({"kind": "encode", "dir": str(out), "x": str(tmp_path / "x.npy")},
                    tmp_path)
    loaded = load_sae(result.sae_dir)  # the SAELens export of the same run
    acts = np.asarray(sae.encode(loaded.params, x, loaded.sae))
    _same_topk(acts, got["top_indices"], got["top_acts"])
    recon = acts @ loaded.params["W_dec"] + loaded.params["b_dec"]
    np.testing.assert_allclose(got["recon"], recon, rtol=1e-4, atol=1e-4)


def test_import_of_a_sparsify_sae_encodes_as_sparsify_and_trains(small_data, tmp_path):
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    src = tmp_path / "eleuther"
    got = _sparsify({"kind": "make", "dir": str(src), "x": str(tmp_path / "x.npy"),
                     "d_sae": 64, "k": 4}, tmp_path)
    params, sae_cfg, _ = read_sparsify(src)
    acts = np.asarray(sae.encode(params, x, sae_cfg))
    _same_topk(acts, got["top_indices"], got["top_acts"])
    assert cli.main(["import", str(src), "--out", str(tmp_path / "run"), "--data",
                     str(small_data), "optim.total_tokens=2048"]) == 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["sae"]["activation"] == "topk" and config["sae"]["k"] == 4
    assert cli.main(["train", str(tmp_path / "run" / "config.yaml"), "--no-progress"]) == 0
