"""Typed, frozen run configuration: YAML presets plus dotted `key.sub=value` overrides.

Every section is a frozen dataclass whose fields carry a docstring. `load_config` parses a YAML
file, applies overrides, and validates everything before any work starts: an unknown key, a value
of the wrong type, or an impossible combination raises `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import itertools
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxsae.errors import ConfigError

Activation = Literal["relu", "topk", "batchtopk", "jumprelu"]


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    """Directory of activations (jaxsae shard format). Required."""
    format: Literal["auto", "shards", "saelens"] = "auto"
    """`shards` (jaxsae), `saelens` (a datasets.save_to_disk activation cache); `auto` detects."""
    hook: str | None = None
    """SAELens caches: the activation column (needed when the cache has several)."""
    shuffle_buffer: int = 262144
    """Tokens mixed together by the shuffle (drawn from randomly ordered chunks of all shards)."""
    seed: int = 0
    """Seed of the data order (independent of the model seed)."""
    normalize: Literal["none", "unit_mean_squared_norm"] = "none"
    """`unit_mean_squared_norm` scales inputs so that E‖x‖² = d_in (estimated before training,
    saved in the checkpoint, folded into the exported weights)."""
    drop_norm_above: float | None = None
    """Drop tokens whose norm exceeds this multiple of the median norm (e.g. attention sinks)."""
    stats_tokens: int = 65536
    """Tokens sampled evenly across the data to estimate the median norm and the scale."""
    lanes: int = 8
    """Independent streams each batch is assembled from; the number of processes must divide
    it (each process reads only its lanes) and it must divide optim.batch_size."""
    eval_tokens: int | Literal["auto"] = "auto"
    """Tokens at the end of the data held out from training and used for the final evaluation;
    `auto`: min(65536, 5 % of the data)."""
    check_finite: bool = False
    """Scan every shard for NaN/inf when the data is opened (one full read)."""
    generate: Mapping[str, Any] | None = None
    """If `path` is missing, generate it first: `{kind: superposition, ...}` (`jaxsae synth`)."""

    def held_out(self, n_tokens: int) -> int:
        """Tokens held out for the final evaluation from data of `n_tokens` tokens."""
        if self.eval_tokens == "auto":
            return min(AUTO_EVAL_TOKENS, n_tokens // 20)
        return self.eval_tokens


# `auto` sizes: a 30-second smoke test and a 1B-token job both get sensible values.
AUTO_EVAL_TOKENS = 65536
AUTO_WARMUP_STEPS = 1000


@dataclass(frozen=True)
class SAEConfig:
    d_sae: int = 4096
    """Number of latents (dictionary width)."""
    activation: Activation = "relu"
    """`relu`, `topk`, `batchtopk` (top k*batch over the batch) or `jumprelu`."""
    k: int = 32
    """Active latents per token for `topk` / `batchtopk` (mean over the batch for `batchtopk`)."""
    tied: bool = False
    """Tied weights: no `W_enc`; the encoder is `W_dec.T`."""
    decoder_norm: Literal["unit", "free"] = "unit"
    """`unit` keeps decoder rows at unit norm; `free` leaves their norm to the optimiser."""
    init_decoder_norm: float = 0.1
    """Decoder row norm at initialisation when `decoder_norm: free` (`unit` starts at 1)."""
    jumprelu_init_threshold: float = 0.001
    """Initial JumpReLU threshold."""
    jumprelu_bandwidth: float = 0.001
    """Width of the straight-through window used for the JumpReLU threshold gradient."""
    batchtopk_threshold_momentum: float = 0.01
    """EMA rate of the BatchTopK inference threshold (min kept activation per batch)."""


@dataclass(frozen=True)
class TermConfig:
    term: str
    """Name of a registered loss term (see `jaxsae.penalties`)."""
    coefficient: float = 1.0
    """Weight of the term in the total loss."""
    warmup_steps: int = 0
    """The coefficient ramps linearly from 0 to `coefficient` over this many steps."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """The term's own hyper-parameters (written flat beside `term` in YAML)."""

    @classmethod
    def parse(cls, raw: Any, key: str) -> TermConfig:
        from jaxsae import penalties  # the registry; imported here to keep config import-light

        if not isinstance(raw, Mapping):
            raise ConfigError(f"{key}: expected a mapping like {{term: l1, coefficient: 5}}")
        raw = dict(raw)
        if "term" not in raw:
            raise ConfigError(f"{key}.term: missing (the name of a loss term)")
        name = _parse_value(str, raw.pop("term"), f"{key}.term")
        spec = penalties.get_term(name, key=f"{key}.term")
        coefficient = _parse_value(float, raw.pop("coefficient", 1.0), f"{key}.coefficient")
        warmup = _parse_value(int, raw.pop("warmup_steps", 0), f"{key}.warmup_steps")
        if warmup < 0:
            raise ConfigError(f"{key}.warmup_steps: must be >= 0, got {warmup}")
        params = {}
        for hname, value in raw.items():
            if hname not in spec.hparams:
                raise ConfigError(_unknown_key_message(f"{key}.{hname}", hname, spec.hparams))
            params[hname] = _parse_value(spec.hparams[hname], value, f"{key}.{hname}")
        for hname in sorted(spec.required - params.keys()):
            raise ConfigError(f"{key}.{hname}: required by loss term {name!r}")
        return cls(term=name, coefficient=coefficient, warmup_steps=warmup, params=params)

    def to_dict(self) -> dict[str, Any]:
        out = {"term": self.term, "coefficient": self.coefficient}
        if self.warmup_steps:
            out["warmup_steps"] = self.warmup_steps
        out.update({k: _plain(v) for k, v in self.params.items()})
        return out


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3.0e-4
    """Peak Adam learning rate."""
    batch_size: int = 4096
    """Tokens per step (global, across all devices and processes)."""
    total_tokens: int = 100_000_000
    """Training length in tokens; steps = total_tokens // batch_size."""
    warmup_steps: int | Literal["auto"] = "auto"
    """Linear learning-rate warm-up from 0 over this many steps; `auto`: min(1000, 5 % of the
    steps)."""
    decay_fraction: float = 0.2
    """Fraction of the steps, at the end, over which the learning rate decays linearly to 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    adam_b1: float = 0.9
    """Adam first-moment decay."""
    adam_b2: float = 0.999
    """Adam second-moment decay."""
    skip_nonfinite: bool = False
    """Skip (and count) steps whose loss or gradient is NaN/inf instead of stopping the run."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the encoder/decoder matmuls. Parameters, optimiser state and the loss stay
    float32 (bfloat16 copies of the parameters are made inside the step)."""

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def decay_steps(self) -> int:
        return int(self.decay_fraction * self.total_steps)

    @property
    def warmup(self) -> int:
        """Warm-up steps, `auto` resolved (it never leaves less than nothing to train on)."""
        if self.warmup_steps != "auto":
            return self.warmup_steps
        return max(0, min(AUTO_WARMUP_STEPS, self.total_steps // 20,
                          self.total_steps - self.decay_steps))


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    """Devices along the batch axis (-1: all devices not used by `model`)."""
    model: int = 1
    """Devices along the dictionary (d_sae) axis (-1: all devices not used by `data`)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = 1000
    """Save a checkpoint every this many steps (and at the end, and on SIGTERM / Ctrl-C)."""
    every_minutes: float | None = None
    """Also save when this many minutes have passed since the last save."""
    keep: int = 3
    """Number of newest checkpoints kept on disk."""


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 50
    """Write a line to metrics.jsonl every this many steps."""
    dead_window_tokens: int = 4_000_000
    """A latent that has not fired for this many tokens counts as dead in `dead_fraction`."""


