"""SAELens-format export and import.

An exported dictionary is a directory:
  cfg.json                 architecture (standard | topk | jumprelu), d_in, d_sae, dtype, k (topk),
                           apply_b_dec_to_input, normalize_activations "none", metadata with
                           sae_lens_version; plus a "jaxsae" block describing the training run
  sae_weights.safetensors  W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec (+ threshold)
  sparsity.safetensors     "sparsity" [d_sae]: log10 firing frequency

ReLU exports as `standard`, BatchTopK as `jumprelu` with its inference threshold, tied SAEs
write W_enc = W_dec.T. The directory is written under a temporary name and renamed into place;
an existing directory is replaced only if it is an export jaxsae wrote (`jaxsae.outputs`).
Reading refuses, naming the file and the field, anything that is not a complete SAE: a cfg.json
that is not a JSON object or lacks `architecture`, `d_in`, `d_sae` (and `k` for TopK); weights
that are missing, misshapen, not floating point, or not finite.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shlex
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxsae import __version__, activations, outputs, sae, sparsify, tensorfile
from jaxsae.checks import check_run
from jaxsae.config import SAEConfig
from jaxsae.errors import ConfigError, DataError, ExportError
from jaxsae.parsing import is_positive_int

CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = outputs.SAELENS_FILES
# The SAELens config schema these files follow (its loader picks the 6.x code path from it).
SAE_LENS_FORMAT_VERSION = "6.0.0"

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@dataclass(frozen=True)
class LoadedSAE:
    params: dict[str, np.ndarray]
    """float32 arrays in SAELens orientation (always with W_enc)."""
    sae: SAEConfig
    """An inference config: the encode function of this SAE is `jaxsae.sae.encode`."""
    d_in: int
    cfg_json: dict[str, Any]
    d_out: int | None = None
    """A transcoder's target width (None: an SAE)."""
    stored_dtype: Any = np.float32
    """The dtype the decoder was stored in (its rounding bounds how far from 1 a unit row's
    norm may read: `sae.unit_rows`)."""


def _export_dtype(dtype: str) -> np.dtype:
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    return EXPORT_DTYPES[dtype]


def as_stored(params: dict[str, Any], dtype: str) -> dict[str, Any]:
    """`params` as an export in `dtype` holds them (read back as float32): rounded to bfloat16
    for a bfloat16 export, so that what is evaluated is what is written."""
    stored = _export_dtype(dtype)
    if stored == np.float32:
        return params
    return {k: jnp.asarray(v, jnp.float32).astype(stored).astype(jnp.float32)
            for k, v in params.items()}


def export_sae(
    params: dict[str, Any],
    sae_cfg: SAEConfig,
    out: str | Path,
    *,
    log10_firing: np.ndarray | None = None,
    dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
    inputs: tuple[str | Path, ...] = (),
) -> Path:
    """Writes `params` (jaxsae SAE parameters) as a SAELens directory at `out`, atomically,
    with sparsity.safetensors when `log10_firing` (`evaluate.log10_firing` of the latents'
    firing frequencies, measured on tokens) is given: no file rather than made-up values.
    An existing `out` is replaced if it is an export jaxsae wrote, holding nothing else (or
    with `overwrite`; see `outputs.check_target`, which also protects `inputs`)."""
    stored = _export_dtype(dtype)
    kind = activations.get(sae_cfg.activation)
    host = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    W_dec = host["W_dec"]
    d_sae, d_in = W_dec.shape
    weights = {"W_dec": W_dec, "b_dec": host["b_dec"], **kind.export_tensors(host)}
    if kind.has_encoder:  # tied SAEs write W_enc = W_dec.T (given no W_enc: not scaled)
        weights["W_enc"] = host["W_enc"] if "W_enc" in host else np.ascontiguousarray(W_dec.T)
    architecture, shape = kind.architecture, {"d_in": int(d_in)}
    if sae_cfg.transcoder:  # d_in is the encoder's; the decoder writes d_out
        architecture = transcoder_architecture(kind.architecture, sae_cfg.skip)
        shape = {"d_in": int(weights["W_enc"].shape[0]), "d_out": int(d_in)}
        if sae_cfg.skip:
            weights["W_skip"] = host["W_skip"]
    weights = {k: v.astype(stored) for k, v in weights.items()}
    for name, array in weights.items():  # (no reader would take it: load_sae refuses it too)
        if bad := int(np.count_nonzero(~np.isfinite(array))):
            raise ExportError(f"{out}: not written: {name} has {bad} non-finite values (NaN "
                              "or inf)")
    cfg_json: dict[str, Any] = {
        "architecture": architecture,
        **shape,
        "d_sae": int(d_sae),
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": not sae_cfg.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAE_LENS_FORMAT_VERSION, **(metadata or {})},
        "jaxsae": {"version": __version__,  # (of the jaxsae that wrote the export)
                   "activation": sae_cfg.activation, "tied": sae_cfg.tied,
                   "decoder_norm": sae_cfg.decoder_norm,
                   **({"k": sae_cfg.k} if kind.has_k else {}),
                   **(training or {})},
        **kind.export_cfg(sae_cfg),
    }
    with outputs.staged_directory(out, "sae", overwrite=overwrite, inputs=inputs,
                                  marker=False) as staging:
        tensorfile.write(staging / WEIGHTS_FILE, weights, metadata={"format": "pt"})
        if log10_firing is not None:
            tensorfile.write(staging / SPARSITY_FILE,
                             {"sparsity": np.asarray(log10_firing, np.float32)},
                             metadata={"format": "pt"})
        outputs.record_sae_files(staging, cfg_json)  # (what a later replacement checks)
        outputs.write_file(staging / CFG_FILE, outputs.json_text(cfg_json, indent=2))  # NaN: null
    return Path(out)


