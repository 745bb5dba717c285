"""SynthSAEBench-compatible ground truth, sampled sparsely with JAX.

SynthSAEBench (SAELens's `sae_lens.synthetic`; arXiv 2602.14687) is the synthetic benchmark the
field reports SAE architectures on. This module draws from the same distribution as SAELens's
generator for the same configuration (implemented from its documentation and the paper), but
only where the data is non-zero, so that generating is cheap beside training:

- firing probabilities: Zipfian over the feature index, p_i = min + (max - min) ·
  (i^-e - N^-e) / (1 - N^-e) for i = 1..N (feature 0 the most frequent);
- a forest: `roots` trees whose nodes have `branching` children, `max_depth` levels below the
  roots, numbered breadth first (all roots, then all their children in order, ...); the other
  features are outside the hierarchy. A child fires only when its parent does; with
  `scale_children` its magnitude is multiplied by parent value / parent mean magnitude. An
  `exclusive_portion` of the parents have mutually exclusive children: of those that fire
  together, one chosen uniformly at random stays;
- compensation: a child's probability is multiplied by 1 / p_parent and, among exclusive
  siblings, by 1 + (sum of the other siblings' p) / p_parent (then clamped at 1), p_parent the
  parent's base rate. This raises children towards their base rates but does not reach them
  where the tree forbids it: exclusive siblings fire at most one at a time, so together no
  more often than their parent, and a parent below its own base rate is not made up for
  below it. The tiny preset, default settings (16,384 tokens, 2026-12-06): true L0 7.2
  against base rates summing to 13.1 — roots and features outside the hierarchy at their
  base rates (1.69 and 0.62 a token against 1.70 and 0.62), each level below at ~1.6 a token
  against 2.4, 3.9 and 4.5. SAELens's generator draws the same (tests/interop);
- correlated firing: a Gaussian copula with correlation F Fᵀ + diag(1 - ‖F_i‖²), F [N, rank]
  with N(0, scale²) entries (a row whose diagonal would fall below 0.01 is shrunk to
  ‖F_i‖² = 0.99); feature i fires when z_i > Φ⁻¹(1 - p_i);
- magnitudes: relu(mean_i + std_i · N(0, 1)), the means linear from `magnitude_start` (feature 0)
  to `magnitude_end`, the standard deviations folded normal |N(std_mean, std_std²)| per feature;
- the dictionary: Gaussian unit rows, orthogonalised by Adam on
  Σ_{i≠j} (d_i·d_j)² + N · Σ_i (‖d_i‖² - 1)² and renormalised; a bias of norm `bias` in a
  random direction; x = codes · D + bias.

The sampler conditions on the copula's shared factors ε [B, rank]: given ε, every feature fires
independently, with probability π_bi = Φ((F_i·ε_b - t_i) / s_i). Roots are drawn densely (few
features, high probabilities). Features outside the hierarchy (most of them, rarely firing) are
drawn by thinning a Poisson process: over groups of GROUP rows, q_gi = max over the group of π
bounds π, points fall in cell (row, feature) at rate μ = -log(1 - q), and each is kept with
probability -log(1 - π) / μ, so a cell holds a kept point with probability exactly π; cells are
de-duplicated by sorting. Children are drawn top-down, only under parents that fired (given ε
they are independent of the parent), with the mutual exclusion and scaling applied as they are
drawn. The work is proportional to the firings (plus the [B, features outside the hierarchy]
factor product that bounds them), not to B x N. Fixed capacities hold each stage's draws; in
the (vanishingly rare, ten standard deviations) case that one overflows, the whole batch is
drawn again from the next key, so no draw is ever truncated.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

from jaxsae.data.spec_checks import check_common as _check_common
from jaxsae.data.spec_checks import need as _need

GROUP = 16
"""Rows per group over which the Poisson thinning bounds the firing probabilities."""

BOUND_CHUNK_BYTES = 16 << 20
"""On the CPU the bound's factor product and group maximum run over chunks of rows whose
product is at most this large, never the whole [B, features] product at once: 33 -> 11 ms a
batch of 16,384 (quarter world), 129 -> 43 ms (full), the same values (2026-12-04, 2-core Intel
Xeon, jax 0.10.2). Accelerators take it in one piece."""

PRESETS: dict[str, dict[str, int]] = {
    "full": {"n_features": 16384, "d_in": 768, "roots": 128},
    "quarter": {"n_features": 4096, "d_in": 256, "roots": 32},
    "tiny": {"n_features": 1024, "d_in": 64, "roots": 8},
}
"""SynthSAEBench-16k (`full`) and smaller worlds of the same make (every other knob equal)."""

SAMPLER_VERSION = 2
"""Which tokens a seed gives: recorded in truth.json (as "sampler") and in a streamed run's
checkpoints; data of another version is refused where its true codes would be regenerated
(jaxsae.data.synthetic.load_truth), a streamed run of another version where it would resume.
1: to 2026-12-04 (one flat draw of uniforms, capacities 20 % over the mean). 2: each stage's
uniforms from its own key, so capacities no longer change a draw; capacities 5 % over."""


@dataclass(frozen=True)
class SynthSAEBenchSpec:
    """SynthSAEBench-compatible data: Zipfian, hierarchical, correlated, superposed features."""

    kind: ClassVar[str] = "synthsaebench"
    scale_knobs: ClassVar[tuple[str, ...]] = ("the magnitudes", "bias", "orthogonalize_lr")
    sampler: ClassVar[int] = SAMPLER_VERSION
    preset: Literal["full", "quarter", "tiny"] = "quarter"
    """full: SynthSAEBench-16k (16,384 features in 768 dims, 128 roots); quarter: 4096 in 256,
    32 roots; tiny: 1024 in 64, 8 roots. Sets n_features, d_in and roots unless given."""
    n_features: int | None = None
    """Number of true features."""
    d_in: int | None = None
    """Dimension of the activations."""
    roots: int | None = None
    """Trees of the hierarchy."""
    branching: int = 4
    """Children of every non-leaf node."""
    max_depth: int = 3
    """Levels below the roots (0: no hierarchy)."""
    exclusive_portion: float = 1.0
    """Share of the parents whose children are mutually exclusive."""
    compensate: bool = True
    """Raise children's probabilities towards their base rates (x 1 / the parent's base rate,
    and for exclusive siblings the share the exclusion takes); exclusive siblings still fire
    no more often together than their parent (see the module's docstring)."""
    scale_children: bool = True
    """A child's magnitude times parent value / parent mean magnitude (else gated only)."""
    zipf_exponent: float = 0.5
    """Firing probabilities fall off as rank^-exponent ..."""
    max_prob: float = 0.4
    """... from this (feature 0) ..."""
    min_prob: float = 5e-4
    """... to this (the last feature)."""
    correlation_rank: int = 25
    """Rank of the low-rank firing correlation (0: independent firing)."""
    correlation_scale: float = 0.1
    """Standard deviation of the correlation factor's entries (at most 1000; from about 10
    every feature's factor is at its cap)."""
    orthogonalize_steps: int = 100
    """Adam steps pushing the dictionary's rows apart (0: random unit rows)."""
    orthogonalize_lr: float = 3e-4
    """Learning rate of those steps."""
    magnitude_start: float = 5.0
    """Mean magnitude of feature 0; the means are linear in the index ..."""
    magnitude_end: float = 4.0
    """... to this for the last feature."""
    magnitude_std_mean: float = 0.5
    """Each feature's magnitude standard deviation is |N(this, magnitude_std_std²)|."""
    magnitude_std_std: float = 0.5
    """(see magnitude_std_mean)"""
    bias: float = 0.5
    """Norm of the bias added to every token (0: none)."""
    tokens: int = 1_048_576
    """Number of tokens to write."""
    seed: int = 0
    """Seed of the structure and the samples, in [0, 2^32)."""
    shard_tokens: int = 131072
    """Tokens per shard file."""
    dtype: str = "float32"
    """Stored dtype: float32 or float16."""

    def __post_init__(self):
        _need(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        _check_common(self)
        # (fault testing: the sampler's key, jax.random.key, keeps a seed's low 32 bits, so
        # seed 2^32 drew the samples of seed 0; refused rather than drawn otherwise, which
        # would change the tokens of data and streamed runs already made with such seeds)
        _need(self.seed < 2**32, "seed", "must be in [0, 2^32) for synthsaebench (its "
              "sampler's key holds 32 bits)")
        _need(self.n_features > 0, "n_features", "must be > 0")
        _need(self.roots >= 0, "roots", "must be >= 0")
        _need(self.branching >= 2, "branching", "must be >= 2")
        _need(self.max_depth >= 0, "max_depth", "must be >= 0")
        # (fault testing: 10,000 printed a number past Python's 4,300 digits, a traceback;
        # 100,000 hung summing the levels; past 64 levels of branching >= 2 no world fits)
        _need(self.max_depth <= 64, "max_depth", "must be <= 64 (a deeper tree of branching "
              ">= 2 needs more features than any world holds)")
        _need(self.tree_features <= self.n_features, "roots",
              f"{self.roots} trees of depth {self.max_depth} and branching {self.branching} "
              f"need {self.tree_features} features; n_features is {self.n_features}")
        _need(0 <= self.exclusive_portion <= 1, "exclusive_portion", "must be in [0, 1]")
        _need(self.zipf_exponent > 0, "zipf_exponent", "must be > 0")
        _need(0 < self.max_prob <= 1, "max_prob", "must be in (0, 1]")
        _need(0 < self.min_prob < self.max_prob, "min_prob",
              f"must be > 0 and below max_prob ({self.max_prob})")
        _need(0 <= self.correlation_rank <= self.n_features, "correlation_rank",
              f"must be in [0, n_features ({self.n_features})]")
        # (fault testing: 1e160 overflowed the factor's norms to a factor of zeros, firing
        # independently without a word; 1e308 a traceback. From ~10 every row is at the cap)
        _need(0 <= self.correlation_scale <= 1000, "correlation_scale",
              "must be in [0, 1000] (from about 10 every feature's factor is at its cap, "
              "‖F_i‖² = 0.99)")
        _need(self.orthogonalize_steps >= 0, "orthogonalize_steps", "must be >= 0")
        _need(self.orthogonalize_lr > 0, "orthogonalize_lr", "must be > 0")
        _need(self.magnitude_start > 0 and self.magnitude_end > 0, "magnitude_start",
              "the mean magnitudes (start and end) must be > 0")
        _need(self.magnitude_std_mean >= 0, "magnitude_std_mean", "must be >= 0")
        _need(self.magnitude_std_std >= 0, "magnitude_std_std", "must be >= 0 (0: every "
              "feature's spread is magnitude_std_mean)")
        _need(self.bias >= 0, "bias", "must be >= 0")

    @property
    def tree_features(self) -> int:
        return self.roots * sum(self.branching**level for level in range(self.max_depth + 1))

    def truth(self) -> dict[str, np.ndarray]:
        return build_truth(self)

    def structure(self) -> dict[str, Any]:
        return {"sampler": self.sampler}

    def block(self, truth: Mapping[str, np.ndarray], block: int, n: int, *, block_tokens: int,
              codes: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens of block `block` (the first n of the block_tokens drawn from the block's
        key): x [n, d_in] and, with `codes`, the true codes [n, n_features]."""
        sampler = _sampler(self, truth)
        key = jax.random.fold_in(jax.random.key(self.seed), block)
        x, dense = sampler.sample(key, block_tokens, codes=codes)
        x = np.asarray(x[:n])
        return x, (np.asarray(dense[:n]) if codes else None)


# ---------------------------------------------------------------------------------------------
# The structure


def zipf_probabilities(n: int, exponent: float, max_prob: float, min_prob: float) -> np.ndarray:
    """SynthSAEBench's firing probabilities: rank^-exponent rescaled onto [min_prob, max_prob]."""
    if n == 1:
        return np.array([max_prob])
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return min_prob + (max_prob - min_prob) * (w - w[-1]) / (w[0] - w[-1])


def tree(roots: int, branching: int, max_depth: int, n_features: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """parent [n_features] (-1: a root or outside the hierarchy) and level [n_features] (-1:
    outside), breadth-first numbering, children of one parent consecutive."""
    parent = np.full(n_features, -1, np.int64)
    level = np.full(n_features, -1, np.int64)
    start = previous = 0
    for depth in range(max_depth + 1):
        size = roots * branching**depth
        level[start:start + size] = depth
        if depth:
            parent[start:start + size] = previous + np.arange(size) // branching
        previous, start = start, start + size
    return parent, level


def compensated(base: np.ndarray, parent: np.ndarray, exclusive: np.ndarray,
                branching: int) -> np.ndarray:
    """Children's probabilities raised for the hierarchy: x 1/p_parent, and among exclusive
    siblings x (1 + sum of the other siblings' p / p_parent); clamped at 1."""
    out = base.astype(np.float64).copy()
    children = np.flatnonzero(parent >= 0)
    if children.size == 0:
        return out
    p = parent[children]
    factor = 1.0 / base[p]
    sibling_sum = base[children].reshape(-1, branching).sum(axis=1).repeat(branching)
    factor *= np.where(exclusive[p], 1.0 + (sibling_sum - base[children]) / base[p], 1.0)
    out[children] = np.minimum(base[children] * factor, 1.0)
    return out


def low_rank_factor(rng: np.random.Generator, n: int, rank: int, scale: float) -> np.ndarray:
    """F [n, rank] with N(0, scale²) entries; rows with ‖F_i‖² > 0.99 shrunk to 0.99 (so the
    copula's own variance 1 - ‖F_i‖² stays >= 0.01)."""
    factor = rng.standard_normal((n, rank)) * scale
    sq = np.sum(factor**2, axis=1)
    over = sq > 0.99
    factor[over] *= np.sqrt(0.99 / sq[over])[:, None]
    return factor


def orthogonalize(rows: np.ndarray, steps: int, lr: float) -> np.ndarray:
    """Adam on Σ_{i≠j} (d_i·d_j)² + n Σ_i (‖d_i‖² - 1)², then unit rows. The pair term is
    ‖DᵀD‖²_F - Σ_i ‖d_i‖⁴, so a step costs n·d² instead of n²·d."""
    import optax

    n = rows.shape[0]

    def loss(d):
        sq = jnp.sum(d * d, axis=1)
        gram = jnp.matmul(d.T, d, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(gram * gram) - jnp.sum(sq * sq) + n * jnp.sum((sq - 1.0) ** 2)

    opt = optax.adam(lr)

    @jax.jit
    def run(d):
        def step(carry, _):
            d, state = carry
            updates, state = opt.update(jax.grad(loss)(d), state)
            return (optax.apply_updates(d, updates), state), None

        (d, _), _ = jax.lax.scan(step, (d, opt.init(d)), None, length=steps)
        return d

    d = np.asarray(run(jnp.asarray(rows, jnp.float32)), np.float64)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-8)


def build_truth(spec: SynthSAEBenchSpec) -> dict[str, np.ndarray]:
    """The fixed structure of `spec`, drawn from its seed."""
    n = spec.n_features
    rng = [np.random.default_rng([spec.seed, 100 + i]) for i in range(5)]
    base = zipf_probabilities(n, spec.zipf_exponent, spec.max_prob, spec.min_prob)
    parent, level = tree(spec.roots, spec.branching, spec.max_depth, n)
    exclusive = np.zeros(n, bool)
    parents = np.flatnonzero((level >= 0) & (level < spec.max_depth))
    chosen = rng[0].choice(parents.size, int(parents.size * spec.exclusive_portion),
                           replace=False)
    exclusive[parents[chosen]] = True
    prob = compensated(base, parent, exclusive, spec.branching) if spec.compensate else base
    factor = (low_rank_factor(rng[1], n, spec.correlation_rank, spec.correlation_scale)
              if spec.correlation_rank else np.zeros((n, 0)))
    std = np.abs(spec.magnitude_std_mean
                 + spec.magnitude_std_std * rng[2].standard_normal(n))
    directions = rng[3].standard_normal((n, spec.d_in))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    if spec.orthogonalize_steps:
        directions = orthogonalize(directions, spec.orthogonalize_steps, spec.orthogonalize_lr)
    bias = rng[4].standard_normal(spec.d_in)
    bias *= spec.bias / np.linalg.norm(bias)
    return {
        "directions": directions.astype(np.float32),
        "bias": bias.astype(np.float32),
        "base_prob": base.astype(np.float32),
        "firing_prob": prob.astype(np.float32),
        "magnitude_mean": np.linspace(spec.magnitude_start, spec.magnitude_end,
                                      n).astype(np.float32),
        "magnitude_std": std.astype(np.float32),
        "factor": factor.astype(np.float32),
        "parent": parent.astype(np.int32),
        "level": level.astype(np.int32),
        "exclusive": exclusive.astype(np.int32),
    }


# ---------------------------------------------------------------------------------------------
# The sampler


def _capacity(expected: float) -> int:
    """Room for a count with this mean: ten standard deviations (and 5 %) above it."""
    return math.ceil(1.05 * expected + 10 * math.sqrt(max(expected, 1.0)) + 64)


class Sampler:
    """Draws tokens from a SynthSAEBench world given its arrays (`build_truth`'s, or the same
    read from SAELens's `SyntheticModel`): `sample(key, B)` -> x [B, d] (and the codes)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], *, roots: int, branching: int,
                 max_depth: int, scale_children: bool):
        a = {k: np.asarray(v) for k, v in arrays.items()}
        self.n = a["directions"].shape[0]
        self.roots, self.branching, self.max_depth = roots, branching, max_depth
        self.scale_children = scale_children
        self.tree_features = roots * sum(branching**lv for lv in range(max_depth + 1))
        factor = a["factor"].astype(np.float64)
        if factor.shape[1] == 0:  # independent firing: one zero column draws the same (F·ε is
            # 0 either way), where a zero-width product made XLA constant-fold [rows, features]
            # zeros for seconds, with error-level "slow operation" lines (fault testing)
            factor = np.zeros((self.n, 1))
        prob = a["firing_prob"].astype(np.float64)
        # the copula: z_i = F_i·ε + s_i·η_i fires above t_i = Φ⁻¹(1 - p_i)
        self.arrays = {
            "factor": jnp.asarray(factor, jnp.float32),
            "s": jnp.asarray(np.sqrt(np.maximum(1.0 - np.sum(factor**2, axis=1), 1e-12)),
                             jnp.float32),
            "t": jnp.asarray(ndtri(1.0 - prob), jnp.float32),
            "mean": jnp.asarray(a["magnitude_mean"], jnp.float32),
            "std": jnp.asarray(a["magnitude_std"], jnp.float32),
            "directions": jnp.asarray(a["directions"], jnp.float32),
            "bias": jnp.asarray(a["bias"], jnp.float32),
            "exclusive": jnp.asarray(a["exclusive"] > 0),
        }
        self.any_exclusive = bool(np.any(a["exclusive"]))
        self._jitted: dict[tuple[int, bool], Any] = {}

    # -- capacities -----------------------------------------------------------------------

    def _level_starts(self) -> list[int]:
        starts, start = [], 0
        for depth in range(self.max_depth + 1):
            starts.append(start)
            start += self.roots * self.branching**depth
        return starts

    def capacities(self, batch: int) -> dict[str, Any]:
        """Static sizes of each stage's arrays for a batch of `batch` rows: ten standard
        deviations and 20 % above each stage's expected count, computed exactly given a pilot
        draw of the shared factors ε (given ε every feature fires independently)."""
        pilot = min(_padded(batch), 4096)
        scale = batch / pilot
        eps = jax.random.normal(jax.random.key(12345), (pilot, self.arrays["factor"].shape[1]))
        expected = jax.tree.map(float, _expected_counts(self.arrays, eps, self._structure()))
        caps = jax.tree.map(lambda n: _capacity(scale * n), expected)
        # a row's codes below the roots: generous room (a row past it is still decoded)
        caps["slots"] = math.ceil(3 * expected["codes"] / pilot + 32)
        return caps

    def _structure(self) -> tuple:
        return (self.roots, self.branching, self.max_depth, self.tree_features, self.n,
                tuple(self._level_starts()))

    @staticmethod
    def _bound(eps, arrays, free) -> jax.Array:
        """μ [groups, free features]: the Poisson rates whose cells bound π over each group."""
        high = _group_max(eps, arrays["factor"][free])
        q = jax.scipy.special.ndtr((high - arrays["t"][free]) / arrays["s"][free])
        return -jnp.log1p(-jnp.minimum(q, 1 - 1e-7))

    # -- drawing --------------------------------------------------------------------------

    def sample(self, key: jax.Array, batch: int, *, codes: bool = False):
        """x [batch, d] (float32, on the device) and, with `codes`, the true codes
        [batch, n_features] (else None). Draws from fold_in(key, 0), 1, ... until no stage
        overflowed its capacity (the first, in practice): a draw is never truncated."""
        fn = self._jitted.get((batch, codes))
        if fn is None:
            caps = self.capacities(_padded(batch))
            fn = jax.jit(functools.partial(self._once, batch=batch, caps=caps, codes=codes))
            self._jitted[(batch, codes)] = fn
        for attempt in itertools.count():
            x, dense, overflowed = fn(self.arrays, jax.random.fold_in(key, attempt))
            if not bool(overflowed):  # (a retry loop in the program cost 5 % a draw)
                return x, dense

    def _once(self, arrays, key, *, batch, caps, codes):
        """One draw, decoded: x, the codes (or None) and whether a stage overflowed."""
        rows = _padded(batch)
        (root_val, (row, feat, val), runs), used = self._draw(arrays, key, rows, caps)
        d = arrays["directions"]
        x = _decode(d, row, feat, val, runs, root_val @ d[:self.roots] + arrays["bias"],
                    caps["slots"])
        dense = None
        if codes:
            dense = jnp.zeros((rows, self.n), jnp.float32).at[row, feat].add(val)
            dense = dense.at[:, :self.roots].set(root_val)[:batch]
        return x[:batch], dense, _overflows(used, caps)

    def _draw(self, arrays, key, rows, caps):
        """One draw: the roots' codes [rows, roots], the others as a compact (row, feature,
        value) list (zero values where unused), and how many entries each stage needed (more
        than its capacity: the draw is incomplete)."""
        keys = (jax.random.fold_in(key, i) for i in itertools.count())
        eps = jax.random.normal(next(keys), (rows, arrays["factor"].shape[1]))
        parts, used = [], {"parents": []}
        r = self.roots
        # every uniform of the draw in one call (one generator in the compiled program)
        shapes = [(rows, r)] if r else []
        if self.n > self.tree_features:
            shapes += [(caps["points"],)] * 3
        if r:
            for cap in caps["parents"]:
                shapes += [(cap, self.branching), (cap,)]
        uniforms = _uniforms(next(keys), shapes)

        # roots: dense (few features, the most frequent ones)
        root_val = jnp.zeros((rows, 0))
        if r:
            y = eps @ arrays["factor"][:r].T
            pi = jax.scipy.special.ndtr((y - arrays["t"][:r]) / arrays["s"][:r])
            u = next(uniforms)
            root_val = _fired_magnitudes(u, pi, arrays["mean"][:r], arrays["std"][:r])

        # outside the hierarchy: Poisson thinning
        if self.n > self.tree_features:
            part, used["points"], used["kept"] = self._free(arrays, keys, uniforms, eps, caps)
            parts.append(part)

        # the hierarchy, top-down
        if r and self.max_depth:
            p_row, p_feat, p_val, count = _compact(
                caps["parents"][0], root_val.reshape(-1),
                jnp.repeat(jnp.arange(rows), r), jnp.tile(jnp.arange(r), rows))
            used["parents"].append(count)
            starts = self._level_starts()
            for depth in range(self.max_depth):
                c_row, c_feat, c_val = self._children(arrays, uniforms, eps, p_row, p_feat,
                                                      p_val, starts, depth)
                parts.append((c_row.reshape(-1), c_feat.reshape(-1), c_val.reshape(-1)))
                if depth + 1 < self.max_depth:
                    p_row, p_feat, p_val, count = _compact(
                        caps["parents"][depth + 1], c_val.reshape(-1), c_row.reshape(-1),
                        c_feat.reshape(-1))
                    used["parents"].append(count)
        if not parts:
            return (root_val, (jnp.zeros(1, jnp.int32),) * 2 + (jnp.zeros(1),),
                    jnp.zeros(1, jnp.int32)), used
        row = jnp.concatenate([p[0] for p in parts]).astype(jnp.int32)
        feat = jnp.concatenate([p[1] for p in parts]).astype(jnp.int32)
        val = jnp.concatenate([p[2] for p in parts])
        # each part lists its codes by row; compacted, they are runs of these lengths
        runs = jnp.stack([jnp.sum(p[2] != 0) for p in parts]).astype(jnp.int32)
        row, feat, val, used["codes"] = _compact(caps["codes"], val, row, feat)
        return (root_val, (row, feat, val), runs), used

    def _free(self, arrays, keys, uniforms, eps, caps):
        """Features outside the hierarchy, by thinning a Poisson process (module docstring)."""
        lo = self.tree_features
        nf = self.n - lo
        mu = self._bound(eps, arrays, slice(lo, self.n))  # [groups, nf]
        cell = GROUP * mu  # a cell: one feature over the group's rows
        group_mass = jnp.sum(cell, axis=1)
        # each group's number of points, then each point's group (integers: exact), its
        # feature (a uniform over the group's cells) and its row (uniform in the group)
        per_group = jax.random.poisson(next(keys), group_mass)
        ends = jnp.cumsum(per_group)
        n_points = ends[-1]
        cap = caps["points"]
        g = jnp.minimum(jnp.searchsorted(ends, jnp.arange(cap), side="right"), mu.shape[0] - 1)
        within = next(uniforms) * group_mass[g]
        i = _search_rows(jnp.cumsum(cell, axis=1), g, within)
        b = g * GROUP + jnp.minimum(jnp.floor(next(uniforms) * GROUP), GROUP - 1).astype(
            jnp.int32)
        y = _row_dots(eps, b, arrays["factor"], lo + i)
        pi = jax.scipy.special.ndtr((y - arrays["t"][lo + i]) / arrays["s"][lo + i])
        keep = -jnp.log1p(-jnp.minimum(pi, 1 - 1e-7)) / jnp.maximum(mu[g, i], 1e-30)
        v = next(uniforms)
        # the kept points, then their magnitudes (v / keep: a uniform given v < keep)
        kept_at = (v < keep) & (jnp.arange(cap) < n_points)
        cells, i, ratio, kept = _compact(
            caps["kept"], jnp.where(kept_at, jnp.maximum(v / keep, 1e-30), 0.0), b * nf + i, i)
        mag = _magnitudes(ratio, arrays["mean"][lo + i], arrays["std"][lo + i])
        # several kept points in one cell are one firing: sort the cells, keep the first
        big = jnp.iinfo(jnp.int32).max
        cells = jnp.where(mag > 0, cells, big)
        cells, mag = jax.lax.sort((cells, mag), num_keys=1)
        first = (cells != big) & jnp.concatenate([jnp.array([True]), cells[1:] != cells[:-1]])
        return ((jnp.where(first, cells // nf, 0), jnp.where(first, cells % nf + lo, 0),
                 jnp.where(first, mag, 0.0)), n_points, kept)

    def _children(self, arrays, uniforms, eps, p_row, p_feat, p_val, starts, depth):
        """Children of the parents that fired at `depth` (rows p_row, features p_feat, values
        p_val; zero values are padding): [parents, branching] rows, features, values."""
        b = self.branching
        local = p_feat - starts[depth]  # the parent's place in its level
        c_feat = starts[depth + 1] + local[:, None] * b + jnp.arange(b)[None, :]
        lo, hi = starts[depth + 1], starts[depth + 1] + (starts[depth + 1] - starts[depth]) * b

        def siblings(name):  # [parents, b(, ...)]: one gather of each parent's b children
            section = arrays[name][lo:hi]
            return section.reshape(starts[depth + 1] - starts[depth], b,
                                   *section.shape[1:])[local]

        y = jnp.einsum("pr,pbr->pb", eps[p_row], siblings("factor"))
        pi = jax.scipy.special.ndtr((y - siblings("t")) / siblings("s"))
        u = next(uniforms)
        mag = _fired_magnitudes(u, pi, siblings("mean"), siblings("std"))
        mag = jnp.where(p_val[:, None] > 0, mag, 0.0)
        on = mag > 0
        u_pick = next(uniforms)
        if self.any_exclusive:  # one of the children that fire, uniformly, stays
            count = jnp.sum(on, axis=1)
            pick = jnp.floor(u_pick * count)
            order = jnp.cumsum(on, axis=1) - 1
            exclusive = arrays["exclusive"][p_feat][:, None]
            on = on & (~exclusive | (order == pick[:, None]))
        scale = (p_val / arrays["mean"][p_feat])[:, None] if self.scale_children else 1.0
        val = jnp.where(on, mag * scale, 0.0)
        return jnp.broadcast_to(p_row[:, None], c_feat.shape), c_feat, val


def _group_max(eps: jax.Array, factor: jax.Array) -> jax.Array:
    """max over each group of GROUP rows of eps @ factor.T: [rows / GROUP, features]; on the
    CPU chunk by chunk (BOUND_CHUNK_BYTES), padding eps to whole chunks."""
    rows, n = eps.shape[0], factor.shape[0]

    def one(e):
        return (e @ factor.T).reshape(-1, GROUP, n).max(axis=1)

    chunk = max(GROUP, 2 ** int(math.log2(max(BOUND_CHUNK_BYTES // (4 * max(n, 1)), 1))))
    if jax.default_backend() != "cpu" or chunk >= rows:
        return one(eps)
    chunks = -(-rows // chunk)
    padded = jnp.pad(eps, ((0, chunks * chunk - rows), (0, 0)))
    high = jax.lax.map(one, padded.reshape(chunks, chunk, eps.shape[1]))
    return high.reshape(-1, n)[:rows // GROUP]


def _decode(d, row, feat, val, runs, x, slots):
    """x + Σ val·d[feat] by row, for codes listed as runs (of lengths `runs`, then zero
    values) each ordered by row. Each code's slot (its place among its row's codes) follows
    from the runs; the codes are laid out [slots, rows] and the rows decoded a slot at a
    time, a gather of dictionary rows fused with the multiply-add (XLA-CPU's scatter-add of
    the [codes, d] terms took 2-4x longer, and materialised them). Codes past `slots` in a
    row, if any, are added by that scatter-add."""
    n, rows = row.shape[0], x.shape[0]
    k = runs.shape[0]
    at = jnp.arange(n)
    ends = jnp.cumsum(runs)
    run = jnp.sum(at[:, None] >= ends[None, :], axis=1)  # k: padding
    count = jnp.zeros((k + 1, rows), jnp.int32).at[run, row].add(1)[:k]
    first = jnp.cumsum(count, axis=1) - count  # where each row starts in its run
    before = jnp.cumsum(count, axis=0) - count  # the row's codes in earlier runs
    r = jnp.minimum(run, k - 1)
    slot = before[r, row] + at - (ends - runs)[r] - first[r, row]
    slot = jnp.where(run < k, slot, slots)  # padding: dropped
    grid_feat = jnp.zeros((slots, rows), jnp.int32).at[slot, row].set(feat, mode="drop")
    grid_val = jnp.zeros((slots, rows), val.dtype).at[slot, row].set(val, mode="drop")
    most = jnp.max(jnp.sum(count, axis=0))

    def one(s, x):
        return x + grid_val[s][:, None] * d[grid_feat[s]]

    x = jax.lax.fori_loop(0, jnp.minimum(most, slots), one, x)

    def spill(x):
        over = jnp.where((slot >= slots) & (run < k), val, 0.0)
        return x + jax.ops.segment_sum(over[:, None] * d[feat], row, num_segments=rows)

    return jax.lax.cond(most > slots, spill, lambda x: x, x)


def _row_dots(a: jax.Array, i: jax.Array, b: jax.Array, j: jax.Array) -> jax.Array:
    """a[i] · b[j] for index arrays i, j: a sum of gathered columns, one fused pass (gathering
    the [n, rank] rows first materialised them: two thirds of the time)."""
    at, bt = a.T, b.T
    return sum(at[r][i] * bt[r][j] for r in range(a.shape[1]))


def _fired_magnitudes(u, prob, mean, std):
    """relu(mean + std·N(0, 1)) where u < prob, else 0. Given u < prob, u / prob is uniform
    and independent of the firing, so one uniform draws both (its normal by Φ⁻¹)."""
    ratio = jnp.maximum(u / jnp.maximum(prob, 1e-30), 1e-30)  # (u = 0 fires too)
    return jnp.where(u < prob, _magnitudes(ratio, mean, std), 0.0)


def _magnitudes(ratio, mean, std):
    """relu(mean + std·Φ⁻¹(ratio)) for a uniform ratio in (0, 1); 0 where ratio is 0."""
    z = jax.scipy.special.ndtri(jnp.clip(ratio, 1e-7, 1 - 1e-7))
    return jnp.where(ratio > 0, jnp.maximum(mean + std * z, 0.0), 0.0)


def _uniforms(key, shapes):
    """Uniforms [0, 1) of each shape in turn, the i-th from fold_in(key, i). With JAX's
    partitionable threefry (its default) an entry depends only on its key and its place in
    the row-major order, so the stages' draws do not depend on their capacities (tested)."""
    for i, shape in enumerate(shapes):
        yield jax.random.uniform(jax.random.fold_in(key, i), shape)


def _compact(size: int, values: jax.Array, *others: jax.Array):
    """The entries with non-zero values, the first `size` of them (zero values after): the
    same entries of each of `others`, then the values, then how many there were."""
    on = values != 0
    count = jnp.sum(on)
    (idx,) = jnp.nonzero(on, size=size, fill_value=0)
    valid = jnp.arange(size) < count
    return (*(o[idx] for o in others), jnp.where(valid, values[idx], 0), count)


def _overflows(used, caps) -> jax.Array:
    """Whether any stage needed more entries than its capacity."""
    flat_used, flat_caps = jax.tree.leaves(used), jax.tree.leaves(
        {k: caps[k] for k in used})
    return jnp.any(jnp.stack([u > c for u, c in zip(flat_used, flat_caps, strict=True)]))


@functools.partial(jax.jit, static_argnums=2)
def _expected_counts(arrays, eps, structure) -> dict[str, Any]:
    """Expected entries of each stage of `Sampler._draw` for the rows of `eps`: the Poisson
    points and kept points outside the hierarchy, the parents that fire at each level (an
    upper bound: each exclusive group's children share min(1, Σπ) firings), the codes below
    the roots."""
    roots, branching, max_depth, tree_features, n, starts = structure
    out: dict[str, Any] = {"parents": []}

    def prob(sl):
        y = eps @ arrays["factor"][sl].T
        return jax.scipy.special.ndtr((y - arrays["t"][sl]) / arrays["s"][sl])

    codes = 0.0
    if n > tree_features:
        free = slice(tree_features, n)
        out["points"] = GROUP * jnp.sum(Sampler._bound(eps, arrays, free))
        kept = -jnp.log1p(-jnp.minimum(prob(free), 1 - 1e-7))
        out["kept"] = jnp.sum(kept)
        codes = jnp.sum(prob(free))
    if roots and max_depth:
        active = prob(slice(0, roots))  # [rows, parents at this level]
        for depth in range(max_depth):
            out["parents"].append(jnp.sum(active))
            lo = starts[depth + 1]
            child = prob(slice(lo, lo + active.shape[1] * branching))
            child = child.reshape(child.shape[0], -1, branching)
            total = jnp.sum(child, axis=2, keepdims=True)
            exclusive = arrays["exclusive"][starts[depth]:starts[depth] + active.shape[1]]
            share = jnp.where(exclusive[None, :, None],
                              jnp.minimum(total, 1.0) / jnp.maximum(total, 1e-12), 1.0)
            active = (active[:, :, None] * child * share).reshape(child.shape[0], -1)
            codes = codes + jnp.sum(active)
    out["codes"] = codes
    return out


def _padded(batch: int) -> int:
    return -(-batch // GROUP) * GROUP


def _search_rows(cum: jax.Array, row: jax.Array, value: jax.Array) -> jax.Array:
    """For each query, the first column j of cum[row] with cum[row, j] > value (binary search
    over one row of an [rows, n] array of non-decreasing rows)."""
    n = cum.shape[1]
    flat = cum.reshape(-1)
    lo = jnp.zeros_like(row)
    hi = jnp.full_like(row, n - 1)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        right = flat[row * n + mid] <= value
        return jnp.where(right, mid + 1, lo), jnp.where(right, hi, mid)

    lo, _ = jax.lax.fori_loop(0, max(1, math.ceil(math.log2(max(n, 2)))) + 1, step, (lo, hi))
    return jnp.minimum(lo, n - 1)


_SAMPLERS: dict[SynthSAEBenchSpec, Sampler] = {}


def _sampler(spec: SynthSAEBenchSpec, truth: Mapping[str, np.ndarray]) -> Sampler:
    if spec not in _SAMPLERS:
        _SAMPLERS.clear()  # one world at a time: a sampler holds its arrays on the device
        _SAMPLERS[spec] = Sampler(truth, roots=spec.roots, branching=spec.branching,
                                  max_depth=spec.max_depth, scale_children=spec.scale_children)
    return _SAMPLERS[spec]