# Keys a sweep may vary: they change numbers, never shapes, so one vmapped step trains them all.
SWEEPABLE = {"seed": int, "optim.lr": float, "sae.k": int, "loss.<i>.coefficient": float}
_TERM_COEFFICIENT = re.compile(r"loss\.(\d+)\.coefficient")


@dataclass(frozen=True)
class Sweep:
    """SAEs trained together in one vmapped step on one data stream.

    YAML: a mapping of key -> list of values is the grid of every combination (in key order);
    a list of mappings gives the points one by one. Keys: see SWEEPABLE.
    """

    points: tuple[Mapping[str, Any], ...]

    @classmethod
    def parse(cls, raw: Any, key: str) -> Sweep:
        if isinstance(raw, Mapping):
            grid = {}
            for name, values in raw.items():
                if isinstance(values, str | bytes) or not isinstance(values, Sequence):
                    raise ConfigError(f"{key}.{name}: expected a list of values to sweep, "
                                      f"got {values!r}")
                if not values:
                    raise ConfigError(f"{key}.{name}: the list of values is empty")
                grid[name] = values
            points = [dict(zip(grid, combo, strict=True))
                      for combo in itertools.product(*grid.values())]
            where = [key] * len(points)
        elif isinstance(raw, Sequence) and not isinstance(raw, str | bytes):
            if any(not isinstance(p, Mapping) for p in raw):
                raise ConfigError(f"{key}: expected a mapping of key -> values (a grid) or a "
                                  "list of mappings (one per SAE)")
            points = [dict(p) for p in raw]
            where = [f"{key}[{i}]" for i in range(len(points))]
        else:
            raise ConfigError(f"{key}: expected a mapping of key -> values (a grid) or a list "
                              f"of mappings (one per SAE), got {_typename(raw)}")
        if not points:
            raise ConfigError(f"{key}: no SAEs to train (empty sweep)")
        parsed = []
        for point, at in zip(points, where, strict=True):
            parsed.append({name: _parse_value(_sweep_type(name, f"{at}.{name}"), value,
                                              f"{at}.{name}")
                           for name, value in point.items()})
        for i, point in enumerate(parsed):
            if point in parsed[:i]:
                raise ConfigError(f"{key}: SAE {i} ({sweep_label(point)}) repeats SAE "
                                  f"{parsed.index(point)}")
        return cls(points=tuple(parsed))

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.points]


