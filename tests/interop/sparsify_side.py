"""The sparsify side of tests/interop/test_sparsify.py, run in .venv-interop as a script:
`python sparsify_side.py JOB.json`. Jobs: `encode` (load a directory with
SparseCoder.load_from_disk, encode and decode `x`, write top indices / values and the
reconstruction) and `make` (save a random SparseCoder with save_to_disk, then encode `x`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sparsify import SparseCoder, SparseCoderConfig


def _encode(coder: SparseCoder, x: np.ndarray, out: Path) -> None:
    with torch.no_grad():
        enc = coder.encode(torch.from_numpy(x))
        recon = coder.decode(enc.top_acts, enc.top_indices)
    np.savez(out, top_indices=enc.top_indices.numpy(), top_acts=enc.top_acts.numpy(),
             recon=recon.numpy())


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    x = np.load(job["x"])
    if job["kind"] == "encode":
        coder = SparseCoder.load_from_disk(job["dir"], device="cpu")
    else:
        torch.manual_seed(0)
        cfg = SparseCoderConfig(num_latents=job["d_sae"], k=job["k"])
        coder = SparseCoder(x.shape[1], cfg, device="cpu")
        with torch.no_grad():
            coder.b_dec.normal_(std=0.1)
            coder.encoder.bias.normal_(std=0.1)
        coder.save_to_disk(job["dir"])
    _encode(coder, x, Path(job["out"]))


if __name__ == "__main__":
    main()