# SAELens's transcoder classes by the architecture of their encoder, without / with W_skip.
TRANSCODER_ARCHITECTURES = {"standard": ("transcoder", "skip_transcoder"),
                            "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder")}


def transcoder_architecture(architecture: str, skip: bool) -> str:
    """SAELens's architecture name of a transcoder whose codes are those of `architecture`
    (the checks refuse, before training, activations with none)."""
    if architecture not in TRANSCODER_ARCHITECTURES:
        raise ExportError(f"SAELens has no transcoder of architecture {architecture!r} (it has "
                          "ReLU and JumpReLU ones)")
    return TRANSCODER_ARCHITECTURES[architecture][skip]


def transcoder_base(architecture: str) -> tuple[str, bool] | None:
    """(the SAE architecture of its codes, whether it has W_skip) of a SAELens transcoder
    architecture; None for others."""
    for base, names in TRANSCODER_ARCHITECTURES.items():
        if architecture in names:
            return base, names.index(architecture) == 1
    return None


def read_cfg(path: str | Path, *, transcoders: bool = False) -> dict[str, Any]:
    """cfg.json of a SAELens-format directory, checked for the keys jaxsae needs.
    Transcoders are refused unless the caller reads them (`transcoders`). A sparsify
    directory's: the cfg.json its SAELens export would have (`load_sae`)."""
    path = Path(path)
    if sparsify.is_sparsify(path):
        return _load_sparsify(path).cfg_json
    file = path / CFG_FILE
    if not path.exists():  # (fault testing: "not a directory", of a path that is nothing)
        raise ExportError(f"{path}: does not exist")
    if not path.is_dir():
        raise ExportError(f"{path}: not a directory")
    if not file.is_file():
        inside = (f"; a training run's SAE is {path / 'sae'}"
                  if (path / "sae" / CFG_FILE).is_file() else "")
        # (a sparsify run folder, or the Hub layout: one SAE per sub-folder; fault testing:
        # they were "not a SAELens export", without a word on what they hold)
        subs = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != "sae" and (
            (p / CFG_FILE).is_file() or sparsify.is_sparsify(p)))
        # a sweep's run or export: its SAEs in sweep/<i>/sae/ or sweep/<i>/ (fault testing:
        # nothing said where they were)
        sweep = sorted(str(Path("sweep") / p.name / inner) for p in (path / "sweep").glob("*")
                       for inner in ("sae", ".") if (p / inner / CFG_FILE).is_file())
        subs = subs or sweep
        if subs:
            inside += (f"; it holds SAEs in sub-folders: {', '.join(subs[:4])}"
                       f"{f' and {len(subs) - 4} more' if len(subs) > 4 else ''} (give one)")
        raise ExportError(f"{path}: missing {CFG_FILE} (not a SAELens or sparsify "
                          f"export{inside})")
    try:
        cfg = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ExportError(f"{file}: not a text file (expected a JSON object)") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{file}: expected a JSON object, got a JSON {type(cfg).__name__}")
    known = activations.architectures()
    if "architecture" not in cfg:
        raise ExportError(f"{file}: missing 'architecture' (one of {', '.join(known)})")
    arch = cfg["architecture"]
    transcoder = transcoder_base(arch) if isinstance(arch, str) else None
    if transcoder is not None:
        if not transcoders:
            raise ExportError(f"{file}: a {arch}; this reads SAEs, not transcoders (jaxsae "
                              "eval SAE_DIR --data X --target Y evaluates a transcoder)")
        if not is_positive_int(cfg.get("d_out")):
            raise ExportError(f"{file}: 'd_out' must be a positive integer, got "
                              f"{cfg.get('d_out')!r}")
        arch = transcoder[0]
    if not isinstance(arch, str) or arch not in known:
        raise ExportError(f"{file}: unknown architecture {arch!r} (supported: "
                          f"{', '.join(known)})")
    for key in ("d_in", "d_sae"):
        if not is_positive_int(cfg.get(key)):
            raise ExportError(f"{file}: {key!r} must be a positive integer, got "
                              f"{cfg.get(key)!r}")
    try:
        activations.for_architecture(arch).check_saelens_cfg(cfg, file)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    # (fault testing: the string "false" was truthy, so the input was centred by b_dec, which
    # the file said not to do)
    centring = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(centring, bool) and centring not in (0, 1):
        raise ExportError(f"{file}: apply_b_dec_to_input must be true or false, got "
                          f"{centring!r}")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ExportError(f"{file}: normalize_activations {cfg['normalize_activations']!r} "
                          "is not supported (expected 'none')")
    _check_training_record(cfg, file)
    if cfg.get("metadata") is None:  # (null: none; fault testing: every reader failed on it)
        cfg["metadata"] = {}
    return cfg