def _sweep_type(name: str, key: str) -> type:
    if name in SWEEPABLE:
        return SWEEPABLE[name]
    if _TERM_COEFFICIENT.fullmatch(name):
        return float
    _check_key_exists(name, key)
    raise ConfigError(f"{key}: cannot be swept (the SAEs of a sweep share their shapes and one "
                      f"step); sweepable keys: {', '.join(SWEEPABLE)}")


def _check_key_exists(dotted: str, key: str) -> None:
    """Refuses a dotted key that names no config field, suggesting the closest one."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if cls is None:
            return  # below a mapping (e.g. data.generate.*) or a loss term: not checked here
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(parts[:i])
            raise ConfigError(_unknown_key_message(key, part, fields)
                              + (f" (under {where})" if where else ""))
        hint = typing.get_type_hints(cls)[part]
        cls = hint if dataclasses.is_dataclass(hint) and part != "loss" else None


def sweep_label(point: Mapping[str, Any]) -> str:
    """`loss.1.coefficient=0.3,seed=1`: a point's values as text."""
    return ",".join(f"{k}={v}" for k, v in point.items()) or "base"


def _default_loss() -> tuple[TermConfig, ...]:
    return (TermConfig("mse"), TermConfig("l1", coefficient=5.0))


@dataclass(frozen=True)
class Config:
    name: str = "run"
    """Run name; the run directory is runs/<name>/ unless `run_dir` is set."""
    run_dir: str | None = None
    """Explicit run directory."""
    seed: int = 0
    """Seed of the parameter initialisation and of every random draw in the step."""
    distributed: Literal["auto", "on", "off"] = "auto"
    """Multi-process runs: `auto` calls jax.distributed.initialize() when a cluster launch is
    detected (SLURM, multi-host TPU, Open MPI, or JAX_COORDINATOR_ADDRESS), `on` always."""
    init_from: str | None = None
    """Start from this SAELens-format dictionary instead of a random init (fine-tune, stitch)."""
    freeze: tuple[str, ...] = ()
    """Parameters the optimiser leaves as they are, e.g. [W_enc, b_enc, b_dec] to retrain only
    the decoder of a stitched SAE (with init_from); their gradients are never computed."""
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    loss: tuple[TermConfig, ...] = field(default_factory=_default_loss)
    """Loss terms; the total loss is the sum of coefficient(step) * term."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sweep: Sweep | None = None
    """Train several SAEs at once (see `Sweep`): each point overrides sweepable keys of this
    config; everything else is shared."""
    sweep_chunk: int | None = None
    """SAEs of a sweep that step together (vmapped); the chunks run one after another within
    the step. null: all at once. Smaller chunks need less activation memory and, on CPUs,
    keep each chunk's working set in cache; it must divide the number of SAEs."""

    def __post_init__(self):
        _validate(self)

    def sweep_configs(self) -> list[Config]:
        """One config per SAE of the sweep (without `sweep`); [self] for a single run."""
        if self.sweep is None:
            return [self]
        out = []
        for i, point in enumerate(self.sweep.points):
            tree = {**self.to_dict(), "sweep": None, "sweep_chunk": None}
            for name, value in point.items():
                assign(tree, name, value)
            try:
                out.append(from_dict(Config, tree))
            except ConfigError as e:
                raise ConfigError(f"sweep SAE {i} ({sweep_label(point)}): {e}") from None
        return out

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "loss":
                out["loss"] = [t.to_dict() for t in value]
            elif f.name == "sweep":
                out["sweep"] = value.to_list() if value is not None else None
            else:
                out[f.name] = _plain(value)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys that may differ between a run and its resumption (they do not change what is computed).
