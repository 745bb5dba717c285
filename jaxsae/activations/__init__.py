"""The activation registry: one class per activation function, registered by name.

An activation owns everything that makes it what it is: the parameters it adds to the common
ones (`W_dec`, `b_dec`, and `W_enc` unless the SAE is tied or the activation needs none), how
it turns inputs into codes (`pre_activations`, `activate`), what it does after each optimiser
update, and how it is written to and read from the SAELens format. Loss terms and the rest of
jaxsae ask its capability flags (`has_k`, `has_threshold`, ...) instead of listing names.

Adding one is a module in this package defining a subclass with `@register`; every module here
is imported when the package is (see the bottom of this file), so nothing else is edited.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxsae import kernels
from jaxsae.config import SAEConfig
from jaxsae.errors import ConfigError, ExportError

Params = dict[str, jax.Array]


@flax.struct.dataclass
class Codes:
    """What `Activation.activate` computed for a batch."""

    acts: jax.Array
    """[batch, d_sae] the codes (on a sparse path, built from top_index / top_values)."""
    batch_threshold: jax.Array
    """[] BatchTopK: the smallest activation kept in the batch (0 for the others)."""
    penalized: jax.Array | None = None
    """[batch, d_sae] what sparsity penalties act on when it is not `acts` (Gated: the
    rectified gate pre-activations); None: `acts`."""
    top_index: jax.Array | None = None
    """[batch, k] the sparse path's chosen latents, largest first (None: dense codes); with
    `top_rows`, [n, m] entries of any rows."""
    top_values: jax.Array | None = None
    """Their values (same shape; 0 for padding)."""
    top_rows: jax.Array | None = None
    """The token (row of the batch) of each entry when a token's number of latents varies
    (BatchTopK); None: entry [b, j] is token b's."""


def encoder_weight(params: Params) -> jax.Array:
    """[d_in, d_sae] the encoder matrix (W_dec.T for tied SAEs)."""
    return params["W_enc"] if "W_enc" in params else params["W_dec"].T