def _check_training_record(cfg: dict[str, Any], file: Path) -> None:
    """The fields an evaluation reads to leave out the tokens training left out or trained on
    (`jaxsae.data.window`): absent, null or well formed. A damaged one is refused, not taken
    for an SAE trained elsewhere, which would evaluate on other tokens without a word."""
    for block in ("jaxsae", "metadata"):
        if cfg.get(block) is not None and not isinstance(cfg[block], dict):
            raise ExportError(f"{file}: {block!r} must be a JSON object, got "
                              f"{json.dumps(cfg[block])}")
    own = cfg.get("jaxsae") or {}
    multiple = own.get("drop_norm_above")
    if multiple is not None and not (isinstance(multiple, int | float)
                                     and not isinstance(multiple, bool) and multiple >= 1):
        # (>= 1, as training takes it: fault testing found 0.3 accepted, and evaluations
        # then dropped most tokens as outliers)
        raise ExportError(f"{file}: jaxsae.drop_norm_above must be a number >= 1 (a multiple "
                          f"of the median norm) or null, got {json.dumps(multiple)}")
    end = own.get("held_out_from")
    if end is not None and not (isinstance(end, int) and not isinstance(end, bool) and end >= 0):
        raise ExportError(f"{file}: jaxsae.held_out_from must be an integer >= 0 or null, got "
                          f"{json.dumps(end)}")
    path = (cfg.get("metadata") or {}).get("dataset_path")
    if path is not None and not isinstance(path, str):
        raise ExportError(f"{file}: metadata.dataset_path must be a string or null, got "
                          f"{json.dumps(path)}")
    # what an import reads of how the SAE was trained (fault testing: tracebacks)
    details = (cfg.get("metadata") or {}).get("training_architecture_details")
    if details is not None and not isinstance(details, dict):
        raise ExportError(f"{file}: metadata.training_architecture_details must be a JSON "
                          f"object or null, got {json.dumps(details)}")
    for where, block in (("", cfg), ("metadata.training_architecture_details.", details or {})):
        for key in activations.SAELENS_TRAINING_NUMBERS:
            value = block.get(key)
            if value is not None and not activations.is_finite_number(value):
                # (fault testing: NaN, "five" and true were imported as the default 1.0)
                raise ExportError(f"{file}: {where}{key} must be a finite number or null, got "
                                  f"{json.dumps(value)}")
            if key == "jumprelu_bandwidth" and value is not None and not value > 0:
                # (a width; fault testing: 0 was refused naming sae.jumprelu_bandwidth, a key
                # of no config the user wrote, by eval too)
                raise ExportError(f"{file}: {where}{key} must be > 0 or null, got "
                                  f"{json.dumps(value)}")
    loss = own.get("loss")
    if loss is not None and not (isinstance(loss, list) and loss):
        # (fault testing: `"loss": "mse"` was ignored, and SAELens's fields read instead)
        raise ExportError(f"{file}: jaxsae.loss must be a non-empty JSON list of terms or "
                          f"null, got {json.dumps(loss)}")
    optim = own.get("optim")
    if optim is not None and not isinstance(optim, dict):
        raise ExportError(f"{file}: jaxsae.optim must be a JSON object or null, got "
                          f"{json.dumps(optim)}")
    batch = (optim or {}).get("batch_size")
    if batch is not None and not is_positive_int(batch):
        raise ExportError(f"{file}: jaxsae.optim.batch_size must be a positive integer or "
                          f"null, got {json.dumps(batch)}")