MUTABLE_ON_RESUME = ("name", "run_dir", "distributed", "data.path", "data.generate",
                     "data.check_finite", "log", "checkpoint", "optim.total_tokens",
                     "optim.skip_nonfinite", "sweep_chunk")


# ---------------------------------------------------------------------------------------------
# Validation of combinations (single values are checked while parsing).


def _validate(cfg: Config) -> None:
    from jaxsae import penalties

    def need(ok: bool, key: str, why: str):
        if not ok:
            raise ConfigError(f"{key}: {why}")

    need(bool(cfg.data.path), "data.path", "required (a directory of cached activations)")
    from jaxsae.sae import param_names

    names = param_names(cfg.sae)
    for name in cfg.freeze:
        need(name in names, "freeze", f"{name!r} is not a parameter of this SAE "
             f"(it has {', '.join(names)})")
    need(set(names) - set(cfg.freeze) != set(), "freeze", "freezes every parameter")
    if cfg.init_from is not None:
        from jaxsae import export

        export.check_init_from(cfg.init_from, cfg.sae)
    need(cfg.data.shuffle_buffer > 0, "data.shuffle_buffer", "must be > 0")
    need(cfg.data.eval_tokens == "auto" or cfg.data.eval_tokens >= 0, "data.eval_tokens",
         "must be >= 0 (or auto)")
    need(cfg.data.drop_norm_above is None or cfg.data.drop_norm_above > 0,
         "data.drop_norm_above", "must be > 0 (a multiple of the median norm)")
    need(cfg.data.stats_tokens > 0, "data.stats_tokens", "must be > 0")
    need(cfg.data.lanes > 0, "data.lanes", "must be > 0")
    need(cfg.optim.batch_size % cfg.data.lanes == 0, "data.lanes",
         f"must divide optim.batch_size ({cfg.optim.batch_size}), got {cfg.data.lanes}")
    if cfg.data.generate is not None:
        from jaxsae.data import synthetic

        synthetic.parse_spec(cfg.data.generate, key="data.generate")
    s = cfg.sae
    need(s.d_sae > 0, "sae.d_sae", f"must be > 0, got {s.d_sae}")
    k_swept = cfg.sweep is not None and all("sae.k" in p for p in cfg.sweep.points)
    if s.activation in ("topk", "batchtopk") and not k_swept:  # else each SAE's k is checked
        need(0 < s.k <= s.d_sae, "sae.k", f"must be in 1..sae.d_sae ({s.d_sae}), got {s.k}")
    need(s.init_decoder_norm > 0, "sae.init_decoder_norm", "must be > 0")
    need(s.jumprelu_bandwidth > 0, "sae.jumprelu_bandwidth", "must be > 0")
    need(0 < s.batchtopk_threshold_momentum <= 1, "sae.batchtopk_threshold_momentum",
         "must be in (0, 1]")
    need(len(cfg.loss) > 0, "loss", "at least one loss term is required")
    for i, term in enumerate(cfg.loss):
        penalties.get_term(term.term, key=f"loss[{i}].term").check(cfg, term, f"loss[{i}]")
    o = cfg.optim
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(o.batch_size > 0, "optim.batch_size", f"must be > 0, got {o.batch_size}")
    need(o.total_tokens >= o.batch_size, "optim.total_tokens",
         f"must be at least one batch ({o.batch_size} tokens), got {o.total_tokens}")
    need(0 <= o.decay_fraction <= 1, "optim.decay_fraction", "must be in [0, 1]")
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    need(o.warmup >= 0, "optim.warmup_steps", "must be >= 0 (or auto)")
    need(o.warmup + o.decay_steps <= o.total_steps, "optim.warmup_steps",
         f"warm-up ({o.warmup}) plus decay ({o.decay_steps}) steps exceed the run's "
         f"{o.total_steps} steps (optim.total_tokens / optim.batch_size); lower it or use auto")
    for axis in ("data", "model"):
        size = getattr(cfg.mesh, axis)
        need(size == -1 or size > 0, f"mesh.{axis}", f"must be -1 or > 0, got {size}")
    need(not (cfg.mesh.data == -1 and cfg.mesh.model == -1), "mesh",
         "at most one of mesh.data and mesh.model may be -1")
    if cfg.mesh.model > 0:
        need(s.d_sae % cfg.mesh.model == 0, "mesh.model",
             f"must divide sae.d_sae ({s.d_sae}), got {cfg.mesh.model}")
    need(cfg.checkpoint.every_steps is None or cfg.checkpoint.every_steps > 0,
         "checkpoint.every_steps", "must be > 0 (or null)")
    need(cfg.checkpoint.every_minutes is None or cfg.checkpoint.every_minutes > 0,
         "checkpoint.every_minutes", "must be > 0 (or null)")
    need(cfg.checkpoint.every_steps is not None or cfg.checkpoint.every_minutes is not None,
         "checkpoint", "set every_steps, every_minutes or both")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(cfg.log.every_steps > 0, "log.every_steps", "must be > 0")
    need(cfg.log.dead_window_tokens > 0, "log.dead_window_tokens", "must be > 0")
    if cfg.sweep is not None:
        for point in cfg.sweep.points:
            for name in point:
                if (m := _TERM_COEFFICIENT.fullmatch(name)) and int(m[1]) >= len(cfg.loss):
                    raise ConfigError(f"sweep.{name}: there is no loss term {m[1]} (the config "
                                      f"has {len(cfg.loss)}: loss.0 .. loss.{len(cfg.loss) - 1})")
                if name == "sae.k" and s.activation not in ("topk", "batchtopk"):
                    raise ConfigError(f"sweep.sae.k: sae.activation {s.activation} has no k "
                                      "(topk or batchtopk)")
        cfg.sweep_configs()  # each SAE's config is validated like a config of its own
    if cfg.sweep_chunk is not None:
        n = len(cfg.sweep.points) if cfg.sweep is not None else 1
        need(cfg.sweep_chunk > 0 and n % cfg.sweep_chunk == 0, "sweep_chunk",
             f"must divide the {n} SAEs of the sweep, got {cfg.sweep_chunk}")


