"""The run's configuration schema: typed, frozen dataclasses, one per section, each field with
a docstring. `load_config` reads a YAML preset and dotted overrides (`jaxsae.parsing`); every
key and type is checked as it is parsed, and each section checks its own values (and `Config`
the combinations of its sections) in `__post_init__`.

What needs other modules (is `sae.activation` registered, do the loss terms' hyper-parameters
type-check, does `data.generate` describe a generator) is checked once, where a run starts, by
`jaxsae.checks.check_run`: this module imports no other part of jaxsae but the parser, so a
config can be replaced, compared and restored from a checkpoint without any of it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import itertools
import math
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxsae.errors import ConfigError, DataError
from jaxsae.parsing import (
    apply_override,
    assign,
    from_dict,
    note_override,
    override_value,
    parse_value,
    plain,
    read_yaml_mapping,
    refuse_repeated_overrides,
    sets_path,
    typename,
    unknown_key_message,
)


def _count(n: int) -> str:
    """A count for a message: exact, or to 4 digits past 10^15 (1e30 read as a float is
    1000000000000000019884624838656 as an integer)."""
    return f"{n:,}" if n < 10**15 else f"{n:.4g}"


def _need(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


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
    normalize: Literal["auto", "none", "unit_mean_squared_norm"] = "auto"
    """`unit_mean_squared_norm` scales inputs so that E‖x‖² = d_in (estimated before training,
    saved in the checkpoint, folded into the exported weights), the scale the loss
    coefficients are given at; `none` trains on the data as it is. `auto` (resolved when the
    config is read): unit_mean_squared_norm, or none for an activation whose codes change
    when a scale is folded into the weights (`matching_pursuit`)."""
    drop_norm_above: float | None = None
    """Drop tokens whose norm exceeds this multiple of the median norm (e.g. attention sinks)."""
    stats_tokens: int = 65536
    """Tokens sampled evenly across the data to estimate the median norm and the scale."""
    lanes: int | Literal["auto"] = "auto"
    """Independent streams each batch is assembled from; the number of processes must divide
    it (each process reads only its lanes) and it must divide optim.batch_size. `auto`
    (resolved when the config is read): 8, or the largest power of two dividing a batch size
    that 8 does not."""
    eval_tokens: int | Literal["auto"] = "auto"
    """Tokens at the end of the data held out from training and used for the final evaluation;
    `auto`: min(65536, 5 % of the data)."""
    check_finite: bool = False
    """Scan every shard for NaN/inf when the data is opened (one full read)."""
    generate: Mapping[str, Any] | None = None
    """If `path` is missing, generate it first: `{kind: superposition, ...}` (`jaxsae synth`)."""
    stream: bool = False
    """Draw `generate`'s tokens as training reads them, writing nothing (no `path`): the
    tokens `jaxsae synth` would write, each block generated when a lane first reads it;
    resumes exactly. Without `generate.tokens`, just enough are drawn for the run
    (optim.total_tokens plus the held-out tokens), so none is seen twice."""
    target: str | None = None
    """A transcoder's targets: a second jaxsae shard directory whose row i is what row i of
    `path` maps to (e.g. an MLP's output for its input; same shard sizes, same order; its
    width is d_out), or a SAELens cache of the same tokens (the same directory as `path` when
    one cache holds both columns). Set, the dictionary is a transcoder (`sae.transcoder`)."""
    target_hook: str | None = None
    """SAELens caches: the target's activation column (needed when `data.target` has several)."""

    def __post_init__(self):
        _expand_home(self, "path", "target")
        _need(self.shuffle_buffer > 0, "data.shuffle_buffer", "must be > 0")
        _need(0 <= self.seed < 2**63, "data.seed", "must be in [0, 2^63)")
        _need(self.eval_tokens == "auto" or self.eval_tokens >= 0, "data.eval_tokens",
              "must be >= 0 (or auto)")
        _need(self.drop_norm_above is None or self.drop_norm_above >= 1, "data.drop_norm_above",
              f"must be >= 1 (a multiple of the median norm: below 1 it drops most tokens, not "
              f"outliers), got {self.drop_norm_above}")
        _need(self.stats_tokens > 0, "data.stats_tokens", "must be > 0")
        _need(self.lanes == "auto" or self.lanes > 0, "data.lanes", "must be > 0 (or auto)")
        _need(self.target_hook is None or self.target is not None, "data.target_hook",
              "names a column of data.target's SAELens cache; set data.target too "
              "(data.path again when one cache holds both columns)")
        if self.stream:
            _need(self.generate is not None, "data.stream",
                  "draws the tokens of data.generate; set data.generate too")
            _need(not self.path, "data.path",
                  "nothing is read or written with data.stream; leave data.path out")
            _need(self.target is None, "data.target",
                  "not with data.stream (streamed data has no targets)")

    def held_out(self, n_tokens: int) -> int:
        """Tokens held out for the final evaluation from data of `n_tokens` tokens."""
        if self.eval_tokens == "auto":
            return min(AUTO_EVAL_TOKENS, n_tokens // 20)
        return self.eval_tokens

    def training_tokens(self, n_tokens: int, batch_size: int, where: Any) -> int:
        """Tokens left for training in data of `n_tokens` tokens after the hold-out; fewer than
        one batch of `batch_size` is refused naming `where` (the data) and data.eval_tokens
        (`jaxsae train`'s check, and `jaxsae import`'s before it writes a config)."""
        held_out = self.held_out(n_tokens)
        if n_tokens - held_out < batch_size:
            raise DataError(f"{where}: {n_tokens} tokens leave {max(n_tokens - held_out, 0)} "
                            f"for training after data.eval_tokens ({held_out}); need at least "
                            f"optim.batch_size ({batch_size})")
        return n_tokens - held_out


# What `auto` settings resolve to, by `sae.activation` (checked against the activations'
# registry by the tests: this module imports none of jaxsae's modelling code).
K_ACTIVATIONS = ("topk", "batchtopk", "matching_pursuit")
"""Activations whose sparsity `sae.k` sets: a config without `loss` gets the mse alone (the
others mse + L1)."""
UNIT_ROW_ACTIVATIONS = ("relu", *K_ACTIVATIONS)
"""`sae.decoder_norm: auto` gives these unit rows, the others free rows (relu since 0.3.0,
with `sae.init_l0: auto` starting its encoder where the first reconstruction is about the
input's size)."""
RAW_SCALE_ACTIVATIONS = ("matching_pursuit",)
"""`data.normalize: auto` gives these none (their codes are not scale invariant), the others
unit_mean_squared_norm."""
AUTO_SINCE = {"sae.decoder_norm": "jaxsae 0.3.0", "sae.init_l0": "jaxsae 0.3.0",
              "loss": "jaxsae 0.3.0", "data.normalize": "jaxsae 0.2.0"}
"""When what `auto` gives last changed, by key (a ReLU's: `auto_since`). Before 0.2.0
sae.decoder_norm and data.normalize had no `auto` (they defaulted to unit and none) and a
config without `loss` got mse + L1 from the first step whatever its activation; 0.2.0 gave
relu free decoder rows and the L1 a ramp; 0.3.0 gives relu unit rows started by
`sae.init_l0: auto`, and the L1 of a config without `loss` the coefficient for unit rows. A
run resumed from before keeps what it was trained with (`Config.defaulted`)."""


def auto_since(key: str, activation: str) -> str:
    """When what `auto` gives `key` last changed for this activation (0.3.0 changed a ReLU's
    rows and L1 alone; a review found other activations' refusals naming it)."""
    if activation != "relu" and key in ("sae.decoder_norm", "loss"):
        return "jaxsae 0.2.0"
    return AUTO_SINCE[key]


# `auto` sizes: a 30-second smoke test and a 1B-token job both get sensible values.
AUTO_LANES = 8
AUTO_EVAL_TOKENS = 65536
DEAD_WINDOW_MAX = 2**30
"""The longest window of a dead latent, in tokens: a latent's count of tokens since it fired
(int32 on the device) saturates here instead of overflowing."""
AUTO_WARMUP_STEPS = 1000


def _expand_home(section: Any, *names: str) -> None:
    """`~/x` in the path fields `names` of a (frozen) config section is the home directory's
    x, as a shell gives it on the command line (fault testing: `run_dir: ~/run` in a YAML
    trained into a directory named `~` below the working directory)."""
    for name in names:
        value = getattr(section, name)
        if isinstance(value, str) and value.startswith("~"):
            object.__setattr__(section, name, os.path.expanduser(value))


def auto_ramp(total_steps: int) -> int:
    """What `auto` gives a warm-up (the learning rate's, a loss term's) in a run of
    `total_steps`: 5 % of them, at most AUTO_WARMUP_STEPS."""
    return min(AUTO_WARMUP_STEPS, total_steps // 20)


@dataclass(frozen=True)
class SAEConfig:
    d_sae: int = 4096
    """Number of latents (dictionary width)."""
    activation: str = "relu"
    """A registered activation (`jaxsae.activations`): `relu`, `topk`, `batchtopk` (top
    k·batch over the batch), `jumprelu`, ..."""
    k: int = 32
    """Active latents per token for `topk` / `batchtopk` (mean over the batch for `batchtopk`)."""
    tied: bool = False
    """Tied weights: no `W_enc`; the encoder is `W_dec.T`."""
    decoder_norm: Literal["auto", "unit", "free"] = "auto"
    """`unit` keeps decoder rows at unit norm; `free` leaves their norm to the optimiser (the
    penalties weight each code by its row's norm). `auto` (resolved when the config is read):
    unit for `relu` (started by `init_l0: auto`), `topk`, `batchtopk` and `matching_pursuit`
    (sparsify's recipe; matching pursuit compares correlations), free for the others
    (SAELens's standard recipe); a run from `init_from` whose decoder rows cannot be made unit
    (of several lengths) keeps them free (`train._rows_of_start`)."""
    init_decoder_norm: float = 0.1
    """Decoder row norm at initialisation when `decoder_norm: free` (`unit` starts at 1)."""
    init_l0: int | Literal["auto"] | None = "auto"
    """A `relu` encoder's bias starts where about this many latents fire on a typical token
    (from the data's median norm, for random encoder directions). `auto`: with unit decoder
    rows d_in, where the first reconstruction is about the input's size (from a bias of 0 it
    is d_sae / (2 d_in) times it, which wide dictionaries do not recover from), at most
    d_sae / 2 (a bias of 0); with free rows, another activation or `init_from`, nothing (the
    start as it was). null: a bias of 0 (half the latents fire)."""
    jumprelu_init_threshold: float = 0.001
    """Initial JumpReLU threshold (>= 0, as training keeps it)."""
    jumprelu_bandwidth: float = 0.001
    """Width of the straight-through window used for the JumpReLU threshold gradient."""
    batchtopk_threshold_momentum: float = 0.01
    """EMA rate of the BatchTopK inference threshold (min kept activation per batch); a run
    of fewer than 10 / this steps uses 10 / its steps, so that θ follows its last tenth."""
    skip: bool = False
    """Transcoders: add a linear bypass W_skip [d_out, d_in] (initialised at zero), a skip
    transcoder: ŷ = f·W_dec + b_dec + x·W_skipᵀ."""
    transcoder: bool = False
    """Set by `data.target` (not by hand): the decoder maps to the target's width d_out, and the
    encoder reads x as it is (x·W_enc + b_enc, no centring by b_dec, as SAELens's
    transcoders)."""

    def __post_init__(self):
        auto = []
        if self.decoder_norm == "auto":
            object.__setattr__(self, "decoder_norm", "unit" if self.activation in
                               UNIT_ROW_ACTIVATIONS else "free")
            auto.append("decoder_norm")
        if self.init_l0 == "auto":  # (kept as `auto`: what it gives follows from the rest)
            auto.append("init_l0")
        object.__setattr__(self, "_from_auto", tuple(auto))
        _need(0 < self.d_sae < 2**31, "sae.d_sae",  # (a latent's index is int32)
              f"must be in 1..2^31 - 1, got {self.d_sae}")
        _need(self.k > 0, "sae.k", f"must be > 0, got {self.k}")
        _need(self.init_decoder_norm > 0, "sae.init_decoder_norm", "must be > 0")
        if self.init_l0 not in (None, "auto"):
            _need(self.activation == "relu", "sae.init_l0",
                  f"sets a ReLU encoder's starting bias: only for activation relu, not "
                  f"{self.activation} (auto or null there)")
            _need(0 < self.init_l0 < self.d_sae, "sae.init_l0",
                  f"must be auto, null or in 1..d_sae - 1 ({self.d_sae - 1}), got "
                  f"{self.init_l0}")
        _need(self.jumprelu_bandwidth > 0, "sae.jumprelu_bandwidth", "must be > 0")
        # (fault testing: -1 trained, its first steps' L0 penalties counting latents that
        # never fire, as θ is kept >= 0 only after an update: activations/jumprelu.py)
        _need(self.jumprelu_init_threshold >= 0, "sae.jumprelu_init_threshold",
              f"must be >= 0, got {self.jumprelu_init_threshold}")
        _need(0 < self.batchtopk_threshold_momentum <= 1, "sae.batchtopk_threshold_momentum",
              "must be in (0, 1]")


@dataclass(frozen=True)
class TermConfig:
    term: str
    """Name of a registered loss term (see `jaxsae.penalties`)."""
    name: str | None = None
    """A name for this term (metrics `loss.<name>`, overrides and sweeps
    `loss.<name>.coefficient`); default: the term's own name."""
    coefficient: float = 1.0
    """Weight of the term in the total loss."""
    warmup_steps: int | Literal["auto"] = 0
    """The coefficient ramps linearly from 0 to `coefficient` over this many steps; `auto`:
    5 % of the run's steps, at most 1000, as optim.warmup_steps (resolved for the run's length
    when the step is built, `Config.resolved_loss`: a run extended on resume ramps as one of
    the new length, as its learning rate does)."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """The term's own hyper-parameters, written flat beside `term` in YAML; the term parses
    and checks them (`jaxsae.penalties`)."""

    @classmethod
    def parse(cls, raw: Any, key: str) -> TermConfig:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{key}: expected a mapping like {{term: l1, coefficient: 5}}")
        raw = dict(raw)
        if "term" not in raw:
            raise ConfigError(f"{key}.term: missing (the name of a loss term)")
        term = parse_value(str, raw.pop("term"), f"{key}.term")
        name = parse_value(str | None, raw.pop("name", None), f"{key}.name")
        if name is not None and (not name or "." in name or name.lstrip("-").isdigit()):
            raise ConfigError(f"{key}.name: {name!r} is not a name (no dots, not a number)")
        coefficient = parse_value(float, raw.pop("coefficient", 1.0), f"{key}.coefficient")
        warmup = parse_value(int | Literal["auto"], raw.pop("warmup_steps", 0),
                             f"{key}.warmup_steps")
        if warmup != "auto" and warmup < 0:
            raise ConfigError(f"{key}.warmup_steps: must be >= 0, got {warmup}")
        if coefficient < 0:  # a negative penalty rewards what it is meant to penalise
            raise ConfigError(f"{key}.coefficient: must be >= 0, got {coefficient}")
        return cls(term=term, name=name, coefficient=coefficient, warmup_steps=warmup,
                   params={str(k): v for k, v in raw.items()})

    @property
    def label(self) -> str:
        return self.name or self.term

    def ramp(self, total_steps: int) -> int:
        """The steps the coefficient ramps over in a run of `total_steps`, `auto` resolved."""
        return (auto_ramp(total_steps) if self.warmup_steps == "auto"
                else self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"term": self.term}
        if self.name is not None:
            out["name"] = self.name
        out["coefficient"] = self.coefficient
        if self.warmup_steps:
            out["warmup_steps"] = self.warmup_steps
        out.update({k: plain(v) for k, v in self.params.items()})
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
    """Linear learning-rate warm-up over this many steps n (step i runs at lr·(i+1)/n);
    `auto`: min(1000, 5 % of the steps)."""
    decay_fraction: float = 0.2
    """Fraction of the steps, at the end, over which the learning rate decays to 0 (0: the
    rate stays constant after the warm-up)."""
    decay_shape: Literal["linear", "cosine"] = "linear"
    """How it decays: linearly or along half a cosine."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    adam_b1: float = 0.9
    """Adam first-moment decay."""
    adam_b2: float = 0.999
    """Adam second-moment decay."""
    threshold_lr_scale: float = 1.0
    """Multiplies the learning rate of learned thresholds (JumpReLU's θ). Adam moves a
    parameter by about the learning rate a step, so thresholds that must rise to the scale of
    the pre-activations (often 1–10) need ~10^4 steps at lr 3e-4; a larger scale lets a short
    run's thresholds get there (benchmarks/RESULTS.md, issue 23)."""
    skip_nonfinite: bool = False
    """Skip (and count) steps whose loss or gradient is NaN/inf instead of stopping the run."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the encoder/decoder matmuls. Parameters, optimiser state and the loss stay
    float32 (bfloat16 copies of the parameters are made inside the step)."""
    kernels: Literal["auto", "cpu", "xla", "pallas"] = "auto"
    """How the sparse paths gather, scatter and pick top k (`jaxsae.kernels`): `auto` takes
    the forms tuned for XLA-CPU on the CPU and XLA's plain forms elsewhere; `pallas`, the
    Pallas kernels (Triton, for GPUs). The same function either way, up to the order of float
    additions."""

    def __post_init__(self):
        _need(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _need(self.batch_size > 0, "optim.batch_size", f"must be > 0, got {self.batch_size}")
        _need(self.total_tokens >= self.batch_size, "optim.total_tokens",
              f"must be at least one batch ({self.batch_size} tokens), got {self.total_tokens}")
        _need(self.total_steps < 2**31, "optim.total_tokens",  # (the device's step is int32)
              f"{_count(self.total_tokens)} tokens make {_count(self.total_steps)} steps of "
              f"optim.batch_size {self.batch_size}, more than the 2^31 - 1 a run can count")
        _need(0 <= self.decay_fraction <= 1, "optim.decay_fraction", "must be in [0, 1]")
        _need(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        for beta in ("adam_b1", "adam_b2"):  # 1 never forgets the first gradient; >1 diverges
            value = getattr(self, beta)
            _need(0 <= value < 1, f"optim.{beta}", f"must be in [0, 1), got {value}")
        _need(self.threshold_lr_scale > 0, "optim.threshold_lr_scale",
              f"must be > 0, got {self.threshold_lr_scale}")
        _need(self.warmup >= 0, "optim.warmup_steps", "must be >= 0 (or auto)")
        # (whether the warm-up and decay fit the run: `Config`, with the loss terms' ramps)

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
        return max(0, min(auto_ramp(self.total_steps), self.total_steps - self.decay_steps))


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    """Devices along the batch axis (-1: all devices not used by `model`)."""
    model: int = 1
    """Devices along the dictionary (d_sae) axis (-1: all devices not used by `data`)."""

    def __post_init__(self):
        for axis in ("data", "model"):
            size = getattr(self, axis)
            _need(size == -1 or size > 0, f"mesh.{axis}", f"must be -1 or > 0, got {size}")
        _need(not (self.data == -1 and self.model == -1), "mesh",
              "at most one of mesh.data and mesh.model may be -1")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = 1000
    """Save a checkpoint every this many steps (and at the end, and on SIGTERM / Ctrl-C)."""
    every_minutes: float | None = None
    """Also save when this many minutes have passed since the last save."""
    keep: int = 3
    """Number of newest checkpoints kept on disk."""

    def __post_init__(self):
        _need(self.every_steps is None or self.every_steps > 0, "checkpoint.every_steps",
              "must be > 0 (or null)")
        _need(self.every_minutes is None or self.every_minutes > 0, "checkpoint.every_minutes",
              "must be > 0 (or null)")
        _need(self.every_steps is not None or self.every_minutes is not None, "checkpoint",
              "set every_steps, every_minutes or both")
        _need(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclass(frozen=True)
class WandbConfig:
    """`log.wandb`: Weights & Biases (the extra `wandb`); `{}` takes every default."""

    project: str = "jaxsae"
    entity: str | None = None
    """Team or user (default: wandb's default entity)."""
    name: str | None = None
    """Run name (default: the run's `name`; a sweep's SAEs add their values)."""
    group: str | None = None
    """Run group (default: the run's `name` for a sweep, whose SAEs are runs of one group)."""
    tags: tuple[str, ...] = ()
    mode: Literal["online", "offline", "disabled"] | None = None
    """Default: wandb's own (WANDB_MODE, else online)."""


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 50
    """Write a line to metrics.jsonl every this many steps."""
    dead_window_tokens: int = 4_000_000
    """A latent that has not fired for this many tokens (or, earlier in the run, on any token
    so far) counts as dead in `dead_fraction`."""
    curves: bool = True
    """Draw curves.png (loss per term, L0, explained variance, ...) at checkpoints (at most
    once a minute) and at the end."""
    wandb: WandbConfig | None = None
    """Log to Weights & Biases too (metrics.jsonl stays the record)."""
    tensorboard: bool = False
    """Write TensorBoard event files too, under each SAE's `tensorboard/`."""

    def __post_init__(self):
        _need(self.every_steps > 0, "log.every_steps", "must be > 0")
        _need(0 < self.dead_window_tokens <= DEAD_WINDOW_MAX, "log.dead_window_tokens",
              f"must be in 1..{DEAD_WINDOW_MAX} (2^30 tokens, where a latent's count of tokens "
              "since it fired saturates)")


# Keys a sweep may vary: they change numbers, never shapes, so one vmapped step trains them all.
SWEEPABLE = {"seed": int, "optim.lr": float, "sae.k": int, "loss.<name or i>.coefficient": float}
TERM_COEFFICIENT = re.compile(r"loss\.([^.]+)\.coefficient")


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
            if not raw:  # (the product of no axes is one point: the base config, unswept)
                raise ConfigError(f"{key}: no SAEs to train (empty sweep)")
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
                              f"of mappings (one per SAE), got {typename(raw)}")
        if not points:
            raise ConfigError(f"{key}: no SAEs to train (empty sweep)")
        parsed = []
        for point, at in zip(points, where, strict=True):
            for name in point:
                if not isinstance(name, str):
                    raise ConfigError(f"{at}.{name}: expected a dotted config key (text) to "
                                      f"sweep, got {typename(name)}")
            parsed.append({name: parse_value(_sweep_type(name, f"{at}.{name}"), value,
                                              f"{at}.{name}")
                           for name, value in point.items()})
        return cls(points=tuple(parsed))

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.points]


def _sweep_type(name: str, key: str) -> type:
    if name in SWEEPABLE:
        return SWEEPABLE[name]
    if TERM_COEFFICIENT.fullmatch(name):
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
            raise ConfigError(unknown_key_message(key, part, fields)
                              + (f" (under {where})" if where else ""))
        hint = typing.get_type_hints(cls)[part]
        cls = hint if dataclasses.is_dataclass(hint) and part != "loss" else None


def sweep_label(point: Mapping[str, Any]) -> str:
    """`loss.1.coefficient=0.3,seed=1`: a point's values as text."""
    return ",".join(f"{k}={v}" for k, v in point.items()) or "base"


UNIT_ROW_L1 = 2.0
"""The default L1 coefficient with unit decoder rows (free rows: 5.0), on inputs normalised to
E|x|^2 = d_in (RESULTS.md, "The ReLU default")."""


def default_loss(activation: str, decoder_norm: str = "free") -> tuple[TermConfig, ...]:
    """The loss of a config that gives none: the mse alone where `sae.k` sets the sparsity
    (K_ACTIVATIONS; until 0.2.0 every activation had the L1 too), else mse + L1 ramped up
    over the first 5 % of the run (until 0.2.0 from the first step: a third of the latents
    died in 1.6M tokens of SmolLM2 activations, RESULTS.md), at UNIT_ROW_L1 with unit decoder
    rows (since 0.3.0) and 5.0 with free ones (the L1 weighted by each row's norm, which
    starts at 0.1)."""
    if activation in K_ACTIVATIONS:
        return (TermConfig("mse"),)
    coefficient = UNIT_ROW_L1 if decoder_norm == "unit" else 5.0
    return (TermConfig("mse"), TermConfig("l1", coefficient=coefficient, warmup_steps="auto"))


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
    loss: tuple[TermConfig, ...] | None = None
    """Loss terms; the total loss is the sum of coefficient(step) * term. None (not given):
    `default_loss` of sae.activation and sae.decoder_norm, resolved when the config is
    read."""
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
        _expand_home(self, "run_dir", "init_from")
        # Each section checked its own values; here, what combines them (cross-module checks:
        # jaxsae.checks.check_run).
        _need(bool(self.data.path) or self.data.stream, "data.path",
              "required (a directory of cached activations)")
        _need(-2**63 <= self.seed < 2**63, "seed", "must be a 64-bit integer")
        _need(bool(self.name) and not Path(self.name).is_absolute()
              and not {"", ".", ".."} & set(self.name.split("/")),
              "name", f"must be a relative name below runs/ (no '.' or '..'), got {self.name!r};"
              " use run_dir for a directory elsewhere")
        resolved = getattr(self.sae, "_from_auto", ())
        auto = [f"sae.{name}" for name in resolved]
        if self.loss is None:
            object.__setattr__(self, "loss", default_loss(self.sae.activation,
                                                          self.sae.decoder_norm))
            auto.append("loss")
        if resolved:  # the record is this config's: one made from it by `replace` has none
            sae = replace(self.sae)
            object.__setattr__(sae, "_from_auto", ())  # (`init_l0: auto` stays auto)
            object.__setattr__(self, "sae", sae)
        if self.data.normalize == "auto":
            object.__setattr__(self, "data", replace(self.data, normalize=(
                "none" if self.sae.activation in RAW_SCALE_ACTIVATIONS
                else "unit_mean_squared_norm")))
            auto.append("data.normalize")
        object.__setattr__(self, "_from_auto", tuple(auto))
        if self.data.lanes == "auto":  # (fault testing: the fixed 8 refused batches below 8)
            object.__setattr__(self, "data", replace(
                self.data, lanes=math.gcd(AUTO_LANES, self.optim.batch_size)))
            object.__setattr__(self, "_follows", {"data.lanes": "optim.batch_size"})
        if self.data.target is not None and not self.sae.transcoder:
            # data.target makes the dictionary a transcoder (the section cannot see data)
            object.__setattr__(self, "sae", replace(self.sae, transcoder=True))
        _need(self.sae.transcoder == (self.data.target is not None), "sae.transcoder",
              "is set by data.target (the targets a transcoder maps to), not by hand")
        _need(self.sae.transcoder or not self.sae.skip, "sae.skip",
              "a bypass from input to target needs a transcoder (set data.target)")
        _need(self.optim.batch_size % self.data.lanes == 0, "data.lanes",
              f"must divide optim.batch_size ({self.optim.batch_size}), got {self.data.lanes}")
        _need(self.init_from is None or self.sae.init_l0 in (None, "auto"), "sae.init_l0",
              "sets a random start's encoder bias, and init_from starts from its weights")
        _need(len(self.loss) > 0, "loss", "at least one loss term is required")
        # (a sweep's base may leave a swept coefficient 0: each of its SAEs is checked alone)
        _need(self.sweep is not None or any(t.coefficient > 0 for t in self.loss), "loss",
              "every term's coefficient is 0: the loss is 0 and nothing would train")
        labels = [t.label for t in self.loss]
        for name in {t.name for t in self.loss if t.name is not None}:
            _need(labels.count(name) == 1, "loss", f"two terms are called {name!r}")
        self._check_ramps_fit()
        if self.mesh.model > 0:
            _need(self.sae.d_sae % self.mesh.model == 0, "mesh.model",
                  f"must divide sae.d_sae ({self.sae.d_sae}), got {self.mesh.model}")
        if self.sweep is not None:
            for i, point in enumerate(self.sweep.points):
                terms: dict[int, str] = {}
                for key in point:
                    if (m := TERM_COEFFICIENT.fullmatch(key)):
                        term = self.term_index(m[1], f"sweep.{key}")
                        # loss.l1 and loss.1 may be one term: the last would win unseen
                        _need(term not in terms, f"sweep.{key}",
                              f"SAE {i} ({sweep_label(point)}) also sets this term as "
                              f"{terms.get(term)}; set each term once")
                        terms[term] = key
            members = self.sweep_configs()  # each checked like a config of its own
            for i, member in enumerate(members):  # compared as trained, not as spelled
                if member in members[:i]:
                    j = members.index(member)
                    raise ConfigError(
                        f"sweep: SAE {i} ({sweep_label(self.sweep.points[i])}) repeats SAE {j} "
                        f"({sweep_label(self.sweep.points[j])}): they train the same config")
        if self.sweep_chunk is not None:
            n = len(self.sweep.points) if self.sweep is not None else 1
            _need(self.sweep_chunk > 0, "sweep_chunk", f"must be >= 1, got {self.sweep_chunk}")
            _need(n % self.sweep_chunk == 0, "sweep_chunk",
                  f"must divide the {n} SAEs of the sweep, got {self.sweep_chunk}"
                  if self.sweep is not None else
                  f"a run without a sweep steps 1 SAE (1 or null), got {self.sweep_chunk}")

    def term_keys(self) -> list[str]:
        """How an override addresses each loss term: `loss.<label>` where no other term has
        its label, else `loss.<position>` (fault testing: two `l1` terms were each named
        `loss.l1`, a key that addresses neither)."""
        labels = [t.label for t in self.loss]
        return [f"loss.{n}" if labels.count(n) == 1 else f"loss.{i}"
                for i, n in enumerate(labels)]

    def term_index(self, which: str, key: str = "loss") -> int:
        """The position of loss term `which`: a position, or a term's label (its name, else its
        kind), as in overrides: `loss.sparsity.coefficient`."""
        if which.isdigit():
            _need(int(which) < len(self.loss), key, f"there is no loss term {which} (the config "
                  f"has {len(self.loss)}: positions 0 .. {len(self.loss) - 1})")
            return int(which)
        found = [i for i, t in enumerate(self.loss) if t.label == which]
        if len(found) == 1:
            return found[0]
        _need(not found, key, f"{len(found)} loss terms are {which!r}: name them")
        labels = [t.label for t in self.loss]
        close = difflib.get_close_matches(which, labels, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: no loss term named {which!r}{hint}; terms: "
                          f"{', '.join(labels)} (or positions 0 .. {len(labels) - 1})")

    def _check_ramps_fit(self) -> None:
        """Refuses, in one line naming every key, a warm-up plus decay of the learning rate, or
        a loss term's ramp (which the run would never finish: it applies less than it says),
        longer than the run. (`auto` always fits; fault testing: shrinking a preset for a smoke
        test was refused one key at a time.)"""
        optim, total = self.optim, self.optim.total_steps
        keys, why, fixes = [], [], []
        if optim.warmup + optim.decay_steps > total:  # (only a warm-up set in steps can)
            keys.append("optim.warmup_steps, optim.decay_fraction")
            why.append(f"the learning rate's warm-up plus decay ({optim.warmup} + "
                       f"{optim.decay_steps} steps)")
            fixes.append("optim.warmup_steps=auto")
        for term, name in zip(self.loss, self.term_keys(), strict=True):
            if term.ramp(total) > total:
                keys.append(f"{name}.warmup_steps")
                why.append(f"the {term.label} term's warm-up to {term.coefficient:g} "
                           f"({term.warmup_steps} steps)")
                fixes.append(f"{name}.warmup_steps=0")
        if keys:
            raise ConfigError(f"{', '.join(keys)}: {'; '.join(why)} exceed{'s' * (len(why) < 2)} "
                              f"the run's {total} steps (optim.total_tokens / "
                              f"optim.batch_size); lower {'them' if len(why) > 1 else 'it'} "
                              f"(e.g. {' '.join(fixes)})")

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
    def defaulted(self) -> tuple[str, ...]:
        """The keys this config left to `auto` (given no value, or `auto`), now resolved
        (`sae.init_l0` stays `auto`); empty for a config made from another
        (`dataclasses.replace`), and for one read back from a run all but `sae.init_l0`, whose
        other values are resolved."""
        return getattr(self, "_from_auto", ())

    @property
    def loss_made_from(self) -> str | None:
        """Where `load_config` took loss terms that overrides edited without giving a `loss`
        (the default terms for the rows it resolved), for a refused resume to say; else None."""
        return getattr(self, "_loss_from", None)

    @property
    def loss_edits(self) -> tuple[str, ...]:
        """With `loss_made_from`: the keys of the default terms the overrides set, by position
        (`loss.1.coefficient`; `loss.1` for a whole term), whatever value they gave."""
        return getattr(self, "_loss_edits", ())

    @property
    def follows(self) -> dict[str, str]:
        """Keys this config left to `auto` whose value is derived from another key's
        (`data.lanes` from `optim.batch_size`), each with that key."""
        return getattr(self, "_follows", {})

    @property
    def resolved_loss(self) -> tuple[TermConfig, ...]:
        """The loss terms as this run schedules them: `warmup_steps: auto` resolved for its
        length. (The config keeps `auto`: a run extended on resume ramps for its new length,
        as its learning rate's warm-up does, instead of being refused for a changed loss.)"""
        return self._ramped_terms(self.optim.total_steps)

    def ramped_for(self, total_steps: int) -> Config:
        """This config with its loss terms' `auto` ramps resolved for a run of `total_steps`
        (a resumed run is compared with its checkpoint at the checkpoint's length)."""
        if not any(t.warmup_steps == "auto" for t in self.loss):
            return self
        # A copy to compare, never trained, so not checked again (`replace` would): its ramps
        # are the checkpoint's length's, its optim.total_tokens maybe a shorter run's (fault
        # testing: a resume at a smaller total_tokens was refused for loss.l1.warmup_steps,
        # a key left to auto, and then for changing it as the message said).
        ramped = copy.copy(self)
        object.__setattr__(ramped, "loss", self._ramped_terms(total_steps))
        return ramped

    def _ramped_terms(self, total_steps: int) -> tuple[TermConfig, ...]:
        return tuple(replace(t, warmup_steps=t.ramp(total_steps)) for t in self.loss)

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
                out[f.name] = plain(value)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys that may differ between a run and its resumption (they do not change what is computed).
# (optim.kernels changes only the order of float additions: a run may resume on another
# kind of machine. sae.init_l0 sets the first step alone: a resumed run keeps its start's,
# `train._as_checkpointed`.)
MUTABLE_ON_RESUME = ("name", "run_dir", "distributed", "data.path", "data.target",
                     "data.generate", "data.check_finite", "log", "checkpoint",
                     "optim.total_tokens", "optim.skip_nonfinite", "optim.kernels", "sweep_chunk",
                     "sae.init_l0")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML preset (or starts from defaults when `path` is None) and applies overrides."""
    tree = read_yaml_mapping(path) if path is not None else {}
    if "arms" in tree and "base" in tree:  # (fault testing: "seeds: unknown key (did you mean
        # 'seed'?)", advice that could not help)
        raise ConfigError(f"{path}: a bench config (base, arms); run it with `jaxsae bench`")
    edited, edits = apply_overrides(tree, overrides)
    cfg = from_dict(Config, tree)
    if edited:  # (for a refused resume to say where its values came from: a review)
        object.__setattr__(cfg, "_loss_from", edited)
        object.__setattr__(cfg, "_loss_edits", edits)
    return cfg


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]
                    ) -> tuple[str | None, tuple[str, ...]]:
    """Applies `jaxsae train`'s KEY=VALUE overrides to the config tree `tree`, in place (also
    `jaxsae import`'s: fault testing found a sweep override refused there as a key
    `sweep.optim`): `sweep.KEY=[...]` sets an axis of the sweep; terms (`loss.N.KEY`) apply
    after a whole `loss=`, and edit the activation's default terms when `tree` has none.
    Returns where the loss terms came from if they are such edited defaults (else None) and
    the keys the overrides set in them."""
    refuse_repeated_overrides(overrides)
    terms = [a for a in overrides if a.startswith(("loss.", "loss["))]
    whole = [i for i, a in enumerate(overrides) if a.split("=", 1)[0].strip() == "loss"]
    for i, assignment in enumerate(overrides):  # (terms are applied after `loss=`: one given
        # before it would win over it unseen)
        if assignment in terms and whole and i < whole[-1]:
            raise ConfigError(f"override loss: replaces what {assignment.strip()} set; give "
                              "each setting once")
    seen: dict[str, tuple[str, Any]] = {}  # (a key set twice under two spellings is refused)
    for assignment in [a for a in overrides if a not in terms]:
        if assignment.startswith("sweep.") and "=" in assignment:
            name, value = override_sweep(tree, assignment)
            note_override(seen, f"sweep.{name}", assignment, value)
            continue
        apply_override(tree, assignment, seen)
    # `loss.1.coefficient=2` (or `loss[1]...`, as errors name it) edits the default terms of
    # the config's activation when it gives none (applied last: they depend on it)
    if terms and tree.get("loss") is None:
        sae = tree.get("sae") if isinstance(tree.get("sae"), dict) else {}
        activation = str(sae.get("activation", SAEConfig.activation))
        norm = sae.get("decoder_norm", "auto")
        if norm == "auto":
            norm = "unit" if activation in UNIT_ROW_ACTIVATIONS else "free"
        tree["loss"] = [t.to_dict() for t in default_loss(activation, str(norm))]
        edited = f"the default terms for {norm} decoder rows, edited"
    else:
        edited = None
    before = set(seen)
    for assignment in terms:
        apply_override(tree, assignment, seen)
    refuse_overrides_of_swept_keys(tree, seen)
    # the terms' keys the overrides set, by position as `seen` has them (not a `loss=` given
    # null before them: fault testing)
    return edited, tuple(key for key in seen if key not in before)


def refuse_overrides_of_swept_keys(tree: dict[str, Any], seen: dict[str, tuple[str, Any]]
                                    ) -> None:
    """Refuses an override of a key the sweep sets for every SAE (fault testing:
    `loss.l1.coefficient=3` beside `sweep.loss.l1.coefficient=[1, 2]` was dropped unseen, and
    config.yaml recorded the 3 no SAE trained with)."""
    sweep = tree.get("sweep")
    points = sweep if isinstance(sweep, list) else [sweep] if isinstance(sweep, dict) else []

    def spelt(point: Any) -> dict[str, str]:
        """The point's keys as `assign` spells them (list items by position) -> as given; one
        that names nothing is left to the sweep's own check."""
        keys = {}
        for name in point if isinstance(point, dict) else ():
            with contextlib.suppress(ConfigError, TypeError, ValueError):
                keys[assign(copy.deepcopy(tree), name, None)] = name
        return keys

    # what every SAE sets (a list's point that leaves a key out trains the config's value)
    each = [spelt(point) for point in points]
    swept = {k: name for k, name in (each[0] if each else {}).items()
             if all(k in keys for keys in each)}
    for key, (assignment, value) in seen.items():
        for canonical, name in swept.items():
            # (a mapping given whole that holds the key too; not a `loss=` list, whose terms
            # a sweep of their coefficients needs, written with one or not)
            inside = (canonical.startswith(key + ".") and isinstance(value, dict)
                      and sets_path(value, canonical[len(key) + 1:]))
            if not key.startswith("sweep.") and (key == canonical or inside):
                raise ConfigError(f"override {assignment.split('=', 1)[0].strip()}: the sweep "
                                  f"sets {name} for every SAE (sweep.{name}), so this value "
                                  "would be used by none; give it in the sweep")


def override_sweep(tree: dict[str, Any], assignment: str, where: str = ""
                   ) -> tuple[str, Any]:
    """`sweep.optim.lr=[1e-4, 3e-4]` sets one axis of the sweep grid of `tree` (the key keeps
    its dots); returns the axis and its values. `where`: the prefix of `tree`'s keys in the
    override as given (a bench's `arms.NAME.`), for the errors."""
    dotted, text = assignment.split("=", 1)
    # (a term by position as errors name it, `loss[1].coefficient`, is `loss.1.coefficient`)
    name = re.sub(r"^loss\[(\d+)\]", r"loss.\1", dotted.strip().removeprefix("sweep."))
    sweep = tree.get("sweep")
    if sweep is None:
        sweep = tree["sweep"] = {}
    if not isinstance(sweep, dict):
        raise ConfigError(f"override {where}{dotted}: the sweep there is a list of points; "
                          f"replace it whole with {where}sweep='[{{...}}, ...]'")
    sweep[name] = override_value(where + dotted, text)
    return name, sweep[name]


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    return from_dict(Config, tree)


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (leaves only). Lists of sections
    of the same length (the loss terms) are compared entry by entry and named as an override
    names them (`loss.1.coefficient`)."""
    return [key for key, _, _ in changes_of(old.to_dict(), new.to_dict())]


def changes_of(old: Mapping[str, Any], new: Mapping[str, Any]
               ) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value; None where a tree has none) of each `changed_keys` key of
    two configs' `to_dict()` trees.
    (The values come with the keys: a sweep point's keys hold dots, `sweep.1.sae.k`, so a key
    cannot be looked up again by splitting it; fault testing found both values None.)"""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, key: str):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in dict.fromkeys([*a, *b]):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
              and all(isinstance(v, dict) for v in (*a, *b))):
            for i, (u, v) in enumerate(zip(a, b, strict=True)):
                walk(u, v, f"{key}.{i}")
        elif a != b:
            out.append((key, a, b))

    walk(old, new, "")
    return out


def is_mutable_on_resume(key: str) -> bool:
    return any(key == m or key.startswith(m + ".") for m in MUTABLE_ON_RESUME)