def check_init_from(path: str | Path, sae_cfg: SAEConfig) -> None:
    """Refuses an `init_from` that cannot start a run with `sae_cfg` (reads cfg.json only;
    called when a run starts from it, never on resume)."""
    try:
        cfg = read_cfg(path)
    except ExportError as e:
        raise ConfigError(f"init_from: {e}") from None
    arch = cfg["architecture"]
    if sae_cfg.activation not in activations.starting_from(arch):
        raise ConfigError(f"init_from: {path} is a {arch!r} SAE; sae.activation must be one of "
                          f"{', '.join(activations.starting_from(arch))}, got "
                          f"{sae_cfg.activation!r}")
    if cfg["d_sae"] != sae_cfg.d_sae:
        raise ConfigError(f"init_from: {path} has d_sae {cfg['d_sae']}; set sae.d_sae to it "
                          f"(got {sae_cfg.d_sae})")


def _own(cfg_json: Mapping[str, Any]) -> dict[str, Any]:
    """The `jaxsae` block of a cfg.json (empty when it has none: SAELens's, or damaged)."""
    own = cfg_json.get("jaxsae")
    return own if isinstance(own, dict) else {}


def initial_params(path: str | Path, sae_cfg: SAEConfig, d_in: int,
                   scale: float = 1.0, log=lambda _: None) -> dict[str, np.ndarray]:
    """jaxsae parameters for training `sae_cfg` from the SAELens directory `path`, in the
    training's input units (the inverse of the export's folding of `scale`). A tied
    `sae_cfg` takes the decoder alone: `log` says so when `path`'s encoder is not its
    decoder's transpose (fault testing: its trained encoder was dropped without a word)."""
    loaded = load_sae(path)
    if loaded.d_in != d_in:
        raise ExportError(f"init_from: {path} has d_in {loaded.d_in}, the data has {d_in}")
    p = dict(loaded.params)
    kind = activations.get(sae_cfg.activation)
    params = {name: p[name] for name in kind.own_param_names(sae_cfg)}
    params.update(W_dec=p["W_dec"] * scale, b_dec=p["b_dec"] * scale)
    if kind.has_encoder and not sae_cfg.tied:
        params["W_enc"] = p["W_enc"] / scale
    if sae_cfg.decoder_norm == "unit" and not sae.unit_rows(params["W_dec"], loaded.stored_dtype):
        norms = np.linalg.norm(params["W_dec"].astype(np.float64), axis=1)
        if not _rows_made_unit(params, norms, loaded.stored_dtype):
            stored = np.linalg.norm(p["W_dec"].astype(np.float64), axis=1)  # (as the note of
            # `decoder_norm: auto` says them, in the start's own units: fault testing)
            raise ConfigError(f"init_from: {path} has decoder rows of norm "
                              f"{norm_range(stored)}; " + _unit_refusal(sae_cfg))
        # rows all of one length r: an input scale folded in at another scale than this
        # data's (fault testing: an imported TopK SAE fine-tuned on other data was refused).
        # The same function with unit rows: codes r times larger, rows r times shorter.
        log(f"init_from: {path}'s decoder rows are {norms[0]:.4g} long at this data's scale: "
            "made unit, the codes scaled to match")
        params["W_dec"] = params["W_dec"] / norms[:, None]
        for name in ("W_enc", "b_enc", "threshold"):
            if name in params:
                params[name] = params[name] * norms
    if sae_cfg.tied and kind.has_encoder and "W_enc" in p and not _own(
            loaded.cfg_json).get("tied"):
        # (jaxsae's tied exports are tied: with an input scale s folded in, W_enc = s² W_dec.T;
        # fault testing: the note was said of each of them once normalising was the default)
        gap = float(np.max(np.abs(np.asarray(p["W_enc"], np.float32)
                                  - np.asarray(p["W_dec"], np.float32).T)))
        if gap > 1e-6:
            log(f"init_from: {path} has an encoder of its own (up to {gap:.3g} from its "
                "decoder's transpose); sae.tied: true starts from the decoder alone, and the "
                "encoder is its transpose")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}


def start_rows(path: str | Path, sae_cfg: SAEConfig) -> str | None:
    """What the decoder rows of the `init_from` SAE at `path` are to a run of `sae_cfg`: None
    when unit rows can start from them (unit, or all of one length, at any input scale, that
    the codes can absorb), else their norms' range as text (`sae.decoder_norm: auto` then
    keeps them free)."""
    check_init_from(path, sae_cfg)
    loaded = load_sae(path)
    kind = activations.get(sae_cfg.activation)
    params = {name: loaded.params[name] for name in kind.own_param_names(sae_cfg)}
    params["W_dec"] = loaded.params["W_dec"]
    if sae.unit_rows(params["W_dec"], loaded.stored_dtype):
        return None
    norms = np.linalg.norm(params["W_dec"].astype(np.float64), axis=1)
    if _rows_made_unit(params, norms, loaded.stored_dtype):
        return None
    return norm_range(norms)