# ---------------------------------------------------------------------------------------------
# Parsing: mappings -> dataclasses, with key-naming errors.


def from_dict(cls: type, raw: Any, key: str = "") -> Any:
    """Builds dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {_typename(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in fields:
            raise ConfigError(_unknown_key_message(sub, str(name), fields))
        kwargs[name] = _parse_value(hints[name], value, sub)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{key or 'config'}: {e}") from None


def _parse_value(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        # A word like `auto` is tried against the Literal first; anything else against the
        # other types in order, reporting the first one's error if none accepts it.
        options.sort(key=lambda arg: typing.get_origin(arg) is not Literal
                     or not isinstance(value, str))
        errors = []
        for arg in options:
            try:
                return _parse_value(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        raise _union_error(options, value, key, errors)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            raise ConfigError(f"{key}: must be one of {choices}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if hasattr(tp, "parse"):
            return tp.parse(value, key)
        return from_dict(tp, value, key)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {_typename(value)}")
        item = args[0] if args else Any
        return tuple(_parse_value(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_typename(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        number = _as_float(value)
        if number is None or not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = _as_float(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported by the parser")


def _union_error(options: list, value: Any, key: str, errors: list[ConfigError]) -> ConfigError:
    words = [str(w) for arg in options if typing.get_origin(arg) is Literal
             for w in typing.get_args(arg)]
    others = [arg for arg in options if typing.get_origin(arg) is not Literal]
    if words and others:
        kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        what = " or ".join([kinds.get(others[0], str(others[0])), *words])
        return ConfigError(f"{key}: expected {what}, got {value!r}")
    return errors[-1] if len(errors) == 1 or not words else errors[0]


def _as_float(value: Any) -> float | None:
    # YAML 1.1 reads `3e-4` (no dot) as a string; accept it as the number it obviously is.
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def _typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _unknown_key_message(key: str, name: str, known: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    valid = ", ".join(known) or "none"
    return f"{key}: unknown key{hint}; valid keys: {valid}"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# YAML files and dotted overrides.


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Applies one `a.b.c=value` (YAML value; list items by index: `loss.1.coefficient=2`)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value (e.g. optim.lr=1e-3)")
    dotted, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted}: value is not valid YAML ({e.problem})") from None
    assign(tree, dotted.strip(), value)


def assign(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets `a.b.c` in a config tree (list items by index), creating missing mappings."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override {dotted!r}: empty key segment")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, here)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"override {dotted}: {here} is not a mapping or list")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {dotted}: {'.'.join(parts[:-1])} is not a mapping or list")


def _list_index(node: list, part: str, key: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {key}: list index out of range (list has {len(node)} items)")
    return int(part)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}), errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return tree


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML preset (or starts from defaults when `path` is None) and applies overrides."""
    tree = read_yaml_mapping(path) if path is not None else {}
    for assignment in overrides:
        if assignment.startswith("sweep.") and "=" in assignment:
            _override_sweep(tree, assignment)
            continue
        # `loss.1.coefficient=2` edits the default term list when the file has none.
        if assignment.startswith("loss.") and tree.get("loss") is None:
            tree["loss"] = [t.to_dict() for t in _default_loss()]
        apply_override(tree, assignment)
    return from_dict(Config, tree)


