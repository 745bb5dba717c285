"""SAELens-format export and import.

An exported dictionary is a directory:
  cfg.json                 architecture (standard | topk | jumprelu), d_in, d_sae, dtype, k (topk),
                           apply_b_dec_to_input, normalize_activations "none", metadata with
                           sae_lens_version; plus a "jaxsae" block describing the training run
  sae_weights.safetensors  W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec (+ threshold)
  sparsity.safetensors     "sparsity" [d_sae]: log10 firing frequency

ReLU exports as `standard`, BatchTopK as `jumprelu` with its inference threshold, tied SAEs
write W_enc = W_dec.T. The directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxsae import tensorfile
from jaxsae.config import SAEConfig
from jaxsae.errors import DataError, JaxsaeError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
# The SAELens config schema these files follow (its loader picks the 6.x code path from it).
SAE_LENS_FORMAT_VERSION = "6.0.0"

ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
ACTIVATION = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class ExportError(JaxsaeError):
    """A directory is not a valid SAELens export."""


@dataclass(frozen=True)
class LoadedSAE:
    params: dict[str, np.ndarray]
    """float32 arrays in SAELens orientation (always with W_enc)."""
    sae: SAEConfig
    """An inference config: the encode function of this SAE is `jaxsae.sae.encode`."""
    d_in: int
    cfg_json: dict[str, Any]


def export_sae(
    params: dict[str, Any],
    sae_cfg: SAEConfig,
    out: str | Path,
    *,
    log10_firing: np.ndarray | None = None,
    dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Writes `params` (jaxsae SAE parameters) as a SAELens directory at `out`, atomically."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    host = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    W_dec = host["W_dec"]
    d_sae, d_in = W_dec.shape
    weights = {
        "W_enc": host["W_enc"] if "W_enc" in host else np.ascontiguousarray(W_dec.T),
        "W_dec": W_dec,
        "b_enc": host["b_enc"],
        "b_dec": host["b_dec"],
    }
    if sae_cfg.activation in ("jumprelu", "batchtopk"):
        weights["threshold"] = host["threshold"]
    weights = {k: v.astype(EXPORT_DTYPES[dtype]) for k, v in weights.items()}
    cfg_json: dict[str, Any] = {
        "architecture": ARCHITECTURE[sae_cfg.activation],
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAE_LENS_FORMAT_VERSION, **(metadata or {})},
        "jaxsae": {"activation": sae_cfg.activation, "tied": sae_cfg.tied,
                   "decoder_norm": sae_cfg.decoder_norm, **(training or {})},
    }
    if sae_cfg.activation == "topk":
        cfg_json["k"] = sae_cfg.k
        cfg_json["rescale_acts_by_decoder_norm"] = False
    if log10_firing is None:
        log10_firing = np.full(d_sae, -10.0, np.float32)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename; mkdir follows the umask.
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        tensorfile.write(staging / WEIGHTS_FILE, weights, metadata={"format": "pt"})
        tensorfile.write(staging / SPARSITY_FILE,
                          {"sparsity": np.asarray(log10_firing, np.float32)},
                          metadata={"format": "pt"})
        (staging / CFG_FILE).write_text(json.dumps(cfg_json, indent=2))
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Moves `new` to `target`; an existing target is swapped out, never left half-written."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


# Which training activations can start from an exported architecture.
COMPATIBLE = {"standard": ("relu",), "topk": ("topk",), "jumprelu": ("jumprelu", "batchtopk")}


def read_cfg(path: str | Path) -> dict[str, Any]:
    """cfg.json of a SAELens-format directory, checked for the keys jaxsae needs."""
    path = Path(path)
    file = path / CFG_FILE
    if not path.is_dir():
        raise ExportError(f"{path}: not a directory")
    if not file.is_file():
        raise ExportError(f"{path}: missing {CFG_FILE} (not a SAELens export)")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{file}: not valid JSON ({e})") from None
    arch = cfg.get("architecture", "standard")
    if arch not in ACTIVATION:
        raise ExportError(
            f"{file}: unknown architecture {arch!r} (supported: {', '.join(ACTIVATION)})")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise ExportError(f"{file}: missing integer {key!r}")
    return cfg


def check_init_from(path: str | Path, sae_cfg: SAEConfig) -> None:
    """Config-time check that `init_from` can start a run with `sae_cfg` (reads cfg.json only)."""
    from jaxsae.errors import ConfigError

    try:
        cfg = read_cfg(path)
    except ExportError as e:
        raise ConfigError(f"init_from: {e}") from None
    arch = cfg.get("architecture", "standard")
    if sae_cfg.activation not in COMPATIBLE[arch]:
        raise ConfigError(f"init_from: {path} is a {arch!r} SAE; sae.activation must be one of "
                          f"{', '.join(COMPATIBLE[arch])}, got {sae_cfg.activation!r}")
    if cfg["d_sae"] != sae_cfg.d_sae:
        raise ConfigError(f"init_from: {path} has d_sae {cfg['d_sae']}; set sae.d_sae to it "
                          f"(got {sae_cfg.d_sae})")


def initial_params(path: str | Path, sae_cfg: SAEConfig, d_in: int,
                   scale: float = 1.0) -> dict[str, np.ndarray]:
    """jaxsae parameters for training `sae_cfg` from the SAELens directory `path`, in the
    training's input units (the inverse of the export's folding of `scale`)."""
    loaded = load_sae(path)
    if loaded.d_in != d_in:
        raise ExportError(f"init_from: {path} has d_in {loaded.d_in}, the data has {d_in}")
    p = dict(loaded.params)
    params = {"b_enc": p["b_enc"], "W_dec": p["W_dec"] * scale, "b_dec": p["b_dec"] * scale}
    if not sae_cfg.tied:
        params["W_enc"] = p["W_enc"] / scale
    if sae_cfg.activation in ("jumprelu", "batchtopk"):
        params["threshold"] = p["threshold"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}


def load_sae(path: str | Path) -> LoadedSAE:
    """Reads a SAELens-format directory (jaxsae's or SAELens's own)."""
    path = Path(path)
    cfg = read_cfg(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise ExportError(f"{path}: missing {WEIGHTS_FILE} (not a SAELens export)")
    arch = cfg.get("architecture", "standard")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ExportError(f"{path / CFG_FILE}: normalize_activations "
                          f"{cfg['normalize_activations']!r} is not supported (expected 'none')")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    try:
        raw = tensorfile.read(path / WEIGHTS_FILE)
        tensors = {k: np.asarray(v, np.float32) for k, v in raw.items()}
    except DataError as e:
        raise ExportError(str(e)) from None
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if arch == "jumprelu":
        expected["threshold"] = (d_sae,)
    for name, shape in expected.items():
        if name not in tensors:
            raise ExportError(f"{path / WEIGHTS_FILE}: missing tensor {name!r}")
        if tensors[name].shape != shape:
            raise ExportError(f"{path / WEIGHTS_FILE}: {name} has shape "
                              f"{list(tensors[name].shape)}, expected {list(shape)}")
    if not cfg.get("apply_b_dec_to_input", True):
        # jaxsae always centres by b_dec; fold "no centring" into b_enc: (x-b)W + b_enc + bW.
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    params = {k: tensors[k].astype(np.float32) for k in expected}
    activation = ACTIVATION[arch]
    k = int(cfg.get("k", 1)) if activation == "topk" else 1
    if activation == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        raise ExportError(f"{path / CFG_FILE}: rescale_acts_by_decoder_norm is not supported")
    sae_cfg = SAEConfig(d_sae=d_sae, activation=activation, k=max(1, min(k, d_sae)),
                        decoder_norm="free")
    return LoadedSAE(params=params, sae=sae_cfg, d_in=d_in, cfg_json=cfg)


# Loss terms an imported SAE fine-tunes with, by its architecture.
_IMPORT_LOSS = {
    "standard": [{"term": "mse"}, {"term": "l1", "coefficient": 1.0}],
    "topk": [{"term": "mse"}, {"term": "auxk", "coefficient": 1 / 32}],
    "jumprelu": [{"term": "mse"}, {"term": "l0", "coefficient": 1.0}],
}


def import_config(sae_dir: str | Path, run_dir: str | Path, data: str | Path,
                  overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Writes RUN/config.yaml that starts a run from the SAELens directory `sae_dir`
    (init_from) on `data`; returns its path. Overrides apply like `jaxsae train`'s."""
    from jaxsae.config import apply_override, config_from_dict
    from jaxsae.data import open_source

    sae_dir, run_dir = Path(sae_dir).absolute(), Path(run_dir)
    cfg = read_cfg(sae_dir)
    arch = cfg.get("architecture", "standard")
    loaded = load_sae(sae_dir)
    norms = np.linalg.norm(loaded.params["W_dec"], axis=1)
    tree: dict[str, Any] = {
        "name": run_dir.name,
        "run_dir": str(run_dir),
        "init_from": str(sae_dir),
        "data": {"path": str(data)},
        "sae": {"d_sae": cfg["d_sae"], "activation": ACTIVATION[arch],
                "decoder_norm": "unit" if np.allclose(norms, 1.0, atol=1e-3) else "free"},
        "loss": _IMPORT_LOSS[arch],
    }
    if arch == "topk":
        tree["sae"]["k"] = int(cfg.get("k", 1))
    for assignment in overrides:
        apply_override(tree, assignment)
    config = config_from_dict(tree)  # validates, init_from included
    source = open_source(config.data)
    if source.d_in != cfg["d_in"]:
        raise ExportError(f"{data}: d_in {source.d_in} does not match {sae_dir} "
                          f"(d_in {cfg['d_in']})")
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    out.write_text(f"# jaxsae train {out}\n# Starts from {sae_dir} (imported).\n"
                   + config.to_yaml())
    return out