def _rows_made_unit(params: dict[str, np.ndarray], norms: np.ndarray,
                    stored_dtype: Any = np.float32) -> bool:
    """Whether decoder rows of these `norms`, all of one length up to the rounding of the
    dtype they were stored in (bfloat16 moves a norm by up to ~0.4 %; fault testing: unit rows
    exported in bfloat16 at another input scale were refused), can be made unit with the codes
    scaled to match (the function unchanged)."""
    band = sae.unit_band(stored_dtype)
    # (`sae.unit_rows`' band around 1, at any length: rows it calls unit are of one length at
    # every input scale; fault testing: rows of 0.9992..1.0008, unit to it, were refused once
    # the input scale was folded in, and at the band's edge still)
    return bool(_rescalable(params) and norms.min() > 0
                and norms.max() * (1 - band) <= norms.min() * (1 + band) * (1 + 1e-9))


def norm_range(norms: np.ndarray) -> str:
    """`low..high` with the digits that tell them apart (fault testing: "0.999..1" for rows of
    0.9992..1.0008)."""
    low, high = float(np.min(norms)), float(np.max(norms))
    spread = (high - low) / high if high > 0 else 1.0
    digits = min(8, max(3, 2 + math.ceil(-math.log10(spread)))) if spread > 0 else 3
    return f"{low:.{digits}g}..{high:.{digits}g}"


def _unit_refusal(sae_cfg: SAEConfig) -> str:
    """What to do with a start whose rows unit rows cannot take: free rows, where the
    activation allows them (matching pursuit does not: fault testing, the advice was refused)."""
    try:
        activations.get(sae_cfg.activation).check(dataclasses.replace(sae_cfg,
                                                                      decoder_norm="free"))
    except ConfigError:
        return (f"{sae_cfg.activation} needs unit decoder rows, and these are not all of one "
                "length: this SAE cannot start such a run")
    return "use sae.decoder_norm: free (unit would rescale them)"


