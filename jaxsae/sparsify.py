"""EleutherAI sparsify's on-disk format: `cfg.json` (its SparseCoderConfig plus `d_in`) and
`sae.safetensors` (`encoder.weight` [d_sae, d_in], `encoder.bias`, `W_dec` [d_sae, d_in],
`b_dec`), which `sparsify.SparseCoder.load_from_disk` reads. Its encoder is
TopK(ReLU((x − b_dec) · W_encᵀ + b_enc)): jaxsae's `topk` SAE, which is the one activation
written and read here (`jaxsae export --format sparsify`, `jaxsae import` of a sparsify
directory). sparsify's transcoders and skip connections are not read yet (jaxsae's own
transcoders export in SAELens's layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxsae import outputs, sae, tensorfile
from jaxsae.config import SAEConfig
from jaxsae.errors import DataError, ExportError
from jaxsae.parsing import is_positive_int

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def is_sparsify(path: str | Path) -> bool:
    """Whether `path` looks like a sparsify SAE: its cfg.json sizes the SAE sparsify's way
    (`num_latents` or `expansion_factor`) and names no SAELens `architecture`. (Not whether
    it is whole: `read_sparsify` names a missing `k` or weights file; fault testing: they
    were reported as a SAELens cfg.json without its architecture.)"""
    path = Path(path)
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and "architecture" not in cfg
            and ("num_latents" in cfg or "expansion_factor" in cfg))


def check_exportable(sae_cfg: SAEConfig, dtype: str = "float32") -> None:
    """Refuses an SAE that has no sparsify form (before any work is done on it)."""
    if sae_cfg.activation != "topk":
        raise ExportError(f"--format sparsify: sparsify encodes with a per-token TopK; a "
                          f"{sae_cfg.activation!r} SAE has no sparsify form (export it as "
                          "saelens)")
    if dtype != "float32":
        raise ExportError(f"--format sparsify: --dtype {dtype} is not supported (float32)")


def export_sparsify(params: dict[str, Any], sae_cfg: SAEConfig, out: str | Path, *,
                    dtype: str = "float32", overwrite: bool = False,
                    inputs: tuple[str | Path, ...] = ()) -> Path:
    """Writes a TopK SAE's parameters (SAELens orientation, input scale folded in) as a
    sparsify directory at `out`, atomically."""
    check_exportable(sae_cfg, dtype)
    host = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    W_dec = host["W_dec"]
    d_sae, d_in = W_dec.shape
    W_enc = host.get("W_enc", W_dec.T)
    tensors = {"encoder.weight": np.ascontiguousarray(W_enc.T),
               "encoder.bias": host["b_enc"], "W_dec": W_dec, "b_dec": host["b_dec"]}
    cfg = {"activation": "topk", "expansion_factor": max(1, d_sae // d_in),
           # (rows kept at unit norm, as written: a scale folded in makes them 1/s long, which
           # sparsify's training would renormalise; fault testing)
           "normalize_decoder": sae_cfg.decoder_norm == "unit" and sae.unit_rows(W_dec),
           "num_latents": int(d_sae),
           "k": int(sae_cfg.k), "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": int(d_in)}
    # (sparsify's cfg.json takes no extra key: the marker file says jaxsae wrote it, so that
    # exporting again replaces it as it replaces a SAELens export)
    with outputs.staged_directory(out, "sae", overwrite=overwrite, inputs=inputs) as staging:
        tensorfile.write(staging / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        outputs.write_file(staging / CFG_FILE, outputs.json_text(cfg, indent=2))
    return Path(out)


def read_sparsify(path: str | Path) -> tuple[dict[str, np.ndarray], SAEConfig, np.dtype]:
    """A sparsify TopK SAE as jaxsae parameters (float32, SAELens orientation), its config and
    the dtype its decoder was stored in; every mismatch refused naming the file."""
    path = Path(path)
    file = path / CFG_FILE
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{file}: cannot read a sparsify config ({e})") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{file}: expected a JSON object")
    if cfg.get("activation", "topk") != "topk":
        raise ExportError(f"{file}: activation {cfg['activation']!r} (jaxsae reads TopK)")
    if cfg.get("transcode"):
        raise ExportError(f"{file}: a sparsify transcoder (transcode: true), which jaxsae does "
                          "not read yet")
    if cfg.get("skip_connection"):
        raise ExportError(f"{file}: a skip connection, which jaxsae does not read from "
                          "sparsify yet")
    # (fault testing: an expansion_factor null gave a traceback, "4" a d_sae of
    # '4444444444444444' blamed on the weights; normalize_decoder "no" counted as true)
    for key in ("d_in", "k"):
        if not is_positive_int(cfg.get(key)):
            raise ExportError(f"{file}: {key!r} must be a positive integer, got "
                              f"{cfg.get(key)!r}")
    d_in, k = cfg["d_in"], cfg["k"]
    num_latents = cfg.get("num_latents")
    if num_latents is None or (num_latents == 0 and not isinstance(num_latents, bool)):
        # (0 or unset: sizes by expansion_factor, as sparsify's `num_latents or ...` does)
        expansion = cfg.get("expansion_factor", 32)
        if not is_positive_int(expansion):
            raise ExportError(f"{file}: 'expansion_factor' must be a positive integer, got "
                              f"{expansion!r}")
        d_sae = d_in * expansion
    elif is_positive_int(num_latents):
        d_sae = num_latents
    else:
        raise ExportError(f"{file}: 'num_latents' must be a positive integer (0: sized by "
                          f"expansion_factor), got {num_latents!r}")
    if not isinstance(cfg.get("normalize_decoder", True), bool):
        raise ExportError(f"{file}: 'normalize_decoder' must be true or false, got "
                          f"{cfg['normalize_decoder']!r}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{weights}: not found (a sparsify SAE's weights)")
    try:
        raw = tensorfile.read(weights)
    except DataError as e:
        raise ExportError(str(e)) from None
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    tensors, stored = {}, {}
    for name, shape in expected.items():
        if name not in raw:
            raise ExportError(f"{weights}: missing tensor {name!r}")
        stored[name] = np.asarray(raw[name]).dtype
        if stored[name].kind != "f" and stored[name] != ml_dtypes.bfloat16:  # (a traceback)
            raise ExportError(f"{weights}: {name} is {stored[name]}, expected floating point "
                              "weights")
        array = np.asarray(raw[name]).astype(np.float32)
        if array.shape != shape:
            raise ExportError(f"{weights}: {name} has shape {list(array.shape)}, expected "
                              f"{list(shape)}")
        if not np.isfinite(array).all():
            raise ExportError(f"{weights}: {name} has non-finite values (NaN or inf)")
        tensors[name] = array
    if not 1 <= k <= d_sae:
        raise ExportError(f"{file}: k {k} must be in 1..num_latents ({d_sae})")
    params = {"W_enc": np.ascontiguousarray(tensors["encoder.weight"].T),
              "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
              "b_dec": tensors["b_dec"]}
    unit = (cfg.get("normalize_decoder", True)
            and sae.unit_rows(params["W_dec"], stored["W_dec"]))
    return params, SAEConfig(d_sae=int(d_sae), activation="topk", k=int(k),
                             decoder_norm="unit" if unit else "free"), stored["W_dec"]