class Activation:
    """The base class: a ReLU-like encoder (x - b_dec) · W_enc + b_enc, no extra behaviour."""

    name: ClassVar[str]
    """The `sae.activation` value."""
    architecture: ClassVar[str]
    """The SAELens `architecture` it exports as."""
    reads: ClassVar[bool] = True
    """A SAELens directory of its architecture loads as this activation (BatchTopK exports as
    JumpReLU, so a `jumprelu` directory loads as JumpReLU, and can start either)."""
    has_k: ClassVar[bool] = False
    """Uses `sae.k` (TopK-like): sweeps may vary it, `auxk` applies."""
    has_threshold: ClassVar[bool] = False
    """Has a `threshold` [d_sae] parameter."""
    learns_threshold: ClassVar[bool] = False
    """The optimiser trains `threshold` (JumpReLU), rather than the activation setting it."""
    has_encoder: ClassVar[bool] = True
    """Has an encoder matrix W_enc (unless tied); False: codes come from W_dec alone."""
    scale_invariant: ClassVar[bool] = True
    """Codes are unchanged when an input scale is folded into the weights (`normalize`)."""
    per_latent: ClassVar[bool] = True
    """A latent's code depends on its own pre-activation only (not on the others)."""
    has_gate: ClassVar[bool] = False
    """Codes pass a gate whose rectified pre-activations sparsity penalties act on (Gated):
    `gated_aux` applies."""

    def own_params(self, cfg: SAEConfig, d_in: int) -> Params:
        """The parameters this activation adds, initialised."""
        return {"b_enc": jnp.zeros((cfg.d_sae,), jnp.float32)}

    def own_param_names(self, cfg: SAEConfig) -> list[str]:
        return ["b_enc"] + (["threshold"] if self.has_threshold else [])

    def trainable(self, name: str) -> bool:
        """Whether the optimiser updates parameter `name` (else the activation sets it)."""
        return name != "threshold" or self.learns_threshold

    def pre_activations(self, params: Params, x: jax.Array) -> jax.Array:
        """[batch, d_sae] (x − b_dec) · W_enc + b_enc."""
        return kernels.encoder_matmul(x, params["b_dec"], encoder_weight(params),
                                      params["b_enc"])

    def activate(self, params: Params, x: jax.Array, pre_acts: jax.Array, cfg: SAEConfig, *,
                 train: bool, mesh: Mesh | None = None, k: jax.Array | None = None,
                 sparse: bool = False, sweep_axis: str | None = None) -> Codes:
        """The codes of a batch. `mesh`: the device mesh the step runs on; `k`: a traced k
        (sweeps over sae.k); `sparse`: a sparse path may be taken (False: the dense
        reference); `sweep_axis`: the vmap axis of a sweep's SAEs (None: one SAE), over which
        a `lax.cond` that skips work must decide (`kernels.any_member`)."""
        raise NotImplementedError

    def after_update(self, params: Params, codes: Codes, step: jax.Array,
                     cfg: SAEConfig) -> Params:
        """Parameters after an optimiser update (before: `params` already updated)."""
        return params

    # -- the SAELens format ---------------------------------------------------------------

    def export_cfg(self, cfg: SAEConfig) -> dict[str, Any]:
        """cfg.json keys beyond the common ones."""
        return {}

    def export_tensors(self, params: dict[str, Any]) -> dict[str, Any]:
        """Weights this activation adds to W_enc, W_dec, b_dec."""
        return {name: params[name] for name in ("b_enc", "threshold") if name in params}

    def tensor_shapes(self, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        """The weights a SAELens directory of this architecture holds besides the common ones."""
        return {"b_enc": (d_sae,), **({"threshold": (d_sae,)} if self.has_threshold else {})}

    def check_saelens_cfg(self, cfg_json: dict[str, Any], file: Any) -> None:
        """Refuses (ConfigError naming `file` and the key) a cfg.json of this architecture that
        lacks what it needs."""

    def config_from_saelens(self, cfg_json: dict[str, Any]) -> dict[str, Any]:
        """SAEConfig fields (beyond d_sae and activation) read from a SAELens cfg.json that
        `jaxsae.export.read_cfg` has checked."""
        return {}

    def saelens_loss(self, saelens: dict[str, Any]) -> list[dict[str, Any]]:
        """The loss terms to fine-tune an imported SAE with, from SAELens's training fields
        (`saelens`: cfg.json's top level and metadata.training_architecture_details)."""
        l1: dict[str, Any] = {"term": "l1", "coefficient": _number(saelens, "l1_coefficient")}
        if _number(saelens, "lp_norm") != 1.0:  # SAELens: the p-norm of each token's v
            l1.update(p=_number(saelens, "lp_norm"), norm=True)
        return [{"term": "mse"}, l1]

    def check(self, cfg: SAEConfig) -> None:
        """Refuses a config this activation cannot run (naming the key)."""


SAELENS_TRAINING_NUMBERS = ("l1_coefficient", "lp_norm", "l0_coefficient", "target_l0",
                            "jumprelu_bandwidth")
"""SAELens's training fields the activations read (`saelens_loss`, `config_from_saelens`):
`jaxsae.export.read_cfg` refuses a cfg.json where one is there and not a finite number."""


def is_finite_number(value: Any) -> bool:
    """A JSON number a float holds (an integer of 400 digits overflows float(): a review)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _number(fields: dict[str, Any], key: str, default: float = 1.0) -> float:
    """The SAELens training field `key` of `fields`; `default` where it is absent or null (not
    where it is something else: fault testing found NaN, "five" and true imported as the
    default without a word)."""
    value = fields.get(key)
    if value is None:
        return default
    if not is_finite_number(value):  # (read_cfg names the file; a cfg.json it did not read)
        raise ExportError(f"{key!r} must be a finite number, got {value!r}")
    return float(value)


_REGISTRY: dict[str, Activation] = {}


def refuse_other_definition(what: str, name: str, registered: Any, new: Any) -> None:
    """A name registered again is taken only by a new definition of the same function or
    class (same module and qualified name: a notebook cell run again, a module reloaded;
    fault testing: either had to restart the kernel), never by another one."""
    def origin(obj: Any) -> tuple[str, str]:
        return getattr(obj, "__module__", "?"), getattr(obj, "__qualname__", repr(obj))

    if origin(registered) != origin(new) or origin(new)[1] == "<lambda>":
        raise ValueError(f"{what} {name!r} is already registered (by "
                         f"{'.'.join(origin(registered))}); only a new definition of that one "
                         "replaces it")


def register(cls: type[Activation]) -> type[Activation]:
    """Registers an activation under `cls.name` (again: only a new definition of the same
    class, see `refuse_other_definition`)."""
    if cls.name in _REGISTRY:
        refuse_other_definition("activation", cls.name, type(_REGISTRY[cls.name]), cls)
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str, key: str = "sae.activation") -> Activation:
    if name not in _REGISTRY:
        raise ConfigError(f"{key}: must be one of {', '.join(_REGISTRY)}; got {name!r} (an "
                          "unknown activation)")
    return _REGISTRY[name]


def registered() -> list[str]:
    return list(_REGISTRY)


def architectures() -> list[str]:
    """The SAELens architectures jaxsae reads."""
    return list(dict.fromkeys(a.architecture for a in _REGISTRY.values()))


def for_architecture(architecture: str) -> Activation:
    """The activation a SAELens directory of `architecture` loads as."""
    for kind in _REGISTRY.values():
        if kind.architecture == architecture and kind.reads:
            return kind
    raise KeyError(architecture)


def starting_from(architecture: str) -> list[str]:
    """The activations a SAELens directory of `architecture` can start a run of."""
    return [name for name, kind in _REGISTRY.items() if kind.architecture == architecture]


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