def _rescalable(params: dict[str, np.ndarray]) -> bool:
    """Whether scaling W_enc, b_enc and the thresholds by n and W_dec's rows by 1/n leaves the
    SAE's function as it is (codes of positive homogeneity: ReLU, TopK, BatchTopK, JumpReLU)."""
    return set(params) <= {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"} and "b_enc" in params


def load_sae(path: str | Path, *, transcoders: bool = False) -> LoadedSAE:
    """Reads a SAELens-format directory (jaxsae's or SAELens's own; a transcoder only if the
    caller evaluates them: `transcoders`) or a sparsify one (a TopK SAE)."""
    path = Path(path)
    if sparsify.is_sparsify(path):
        return _load_sparsify(path)
    cfg = read_cfg(path, transcoders=transcoders)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{path}: missing {WEIGHTS_FILE} (not a SAELens export)")
    transcoder = transcoder_base(cfg["architecture"])
    kind = activations.for_architecture(transcoder[0] if transcoder else cfg["architecture"])
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    d_out = cfg["d_out"] if transcoder else d_in
    try:
        raw = tensorfile.read(weights)
    except DataError as e:
        raise ExportError(str(e)) from None
    expected = {"W_dec": (d_sae, d_out), "b_dec": (d_out,), **kind.tensor_shapes(d_in, d_sae)}
    if kind.has_encoder:
        expected["W_enc"] = (d_in, d_sae)
    if transcoder and transcoder[1]:
        expected["W_skip"] = (d_out, d_in)
    tensors, stored = {}, {}
    for name, shape in expected.items():
        if name not in raw:
            raise ExportError(f"{weights}: missing tensor {name!r}")
        array = np.asarray(raw[name])
        stored[name] = array.dtype
        if array.shape != shape:
            raise ExportError(f"{weights}: {name} has shape {list(array.shape)}, expected "
                              f"{list(shape)}")
        if array.dtype.kind != "f" and array.dtype != ml_dtypes.bfloat16:
            raise ExportError(f"{weights}: {name} is {array.dtype}, expected floating point "
                              "weights")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise ExportError(f"{weights}: {name} has {bad} non-finite values (NaN or inf)")
        tensors[name] = array
    if transcoder:  # no centring: its encoder reads x as it is (sae.coding_params)
        return LoadedSAE(params=tensors, d_in=d_in, cfg_json=cfg, d_out=d_out, sae=SAEConfig(
            d_sae=d_sae, activation=kind.name, decoder_norm="free", transcoder=True,
            skip=transcoder[1], **kind.config_from_saelens(cfg)), stored_dtype=stored["W_dec"])
    if cfg.get("rescale_acts_by_decoder_norm") and kind.has_k and "b_enc" in tensors:
        _fold_decoder_norms(tensors, weights)
    if not cfg.get("apply_b_dec_to_input", True):
        # jaxsae always centres by b_dec; fold "no centring" into the encoder's biases:
        # (x-b)W + b_enc + bW, and a gated SAE's gate and magnitude alike
        # (x-b)W exp(r_mag) + b_mag + bW exp(r_mag)
        if "b_enc" not in tensors and "b_gate" not in tensors:
            raise ExportError(f"{path / CFG_FILE}: apply_b_dec_to_input false is not supported "
                              f"for {cfg['architecture']!r}")
        shift = tensors["b_dec"] @ tensors["W_enc"]
        if "b_enc" in tensors:
            tensors["b_enc"] = tensors["b_enc"] + shift
        else:
            tensors["b_gate"] = tensors["b_gate"] + shift
            tensors["b_mag"] = tensors["b_mag"] + shift * np.exp(tensors["r_mag"])
    sae_cfg = SAEConfig(d_sae=d_sae, activation=kind.name, decoder_norm="free",
                        **kind.config_from_saelens(cfg))
    return LoadedSAE(params=tensors, sae=sae_cfg, d_in=d_in, cfg_json=cfg,
                     stored_dtype=stored["W_dec"])


def _fold_decoder_norms(tensors: dict[str, np.ndarray], weights: Path) -> None:
    """SAELens's `rescale_acts_by_decoder_norm` (its TopK SAEs' training default): the
    pre-activations are scaled by each decoder row's norm n before the top k are taken, and the
    codes divided by n before decoding. Folded exactly: W_enc and b_enc times n, W_dec's rows
    over n (unit). (SAELens's inference save folds it too but keeps the flag; fault testing:
    every TopK SAE a SAELens run saved was refused.)"""
    norms = np.linalg.norm(tensors["W_dec"].astype(np.float64), axis=1)
    if not np.all(norms > 0):
        raise ExportError(f"{weights}: W_dec row {int(np.argmin(norms))} is all zeros, and "
                          "rescale_acts_by_decoder_norm divides by each row's norm")
    tensors["W_enc"] = (tensors["W_enc"] * norms).astype(np.float32)
    tensors["b_enc"] = (tensors["b_enc"] * norms).astype(np.float32)
    tensors["W_dec"] = (tensors["W_dec"] / norms[:, None]).astype(np.float32)


def _load_sparsify(path: Path) -> LoadedSAE:
    """A sparsify directory, read as the SAELens-format export of the same SAE would be (its
    cfg_json the one `export_sae` would write, without training metadata)."""
    params, sae_cfg, stored = sparsify.read_sparsify(path)
    d_sae, d_in = params["W_dec"].shape
    cfg_json = {"architecture": "topk", "d_in": int(d_in), "d_sae": int(d_sae),
                "k": int(sae_cfg.k), "dtype": str(np.dtype(stored)),
                "apply_b_dec_to_input": True,
                "metadata": {"converted_from": f"sparsify {path}"}}
    return LoadedSAE(params=params, sae=dataclasses.replace(sae_cfg, decoder_norm="free"),
                     d_in=int(d_in), cfg_json=cfg_json, stored_dtype=stored)


# Importing: a run config that trains from an existing dictionary.

# Fine-tuning batches are halved from the source's until the data holds this many of them.
_IMPORT_MIN_BATCHES = 20


def training_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a SAELens-format cfg.json says about how its SAE was trained, as config sections
    (`sae`, `loss`, `optim`) and the scale its coefficients are at (`normalize`: none but
    for jaxsae's exports of runs that normalised): jaxsae's own `jaxsae` block when it has
    one, else SAELens's training fields (top level, or
    `metadata.training_architecture_details`); defaults for the rest."""
    arch = cfg["architecture"]
    own = _own(cfg)
    kind = activations.for_architecture(arch)
    if own.get("activation") in activations.starting_from(arch):
        kind = activations.get(own["activation"])
    sae: dict[str, Any] = {"activation": kind.name,
                           **activations.for_architecture(arch).config_from_saelens(cfg)}
    if "jumprelu_bandwidth" in sae and not kind.learns_threshold:
        del sae["jumprelu_bandwidth"]
    if kind.has_k and "k" not in sae and is_positive_int(own.get("k")):
        sae["k"] = own["k"]
    if own.get("tied") is True and kind.has_encoder:  # (fault testing: a tied run's export
        sae["tied"] = True  # was imported as an untied run, its encoder trained on its own)
    optim = {k: v for k, v in (own.get("optim") or {}).items() if k in ("lr", "batch_size")}
    normalize = own.get("normalize", "none")
    if normalize not in ("none", "unit_mean_squared_norm"):
        normalize = "none"
    if isinstance(own.get("loss"), list) and own["loss"]:
        return {"sae": sae, "loss": own["loss"], "optim": optim, "normalize": normalize}
    details = cfg.get("metadata", {}).get("training_architecture_details") or {}
    saelens = {**details, **{k: v for k, v in cfg.items() if k not in ("metadata", "jaxsae")}}
    loss = kind.saelens_loss(saelens)
    return {"sae": sae, "loss": loss, "optim": optim, "normalize": normalize}


def import_config(sae_dir: str | Path, run_dir: str | Path, data: str | Path,
                  overrides: list[str] | tuple[str, ...] = (), *,
                  overwrite: bool = False) -> Path:
    """Writes RUN/config.yaml that starts a run from the SAELens directory `sae_dir`
    (init_from) on `data`; returns its path. The config takes the loss and its coefficients
    from the source's cfg.json where it says them, and sizes the batch, the length and the
    hold-out to the data, so it trains as written. Paths in it are absolute. Overrides apply
    like `jaxsae train`'s. RUN is created; an existing RUN is replaced only if it is an
    untrained import (or with `overwrite`), never if it holds checkpoints."""
    sae_dir, run_dir, data = Path(sae_dir).absolute(), Path(run_dir).absolute(), \
        Path(data).absolute()
    outputs.check_target(run_dir, "import", overwrite=overwrite, inputs=(sae_dir, data))
    if not sparsify.is_sparsify(sae_dir):
        return _write_import(sae_dir, run_dir, data, overrides, overwrite=overwrite,
                             inputs=(sae_dir, data))
    # A sparsify SAE: converted to the SAELens layout, kept in RUN/imported-sae (init_from),
    # in bfloat16 if it was stored so (exact: the values are bfloat16's).
    params, sae_cfg, stored = sparsify.read_sparsify(sae_dir)
    with tempfile.TemporaryDirectory(prefix="jaxsae-import-") as tmp:
        converted = Path(tmp) / IMPORTED_SAE
        export_sae(params, sae_cfg, converted,
                   dtype="bfloat16" if stored == ml_dtypes.bfloat16 else "float32",
                   metadata={"converted_from": f"sparsify {sae_dir}"},
                   training={"loss": [{"term": "mse"}]})
        return _write_import(converted, run_dir, data, overrides, overwrite=overwrite,
                             inputs=(sae_dir, data), keep=converted, given=sae_dir)


IMPORTED_SAE = outputs.IMPORTED_SAE

# Keys `jaxsae import` writes from its arguments; an override of one would silently win over
# them (and be written as given, not as an absolute path).
_IMPORT_FLAG_KEYS = {"data.path": "--data", "run_dir": "--out", "name": "--out",
                     "init_from": "SAE_DIR"}


def _write_import(sae_dir: Path, run_dir: Path, data: Path, overrides, *, overwrite: bool,
                  inputs: tuple, keep: Path | None = None, given: Path | None = None) -> Path:
    """import_config for a SAELens directory; `keep`: a directory copied into the run as
    RUN/imported-sae, which the config then starts from; `given`: the directory the user
    named, when `sae_dir` is its conversion (for messages)."""
    from jaxsae.config import DataConfig, apply_overrides, config_from_dict
    from jaxsae.data import open_source
    from jaxsae.data.saelens import activation_columns
    from jaxsae.data.window import trained_end
    from jaxsae.parsing import apply_override, refuse_repeated_overrides

    refuse_repeated_overrides(overrides)
    cfg = read_cfg(sae_dir)
    loaded = load_sae(sae_dir)
    # The data is opened with the column the overrides choose (fault testing: data.hook was
    # applied after the data was opened, so a SAELens cache of several columns was refused
    # asking for it); else, among several, the SAE's own hook (metadata.hook_name). The run is
    # sized to the hold-out they choose (fault testing: data.eval_tokens was applied after,
    # and the config written trained twice over its tokens, or was refused by train).
    chosen: dict[str, Any] = {"data": {}}
    for assignment in overrides:
        if assignment.split("=", 1)[0].strip().startswith(("data.hook", "data.eval_tokens")):
            apply_override(chosen, assignment)
    hook = chosen["data"].get("hook")
    named = (cfg.get("metadata") or {}).get("hook_name")
    if hook is None and named in (columns := activation_columns(data)) and len(columns) > 1:
        hook = named
    source = open_source(DataConfig(path=str(data), hook=hook))
    if source.d_in != cfg["d_in"]:
        raise ExportError(f"{data}: d_in {source.d_in} does not match {given or sae_dir} "
                          f"(d_in {cfg['d_in']})")  # (not a temporary conversion's name)
    settings = training_settings(cfg)
    # On the data the source trained on, the tokens it held out stay held out (fault testing:
    # the default hold-out, smaller, fine-tuned on tokens the source was evaluated on).
    end = trained_end([cfg], data, hook)
    held = (source.n_tokens - end if end is not None and 0 < end < source.n_tokens
            else None)
    # (a bad one is left to the config to refuse)
    asked = chosen["data"].get("eval_tokens")
    if asked != "auto" and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 0):
        asked = None
    holding = DataConfig(eval_tokens=asked if asked is not None else
                         "auto" if held is None else held)
    n_train = source.n_tokens - holding.held_out(source.n_tokens)
    batch = int(settings["optim"].get("batch_size", 4096))
    while batch > 8 and batch * _IMPORT_MIN_BATCHES > n_train:
        batch //= 2
    if n_train < batch:
        if asked is not None:  # refused as train refuses it
            holding.training_tokens(source.n_tokens, batch, data)
        raise ExportError(f"{data}: {source.n_tokens} tokens are too few to fine-tune on")
    # unit decoder rows: as jaxsae's export says its run kept them (rows exported with an input
    # scale folded in are 1/s long; fault testing: such TopK SAEs were imported as free),
    # else as the rows are
    # (a training export of 0.2.0 on records its scale; a conversion, sparsify's, does not)
    own = _own(cfg)
    recorded = own.get("decoder_norm") if "normalize" in own else None
    unit = (recorded == "unit" if recorded in ("unit", "free")
            else sae.unit_rows(loaded.params["W_dec"], loaded.stored_dtype))
    tree: dict[str, Any] = {
        "name": run_dir.name,
        "run_dir": str(run_dir),
        "init_from": str(run_dir / IMPORTED_SAE if keep is not None else sae_dir),
        # the source's coefficients are at the scale it trained on: SAELens's files say none
        # (others are refused), jaxsae's (from 0.2.0) say which
        "data": {"path": str(data), "normalize": settings["normalize"],
                 **({"hook": hook} if hook is not None else {}),
                 **({"eval_tokens": held} if held is not None else {})},
        "sae": {"d_sae": cfg["d_sae"], **settings["sae"],
                "decoder_norm": "unit" if unit else "free"},
        "loss": settings["loss"],
        # One pass over the training tokens (at most the default length of a run).
        "optim": {**settings["optim"], "batch_size": batch,
                  "total_tokens": min(n_train, 100_000_000) // batch * batch},
    }
    # a coefficient's ramp from the source's (longer) run is shortened to this run's length
    # (fault testing: an import onto small data refused the config it had written)
    steps = tree["optim"]["total_tokens"] // batch
    tree["loss"] = [{**term, "warmup_steps": min(term["warmup_steps"], steps)}
                    if isinstance(term, dict) and is_positive_int(term.get("warmup_steps"))
                    else term for term in tree["loss"]]
    as_read, keys = copy.deepcopy(tree), [a.split("=", 1)[0].strip() for a in overrides]
    for key in keys:
        if key in _IMPORT_FLAG_KEYS:
            raise ConfigError(f"override {key}: set by {_IMPORT_FLAG_KEYS[key]}, not as an "
                              "override")
        if key == "data":  # (fault testing: its keys were chosen before it replaced them all)
            raise ConfigError("override data: would replace the whole data section, whose "
                              "path --data sets; set its keys one at a time (data.hook=..., "
                              "data.eval_tokens=...)")
    apply_overrides(tree, overrides)  # as `jaxsae train` applies them (sweep.KEY=[...] too)
    if isinstance(tree.get("sae"), dict) and tree["sae"].get("decoder_norm") == "auto":
        # auto for a start: its rows as they are (fault testing: an override of auto wrote
        # the activation's unit rows, which the config's train then refused)
        tree["sae"]["decoder_norm"] = "unit" if unit else "free"
    try:
        config = config_from_dict(tree)
        check_run(config)
    except ConfigError as e:
        # a bad training setting of the cfg.json (no override of it): the file is named
        # (fault testing: the message named a config key the user never wrote; an lp_norm of 2
        # the run's own checks refuse too)
        try:
            check_run(config_from_dict(as_read))
        except ConfigError as first:
            if str(first) == str(e):
                raise ConfigError(f"{given or sae_dir}/cfg.json: its training settings give "
                                  f"{e}; correct the file, or override that key") from None
        raise
    # (an override of optim.batch_size too: a config that train would refuse is not written)
    config.data.training_tokens(source.n_tokens, config.optim.batch_size, data)
    check_init_from(sae_dir if keep is not None else config.init_from, config.sae)
    source_name = inputs[0]
    with outputs.staged_directory(run_dir, "import", overwrite=overwrite,
                                  inputs=inputs) as staging:
        if keep is not None:
            shutil.copytree(keep, staging / IMPORTED_SAE)
        unknown = ("# data.normalize: none assumed: the source, exported by jaxsae before "
                   "0.2.0, does not say\n# whether it trained normalised (set "
                   "unit_mean_squared_norm if it did: its coefficients are at that scale).\n"
                   if "run" in own and "normalize" not in own  # (a run's export)
                   and "data.normalize" not in keys else "")
        outputs.write_file(staging / "config.yaml",
                           f"# jaxsae train {shlex.quote(str(run_dir / 'config.yaml'))}\n"
                           f"# Starts from {source_name} (imported).\n" + unknown
                           + config.to_yaml())
    return run_dir / "config.yaml"