def _override_sweep(tree: dict[str, Any], assignment: str) -> None:
    """`sweep.optim.lr=[1e-4, 3e-4]` sets one axis of the sweep grid (the key keeps its dots)."""
    dotted, text = assignment.split("=", 1)
    name = dotted.strip().removeprefix("sweep.")
    sweep = tree.get("sweep")
    if sweep is None:
        sweep = tree["sweep"] = {}
    if not isinstance(sweep, dict):
        raise ConfigError(f"override {dotted}: the config's sweep is a list of points; replace "
                          "it whole with sweep='[{...}, ...]'")
    try:
        sweep[name] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted}: value is not valid YAML ({e.problem})") from None


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    return from_dict(Config, tree)


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (leaves only)."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in dict.fromkeys([*a, *b]):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            out.append(key)

    walk(old.to_dict(), new.to_dict(), "")
    return out


def is_mutable_on_resume(key: str) -> bool:
    return any(key == m or key.startswith(m + ".") for m in MUTABLE_ON_RESUME)


def keyword_hparams(fn: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """The keyword-only parameters (name -> annotation) of a registered function, and which of
    them have no default (required in the config)."""
    sig = inspect.signature(fn, eval_str=True)
    params = {name: p for name, p in sig.parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "step"}
    types_ = {name: p.annotation if p.annotation is not inspect.Parameter.empty else Any
              for name, p in params.items()}
    required = frozenset(n for n, p in params.items() if p.default is inspect.Parameter.empty)
    return types_, required
