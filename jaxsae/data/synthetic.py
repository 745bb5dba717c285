"""Ground-truth generators: activations built from known feature directions, written as shards.

Every generator is a frozen spec dataclass (its fields are the `jaxsae synth KIND` flags and the
keys of `data.generate` in a config) with two methods:

  truth()             the fixed structure, drawn from the seed: `directions [n_features, d_in]`
                      plus whatever else describes it (firing probabilities, parents, circles)
  codes(truth, rng, n)  [n, n_features] true feature activations of n tokens

and the activations are x = codes @ directions (a spec with a `block(truth, block, n)` method,
`synthsaebench`, draws its tokens and codes itself, sparsely, in JAX). The `transcoder`
generator writes pairs: x = codes @ input_directions into the directory, and the targets
y = codes @ directions (+ a dense linear part, what a skip transcoder's bypass learns) into
its `target/` subdirectory, so the truth's `directions` are always what a decoder should
learn. Tokens are drawn in blocks of BLOCK_TOKENS from `default_rng([seed, 1, block])`, so
the true codes of any token range can be regenerated (`true_codes`) instead of being stored.
A generated directory holds the shards, plus `truth.safetensors` (the truth() arrays) and
`truth.json` (the kind, the spec, the block size, and the digest of truth.safetensors, which
`load_truth` checks: a damaged or edited truth is refused naming the file, not met later as
a traceback or as "the data was changed").
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.special import ndtri

from jaxsae import outputs, tensorfile
from jaxsae.data.shards import TARGET_DIR, ShardWriter
from jaxsae.data.spec_checks import check_common as _check_common
from jaxsae.data.spec_checks import need as _need
from jaxsae.data.spec_checks import size_text
from jaxsae.data.synthsaebench import SynthSAEBenchSpec
from jaxsae.errors import ConfigError, DataError
from jaxsae.progress import Progress

TRUTH_TENSORS = "truth.safetensors"
TRUTH_DIGEST = "tensors_digest"
"""truth.json's record of truth.safetensors (`outputs.file_digest`)."""
TRUTH_JSON = "truth.json"
BLOCK_TOKENS = 16384


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _orthonormal_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, n)))
    return q.T


# ---------------------------------------------------------------------------------------------
# superposition


@dataclass(frozen=True)
class SuperpositionSpec:
    """N features superposed in d dims, Zipf-like firing, optional correlated firing."""

    kind: ClassVar[str] = "superposition"
    # what to lower when the settings draw non-finite tokens (`block_rows`; no docstring:
    # the --help machinery would take it for a flag's)
    scale_knobs: ClassVar[tuple[str, ...]] = ("the magnitudes",)
    n_features: int = 512
    """Number of true features (may exceed d_in: superposition)."""
    d_in: int = 128
    """Dimension of the activations."""
    tokens: int = 1_048_576
    """Number of tokens to write."""
    mean_l0: float = 4.0
    """Expected number of active features per token (of the roots, with a transcoder's
    children; a magnitude_std comparable to the magnitudes lowers it: see there)."""
    zipf_exponent: float = 0.5
    """Firing probabilities fall off as rank^-exponent (0: all equal)."""
    magnitude_mean: float = 1.0
    """Mean magnitude of an active feature (the median over features, with magnitude_spread)."""
    magnitude_std: float = 0.1
    """Standard deviation of the magnitude, clipped at 0 (a feature drawn at 0 or below does
    not fire: a std comparable to the mean lowers the rates, truth's firing_prob and mean_l0
    being those before the clip); scaled with each feature's mean when magnitude_spread > 0."""
    magnitude_spread: float = 0.0
    """Per-feature mean magnitudes: magnitude_mean · exp(spread · N(0, 1)) (0: all equal)."""
    correlation_rank: int = 0
    """Firing correlated through this many shared latent factors (0: independent)."""
    correlation: float = 0.0
    """Share of each feature's firing propensity that comes from the shared factors, in [0, 1)."""
    seed: int = 0
    """Seed of the directions, probabilities and samples."""
    shard_tokens: int = 131072
    """Tokens per shard file."""
    dtype: str = "float32"
    """Stored dtype: float32 or float16."""

    def __post_init__(self):
        _check_common(self)
        _need(self.n_features > 0, "n_features", "must be > 0")
        _need(0 < self.mean_l0 <= self.n_features, "mean_l0", "must be in (0, n_features]")
        _need(self.zipf_exponent >= 0, "zipf_exponent", "must be >= 0")
        _need(self.magnitude_mean > 0, "magnitude_mean", "must be > 0")
        _need(self.magnitude_std >= 0, "magnitude_std", "must be >= 0")
        _need(self.magnitude_spread >= 0, "magnitude_spread", "must be >= 0")
        _need(self.correlation_rank >= 0, "correlation_rank", "must be >= 0")
        _need(0 <= self.correlation < 1, "correlation", "must be in [0, 1)")
        _need((self.correlation > 0) == (self.correlation_rank > 0), "correlation",
              "set correlation_rank and correlation together (both > 0) or neither")

    def truth(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0])
        directions = _unit_rows(rng, self.n_features, self.d_in).astype(np.float32)
        probs = rng.permutation(zipf_probabilities(self.n_features, self.mean_l0,
                                                   self.zipf_exponent))
        extra = np.random.default_rng([self.seed, 2])
        # (magnitudes beyond float32 become inf here: the tokens they draw are refused, in one
        # line, where they are drawn; fault testing found numpy's warning printed first, for
        # the cast and for a magnitude_spread whose exp overflows)
        with np.errstate(over="ignore"):
            means = self.magnitude_mean * np.exp(
                self.magnitude_spread * extra.standard_normal(self.n_features))
        loadings = extra.standard_normal((self.correlation_rank, self.n_features))
        loadings /= np.maximum(np.linalg.norm(loadings, axis=0, keepdims=True), 1e-12)
        with np.errstate(over="ignore"):
            means32 = means.astype(np.float32)
            stds32 = (means * (self.magnitude_std / self.magnitude_mean)).astype(np.float32)
        return {"directions": directions,
                "firing_prob": probs.astype(np.float32),
                "magnitude_mean": means32,
                "magnitude_std": stds32,
                "factor_loadings": loadings.astype(np.float32)}

    def codes(self, truth: Mapping[str, np.ndarray], rng: np.random.Generator,
              n: int) -> np.ndarray:
        probs = truth["firing_prob"]
        if self.correlation_rank:
            # A Gaussian copula: each feature's propensity is N(0, 1), partly shared through
            # the factors; it fires below its p-quantile, so P(fire) stays p.
            shared = rng.standard_normal((n, self.correlation_rank)) @ truth["factor_loadings"]
            own = rng.standard_normal((n, self.n_features))
            z = np.sqrt(self.correlation) * shared + np.sqrt(1 - self.correlation) * own
            active = z < ndtri(np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12))
        else:
            active = rng.random((n, self.n_features), dtype=np.float32) < probs
        mags = rng.normal(truth["magnitude_mean"], truth["magnitude_std"], (n, self.n_features))
        return (active * np.maximum(mags, 0.0)).astype(np.float32)

    def structure(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class TranscoderSpec(SuperpositionSpec):
    """Pairs for transcoders: one sparse code written through an input and an output dictionary."""

    kind: ClassVar[str] = "transcoder"
    scale_knobs: ClassVar[tuple[str, ...]] = ("the magnitudes", "skip")
    d_out: int = 128
    """Dimension of the targets (written to the `target/` subdirectory)."""
    skip: float = 0.0
    """Scale of a dense linear part of the targets, skip · x @ S (S [d_in, d_out] random, with
    unit-variance entries over sqrt(d_in)): what a skip transcoder's bypass learns (0: none)."""
    children: int = 0
    """A hierarchy: children per feature, each firing only with its parent and at most one at
    a time, at the parent's magnitudes (0: none; the features are then the n_features roots
    and n_features x children children, numbered after the roots)."""
    child_prob: float = 0.2
    """With children: P(a given child fires | its parent fires)."""

    @property
    def all_features(self) -> int:
        """The roots and their children: the rows of each dictionary."""
        return self.n_features * (1 + self.children)

    @property
    def features_set_by(self) -> tuple[str, str]:
        """The key that sets all_features, and how (`spec_checks.check_common`'s message)."""
        return ("children", " (n_features x (1 + children))") if self.children else (
            "n_features", "")

    def __post_init__(self):
        super().__post_init__()
        _need(self.d_out > 0, "d_out", "must be > 0")
        _need(self.skip >= 0, "skip", "must be >= 0")
        _need(self.children >= 0, "children", "must be >= 0")
        _need(self.child_prob > 0 and self.children * self.child_prob <= 1 + 1e-9,
              "child_prob", "must be > 0, and children x child_prob <= 1 (exclusive children)")
        _need(self.children > 0 or self.child_prob == type(self).child_prob, "child_prob",
              "has no effect without children (set children too)")

    def truth(self) -> dict[str, np.ndarray]:
        base = super().truth()
        n_all = self.all_features
        inputs = base["directions"]
        if self.children:
            more = _unit_rows(np.random.default_rng([self.seed, 4]), n_all - self.n_features,
                              self.d_in)
            inputs = np.concatenate([inputs, more.astype(np.float32)])
            base["parent"] = np.concatenate([np.full(self.n_features, -1),
                                             np.repeat(np.arange(self.n_features),
                                                       self.children)]).astype(np.int32)
        rng = np.random.default_rng([self.seed, 3])
        outputs = _unit_rows(rng, n_all, self.d_out).astype(np.float32)
        skip = rng.standard_normal((self.d_in, self.d_out)) / np.sqrt(self.d_in)
        with np.errstate(over="ignore"):  # (inf: refused where the targets are drawn)
            skip = (self.skip * skip).astype(np.float32)
        return {**base, "input_directions": inputs, "directions": outputs, "skip": skip}

    def codes(self, truth: Mapping[str, np.ndarray], rng: np.random.Generator,
              n: int) -> np.ndarray:
        roots = super().codes(truth, rng, n)
        if not self.children:
            return roots
        # one uniform per parent picks at most one child: child j fires when u in [j·p, (j+1)·p)
        u = rng.random((n, self.n_features, 1), dtype=np.float32)
        j = np.arange(self.children, dtype=np.float32)
        fires = (u >= j * self.child_prob) & (u < (j + 1) * self.child_prob)
        fires &= (roots > 0)[:, :, None]
        mean = np.repeat(truth["magnitude_mean"], self.children)
        std = np.repeat(truth["magnitude_std"], self.children)
        mags = rng.normal(mean, std, (n, mean.size))
        children = fires.reshape(n, -1) * np.maximum(mags, 0.0)
        return np.concatenate([roots, children.astype(np.float32)], axis=1)


def zipf_probabilities(n: int, mean_l0: float, exponent: float) -> np.ndarray:
    """Firing probabilities ∝ rank^-exponent, summing to mean_l0, none above 1."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    p = np.zeros(n)
    capped = np.zeros(n, bool)
    for _ in range(n):  # water-filling: cap at 1 and rescale the rest until nothing exceeds 1
        free = ~capped
        p[free] = weights[free] * (mean_l0 - capped.sum()) / weights[free].sum()
        p[capped] = 1.0
        over = p > 1.0
        if not over.any():
            break
        capped |= over
    return p


# ---------------------------------------------------------------------------------------------
# hierarchy


@dataclass(frozen=True)
class HierarchySpec:
    """Trees of features: a child fires only when its parent fires."""

    kind: ClassVar[str] = "hierarchy"
    scale_knobs: ClassVar[tuple[str, ...]] = ("the magnitudes",)
    features_set_by: ClassVar[tuple[str, str]] = (
        "depth", " (n_trees x branching^level over the levels)")
    n_trees: int = 16
    """Number of independent trees."""
    branching: int = 2
    """Children per non-leaf feature."""
    depth: int = 2
    """Levels per tree (1: roots only)."""
    probs: tuple[float, ...] = (0.3, 0.4)
    """Per level: P(root fires), then P(child fires | its parent fires)."""
    magnitudes: tuple[float, ...] = (1.0, 1.0)
    """Per level: mean magnitude of an active feature (a child may be stronger than its parent)."""
    magnitude_std: float = 0.0
    """Standard deviation of every magnitude, clipped at 0: a feature drawn at 0 or below does
    not fire (nor do its children), so a std comparable to the magnitudes lowers the firing
    rates below probs."""
    exclusive: bool = True
    """Siblings are mutually exclusive: at most one child of a parent fires."""
    orthogonal: bool = True
    """Orthonormal directions (needs n_features <= d_in); false: random unit directions."""
    d_in: int = 64
    """Dimension of the activations."""
    tokens: int = 262_144
    """Number of tokens to write."""
    seed: int = 0
    """Seed of the directions and samples."""
    shard_tokens: int = 131072
    """Tokens per shard file."""
    dtype: str = "float32"
    """Stored dtype: float32 or float16."""

    def __post_init__(self):
        _check_common(self)
        _need(self.n_trees > 0, "n_trees", "must be > 0")
        _need(self.branching > 0, "branching", "must be > 0")
        _need(self.depth > 0, "depth", "must be > 0")
        _need(len(self.probs) == self.depth, "probs", f"needs one value per level ({self.depth})")
        _need(len(self.magnitudes) == self.depth, "magnitudes",
              f"needs one value per level ({self.depth})")
        _need(all(0 < p <= 1 for p in self.probs), "probs", "each must be in (0, 1]")
        _need(all(m > 0 for m in self.magnitudes), "magnitudes", "each must be > 0")
        _need(self.magnitude_std >= 0, "magnitude_std", "must be >= 0")
        if self.exclusive:
            _need(all(self.branching * p <= 1 + 1e-9 for p in self.probs[1:]), "probs",
                  "with exclusive siblings, branching x P(child | parent) must be <= 1")
        if self.orthogonal:
            _need(self.n_features <= self.d_in, "orthogonal",
                  f"{self.n_features} orthogonal directions do not fit in d_in {self.d_in}")

    @property
    def n_features(self) -> int:
        return self.n_trees * sum(self.branching**level for level in range(self.depth))

    def tree(self) -> tuple[np.ndarray, np.ndarray]:
        """parent [n_features] (-1 for roots) and level [n_features]; features are numbered
        level by level (all roots, then all their children, ...), children of one parent
        consecutive."""
        parents, levels = [np.full(self.n_trees, -1)], [np.zeros(self.n_trees, int)]
        start = 0
        for level in range(1, self.depth):
            above = np.arange(start, start + len(parents[-1]))
            parents.append(np.repeat(above, self.branching))
            levels.append(np.full(len(parents[-1]), level))
            start += len(above)
        return np.concatenate(parents), np.concatenate(levels)

    def truth(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0])
        make = _orthonormal_rows if self.orthogonal else _unit_rows
        parent, level = self.tree()
        return {"directions": make(rng, self.n_features, self.d_in).astype(np.float32),
                "parent": parent.astype(np.int32), "level": level.astype(np.int32)}

    def codes(self, truth: Mapping[str, np.ndarray], rng: np.random.Generator,
              n: int) -> np.ndarray:
        level = truth["level"]
        active = np.zeros((n, self.n_features), bool)
        active[:, level == 0] = rng.random((n, self.n_trees)) < self.probs[0]
        for lv in range(1, self.depth):
            above = np.flatnonzero(level == lv - 1)
            on = active[:, above][:, :, None]  # [n, parents, 1]
            p = self.probs[lv]
            if self.exclusive:  # one uniform per parent picks at most one child
                u = rng.random((n, len(above), 1))
                j = np.arange(self.branching)
                fires = (u >= j * p) & (u < (j + 1) * p)
            else:
                fires = rng.random((n, len(above), self.branching)) < p
            active[:, level == lv] = (on & fires).reshape(n, -1)
        mean = np.asarray(self.magnitudes)[level]
        mags = rng.normal(mean, self.magnitude_std, (n, self.n_features))
        codes = (active * np.maximum(mags, 0.0)).astype(np.float32)
        # A parent whose magnitude clipped to 0 does not fire, and so neither do its children,
        # level by level (fault testing: with magnitude_std > 0 children fired without it).
        # The draws are the same as before: data whose magnitudes never clip is unchanged.
        for lv in range(1, self.depth):
            rows = np.flatnonzero(level == lv)
            codes[:, rows] *= codes[:, truth["parent"][rows]] > 0
        return codes

    def structure(self) -> dict[str, Any]:
        parent, _ = self.tree()
        return {"n_features": self.n_features, "parent": parent.tolist()}


# ---------------------------------------------------------------------------------------------
# circles


@dataclass(frozen=True)
class CirclesSpec:
    """C circles in d dims: an active circle adds r·(a cos θ + b sin θ), θ uniform."""

    kind: ClassVar[str] = "circles"
    scale_knobs: ClassVar[tuple[str, ...]] = ("radius", "radius_std")
    features_set_by: ClassVar[tuple[str, str]] = ("n_circles", " (two per circle)")
    n_circles: int = 1600
    """Number of circles (each spanned by two random unit vectors a, b)."""
    d_in: int = 200
    """Dimension of the activations."""
    prob: float = 0.004
    """Probability that a circle is active on a token."""
    radius: float = 1.0
    """Radius r of an active circle."""
    radius_std: float = 0.0
    """Standard deviation of the radius, clipped at 0 (a circle drawn at 0 or below is not
    active: a std comparable to the radius lowers the rate below prob)."""
    tokens: int = 1_048_576
    """Number of tokens to write."""
    seed: int = 0
    """Seed of the planes and samples."""
    shard_tokens: int = 131072
    """Tokens per shard file."""
    dtype: str = "float32"
    """Stored dtype: float32 or float16."""

    def __post_init__(self):
        _check_common(self)
        _need(self.n_circles > 0, "n_circles", "must be > 0")
        _need(0 < self.prob <= 1, "prob", "must be in (0, 1]")
        _need(self.radius > 0, "radius", "must be > 0")
        _need(self.radius_std >= 0, "radius_std", "must be >= 0")
        _need(self.d_in >= 2, "d_in", f"a circle needs a plane: must be >= 2, got {self.d_in}")

    @property
    def n_features(self) -> int:
        return 2 * self.n_circles

    def truth(self) -> dict[str, np.ndarray]:
        """directions: a_0, b_0, a_1, b_1, ... (row 2c is a, row 2c+1 is b of circle c)."""
        rng = np.random.default_rng([self.seed, 0])
        return {"directions": _unit_rows(rng, self.n_features, self.d_in).astype(np.float32)}

    def codes(self, truth: Mapping[str, np.ndarray], rng: np.random.Generator,
              n: int) -> np.ndarray:
        active = rng.random((n, self.n_circles)) < self.prob
        theta = rng.uniform(0.0, 2 * np.pi, (n, self.n_circles))
        r = np.maximum(rng.normal(self.radius, self.radius_std, (n, self.n_circles)), 0.0)
        r = r * active
        return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1).reshape(
            n, -1).astype(np.float32)

    def structure(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "circle_of_feature": "feature // 2"}


# ---------------------------------------------------------------------------------------------
# Writing, presets, regeneration


def write(spec, out: str | Path, *, overwrite: bool = False, progress: bool = True,
          tokens_key: str = "tokens") -> Path:
    """Writes the shards of `spec` plus truth.safetensors and truth.json to `out` (a
    transcoder's targets: to `out/target`, written and published with it). Refused, naming
    `tokens_key` (how the caller's user sets spec.tokens), when they would not fit on the disk."""
    check_space(spec, out, tokens_key)
    truth = spec.truth()
    source = truth_json(spec)
    pairs = "input_directions" in truth
    with ShardWriter(out, spec.d_in, dtype=spec.dtype, shard_tokens=spec.shard_tokens,
                     source={k: v for k, v in source.items() if k != "parent"},
                     overwrite=overwrite) as writer:
        targets = (ShardWriter(writer.staging / TARGET_DIR, spec.d_out, dtype=spec.dtype,
                               shard_tokens=spec.shard_tokens,
                               source={**source, "role": "target"}) if pairs else None)
        bar = Progress(spec.tokens, unit="tok", unit_scale=True, desc=f"synth {spec.kind}",
                       enabled=progress)
        for i, lo in enumerate(range(0, spec.tokens, BLOCK_TOKENS)):
            n = min(BLOCK_TOKENS, spec.tokens - lo)
            x, y, _ = block_rows(spec, truth, i, n, codes=False)
            writer.write(x)
            if targets is not None:
                targets.write(y)
            bar.update(n)
        bar.close()
        if targets is not None:
            targets.close()
        tensorfile.write(writer.staging / TRUTH_TENSORS, truth)
        digest = outputs.file_digest(writer.staging / TRUTH_TENSORS)
        outputs.write_file(writer.staging / TRUTH_JSON,
                           json.dumps({**source, TRUTH_DIGEST: digest}, indent=1))
    return Path(out)


def check_space(spec, out: str | Path, key: str = "tokens") -> None:
    """Refuses, naming `key`, shards of `spec` larger than the free space where `out` goes
    (fault testing: --tokens 10^12 wrote until the disk was full)."""
    width = spec.d_in + getattr(spec, "d_out", 0)  # (a transcoder's targets too)
    need = spec.tokens * width * np.dtype(spec.dtype).itemsize
    place = Path(out).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    usage = shutil.disk_usage(place)
    free = usage.free
    if usage.total == 0:  # (/proc, /sys: no space to count; the write names the path)
        return
    if need > free:
        raise ConfigError(f"{key} {spec.tokens:,}: the shards need {size_text(need)}, more "
                          f"than the {size_text(free)} free on {place}; write fewer tokens, or "
                          "elsewhere")


def truth_json(spec) -> dict[str, Any]:
    """What truth.json (and the shards' manifest) records of the data's generator."""
    return {"generator": spec.kind, **spec_dict(spec), "block_tokens": BLOCK_TOKENS,
            **spec.structure()}


def block_rows(spec, truth: Mapping[str, np.ndarray], block: int, n: int, *,
               codes: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The first n tokens of block `block`, float32: x [n, d_in], a transcoder's targets
    [n, d_out] (else None) and, with `codes` (or where they are drawn anyway), the true codes
    [n, n_features] (else None). What `write` stores and `Truth` regenerates (a streamed run's
    tokens). Settings that draw non-finite tokens are refused here, for every reader."""
    if hasattr(spec, "block"):  # a generator that decodes its own (sparse) codes
        x, dense = spec.block(truth, block, n, block_tokens=BLOCK_TOKENS, codes=codes)
        y = None
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # (refused below)
            dense = spec.codes(truth, np.random.default_rng([spec.seed, 1, block]), n)
            x = dense @ truth.get("input_directions", truth["directions"])
            y = (dense @ truth["directions"] + x @ truth["skip"] if "input_directions" in truth
                 else None)
    for rows in (x, y):
        if rows is not None and not np.isfinite(rows).all():
            lo = block * BLOCK_TOKENS
            raise DataError(f"{spec.kind}: the settings drew non-finite values (in the block "
                            f"of tokens {lo}..{lo + n - 1}); lower {_scale_knobs(spec)}")
    return x, y, dense


def _scale_knobs(spec) -> str:
    """What to lower when the settings draw values too large: `the magnitudes or skip`
    (fault testing: circles' radius and a transcoder's skip were blamed on "the
    magnitudes")."""
    knobs = spec.scale_knobs
    return ", ".join(knobs[:-1]) + (" or " if len(knobs) > 1 else "") + knobs[-1]


def spec_dict(spec) -> dict[str, Any]:
    """A generator spec's fields, lists for tuples (as truth.json records them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}


def generate_superposition(spec: SuperpositionSpec, out: str | Path, *, overwrite: bool = False,
                           progress: bool = True) -> Path:
    return write(spec, out, overwrite=overwrite, progress=progress)


@dataclass(frozen=True)
class Generator:
    spec: type
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """A preset: values that replace the spec's defaults."""
    summary: str = ""
    """What a preset is (its --help line); default: the spec's first docstring line."""

    @property
    def description(self) -> str:
        return self.summary or (self.spec.__doc__ or self.spec.kind).splitlines()[0]


GENERATORS: dict[str, Generator] = {
    "superposition": Generator(SuperpositionSpec),
    "hierarchy": Generator(HierarchySpec),
    "hierarchy_small": Generator(HierarchySpec, {
        "n_trees": 1, "branching": 2, "depth": 2, "probs": (0.3, 0.4), "magnitudes": (1.0, 1.0),
        "exclusive": True, "orthogonal": True, "d_in": 20},
        summary="Preset of hierarchy: one parent (p=0.3) with two mutually exclusive children "
                "(0.4 each given the parent), orthogonal in 20 dims, magnitude 1."),
    "circles": Generator(CirclesSpec),
    "transcoder": Generator(TranscoderSpec, {"d_in": 64, "d_out": 96, "n_features": 256,
                                            "skip": 0.5}),
    "synthsaebench": Generator(SynthSAEBenchSpec),
}


def parse_spec(raw: Mapping[str, Any], *, key: str = "generate") -> tuple[Generator, Any]:
    """`{kind: superposition, n_features: 512, ...}` -> (generator, spec), errors naming the key."""
    from jaxsae.parsing import from_dict

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: expected a mapping with 'kind'")
    raw = dict(raw)
    kind = raw.pop("kind", None)
    if kind not in GENERATORS:
        raise ConfigError(f"{key}.kind: must be one of {', '.join(GENERATORS)}, got {kind!r}")
    gen = GENERATORS[kind]
    try:
        return gen, from_dict(gen.spec, {**gen.defaults, **raw}, key)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(key) else f"{key}.{msg}") from None


def generate(raw: Mapping[str, Any], out: str | Path, **kwargs) -> Path:
    _, spec = parse_spec(raw)
    return write(spec, out, tokens_key="data.generate.tokens", **kwargs)


def written_spec(source: Any) -> Mapping[str, Any]:
    """The generator and spec a data directory's manifest records ({} if none)."""
    return getattr(getattr(source, "manifest", None), "source", None) or {}


def spec_differences(written: Mapping[str, Any], spec: Any, ignore: tuple[str, ...] = ()
                     ) -> str | None:
    """How the generator settings `written` in a manifest differ from `spec` (None: equal),
    but for the fields `ignore`."""
    if written.get("generator") != spec.kind:
        return f"generator {written.get('generator')!r}, not {spec.kind!r}"
    want = spec_dict(spec)
    differ = [f for f in want if f not in ignore and written.get(f) != want[f]]
    return "other " + ", ".join(differ) if differ else None


def check_generated(source: Any, raw: Mapping[str, Any], data_path: str | Path) -> None:
    """Refuses data already at `data_path` that `data.generate` (`raw`) would not have
    written: training on it would report results about other data than the config says."""
    _, spec = parse_spec(raw, key="data.generate")
    written = written_spec(source)
    if written.get("generator") is None:
        raise DataError(f"data.path {data_path}: exists and was not generated by jaxsae, but "
                        "data.generate is set; drop data.generate to train on it, or point "
                        "data.path elsewhere")
    # (Not the token count: the run reads the directory's own tokens, which its truth.json
    # regenerates; data of other lengths share all but a shorter last block's tokens, and
    # whether there are enough is checked with the run's size.
    # Nor the shard size: blocks are BLOCK_TOKENS whatever the files hold.)
    if (what := spec_differences(written, spec, ignore=("tokens", "shard_tokens"))) is not None:
        raise DataError(f"data.path {data_path}: holds data generated with {what} "
                        "(data.generate differs); point data.path elsewhere, or remove that "
                        "directory to generate it again")


# ---------------------------------------------------------------------------------------------
# Reading the truth back


class _Blocks:
    """Recently regenerated blocks, newest last, up to `budget` bytes (the newest is always
    kept): the evaluation reads a block's tokens in several batches, and a streamed run's
    loader reads a block in chunks. Thread-safe (the loader reads windows in threads); one
    block is generated at a time."""

    def __init__(self, budget: int = 256 << 20):
        self.budget = budget
        self._entries: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec, arrays, block: int, *, codes: bool) -> tuple:
        with self._lock:
            entry = self._entries.get(block)
            if entry is None or (codes and entry[2] is None):
                n = min(BLOCK_TOKENS, spec.tokens - block * BLOCK_TOKENS)
                entry = block_rows(spec, arrays, block, n, codes=codes)
                self._entries[block] = entry
            self._entries.move_to_end(block)
            size = 0
            for key in list(reversed(self._entries)):  # the newest first; drop the excess
                size += sum(a.nbytes for a in self._entries[key] if a is not None)
                if size > self.budget and key != block:
                    del self._entries[key]
            return entry


@dataclass(frozen=True)
class Truth:
    """The ground truth of generated data: its spec and truth() arrays, from which any token
    range and its true codes are regenerated."""

    spec: Any
    arrays: Mapping[str, np.ndarray]
    _blocks: _Blocks = field(default_factory=_Blocks, compare=False, repr=False)

    @property
    def directions(self) -> np.ndarray:
        return self.arrays["directions"]

    def directions_of(self, paired: bool) -> np.ndarray:
        """The directions the tokens a dictionary reconstructs are built from, which its
        decoder rows are compared with: a transcoder's (`paired`) targets' dictionary, and
        for an SAE on a transcoder's inputs alone, the input dictionary (fault testing: such a
        run was refused as "not the truth of this data", and `eval --truth` failed in a
        matmul error)."""
        if not paired and "input_directions" in self.arrays:
            return self.arrays["input_directions"]
        return self.directions

    def check_data(self, source: Any, truth_path: str | Path, data_path: str | Path, *,
                   at: int | None = None) -> None:
        """Refuses data that was not generated from this truth (its manifest records the
        generator and spec it was written with; with `at`, 64 of its rows from there are
        compared with the regenerated tokens): metrics against another data set's truth
        would be numbers about nothing."""
        written = written_spec(source)
        where = f"--truth {truth_path}"
        if written.get("generator") is None:
            raise DataError(f"{where}: {data_path} was not written by `jaxsae synth` (its "
                            "manifest names no generator), so it cannot be checked against "
                            "this truth")
        if (what := spec_differences(written, self.spec)) is not None:
            raise DataError(f"{where}: is not the truth of {data_path} (the data was generated "
                            f"with {what}); pass the data's own directory as --truth")
        if source.n_tokens != self.spec.tokens:
            raise DataError(f"{where}: {data_path} holds {source.n_tokens:,} tokens but the "
                            f"truth describes {self.spec.tokens:,}: not the data it was "
                            "generated with")
        if at is None or at >= source.n_tokens:
            return
        # 64 rows before any pass (their block drawn with its codes, which the evaluation
        # reads next); `truth_reports` then checks every row it evaluates
        stop = min(at + 64, source.n_tokens)
        self.check_rows(at, source.read(at, stop), data_names(source, data_path),
                        codes=True)

    def check_rows(self, at: int, rows: np.ndarray, names: tuple[str, str | None], *,
                   codes: bool = False) -> None:
        """Refuses `rows` (tokens `at`... of the data; a transcoder's [x | target]) unless they
        are the tokens this truth regenerates, to the float rounding of another device (and,
        for float16 data, a unit in the last place of each value): metrics against true codes
        that no longer describe the tokens would be wrong. `names`: the data's directory and
        its targets' (`data_names`), for the message. `codes`: draw the rows' blocks with
        their codes (an evaluation reads them next: one draw, not two)."""
        n = len(rows)
        want = self.tokens(at, at + n, codes=codes)
        inputs, paired = want.shape[1], rows.shape[1] > want.shape[1]
        if paired:  # a transcoder's [x | target]: the targets too
            want = np.concatenate([want, self.tokens(at, at + n, part=1, codes=codes)], axis=1)
        got = np.asarray(rows[:, :want.shape[1]], np.float32)
        gap = np.abs(got - want)
        if self.spec.dtype != "float32":  # another backend's draw may round the other way
            gap = np.maximum(gap - np.spacing(np.abs(want).astype(self.spec.dtype)), 0.0)
        typical = float(np.sqrt(np.mean(np.sum(np.square(want, dtype=np.float64), axis=1))))
        error = np.linalg.norm(gap, axis=1) / max(typical, 1e-12)
        if not (bad := np.flatnonzero(~(error < 1e-3))).size:
            return
        first = bad[0]
        target = paired and not gap[first, :inputs].any()
        where = names[1] if target and names[1] else names[0]
        raise DataError(f"{where}: {'target of ' if target else ''}token {at + first:,} is "
                        "not the one this truth generates (difference "
                        f"{error[first]:.3g} of a typical token's norm; {bad.size:,} of the "
                        f"{n:,} tokens from {at:,} differ): the data was changed after it "
                        "was written, or written by a jaxsae that drew it otherwise (write it "
                        "again with jaxsae synth)")

    def codes(self, start: int, stop: int, *, progress: bool = False) -> np.ndarray:
        """[stop - start, n_features] the true feature activations of tokens [start, stop),
        regenerated from the seed (float32, exactly what the shards were built from)."""
        return self._range(start, stop, 2, progress=progress,
                           empty=(0, self.directions.shape[0]))

    def tokens(self, start: int, stop: int, *, part: int = 0, codes: bool = False
               ) -> np.ndarray:
        """[stop - start, d_in] float32: tokens [start, stop) exactly as `jaxsae synth` writes
        them (rounded through the spec's dtype); `part` 1: a transcoder's targets instead.
        `codes`: draw their blocks with the codes (kept for a `codes` call that follows)."""
        width = self.spec.d_in if part == 0 else self.directions.shape[1]
        x = self._range(start, stop, part, empty=(0, width), with_codes=codes)
        if self.spec.dtype != "float32":
            with np.errstate(over="ignore"):
                x = x.astype(self.spec.dtype).astype(np.float32)
            # (written data never holds such values: the shard writer refuses them; fault
            # testing: streamed, they became inf with numpy's warning, and the run was refused
            # advising to repair the data or skip non-finite steps)
            if not np.isfinite(x).all():
                top = float(np.finfo(self.spec.dtype).max)
                raise DataError(f"{self.spec.kind}: the settings drew values beyond "
                                f"{self.spec.dtype}'s range (|x| > {top:g}) in tokens "
                                f"{start}..{stop - 1}; lower {_scale_knobs(self.spec)}, or "
                                "use dtype float32")
        return x

    def _range(self, start: int, stop: int, part: int, *, progress: bool = False,
               empty: tuple[int, int], with_codes: bool = False) -> np.ndarray:
        if not 0 <= start <= stop <= self.spec.tokens:
            raise ValueError(f"tokens [{start}, {stop}) outside the {self.spec.tokens} generated")
        parts = []
        first, last = start // BLOCK_TOKENS, -(-stop // BLOCK_TOKENS)
        bar = Progress(last - first, desc="true codes", unit="block",
                       enabled=progress and part == 2)
        for block in range(first, last):
            bar.update()
            lo = block * BLOCK_TOKENS
            rows = self._blocks.get(self.spec, self.arrays, block,
                                    codes=with_codes or part == 2)[part]
            parts.append(rows[max(start - lo, 0): stop - lo])
        bar.close()
        if not parts:
            return np.zeros(empty, np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def data_names(source: Any, data_path: str | Path | None = None) -> tuple[str, str | None]:
    """The directories `source` reads (its tokens', and a transcoder's targets' or None),
    for messages."""
    inputs = getattr(source, "inputs", source)
    targets = getattr(source, "targets", None)
    name = data_path if data_path is not None else getattr(inputs, "path", "the data")
    return str(name), None if targets is None else str(getattr(targets, "path", "the targets"))


def has_truth(directory: str | Path) -> bool:
    """Whether `directory` holds the truth files of synthetic data (`jaxsae eval --truth`)."""
    return (Path(directory) / TRUTH_JSON).is_file()


class OtherSamplerError(DataError):
    """Data drawn by another version of its generator's sampler: its tokens are usable, its
    true codes cannot be regenerated. `drawn_by`: which version drew it, for notes."""

    def __init__(self, meta: Path, kind: str, drawn: int, wanted: int):
        self.drawn_by = (f"{meta}: drawn by version {drawn} of the {kind} sampler; this jaxsae "
                         f"draws version {wanted} (other tokens from the same seed)")
        # (fault testing: "generate the data again" led a user to overwrite the data of a
        # run in progress, which then resumed on other tokens)
        super().__init__(f"{self.drawn_by}, so it cannot regenerate the true codes: for "
                         "metrics against the truth, write data with this jaxsae's `jaxsae "
                         "synth` into a new directory")


def load_truth(path: str | Path) -> Truth:
    """The truth of a generated directory (or of its truth.json / truth.safetensors)."""
    path = Path(path)
    directory = path.parent if path.name in (TRUTH_JSON, TRUTH_TENSORS) else path
    if not directory.is_dir():
        raise DataError(f"{path}: not a directory written by `jaxsae synth` (give the "
                        "directory, or its truth.json)")
    meta, tensors = directory / TRUTH_JSON, directory / TRUTH_TENSORS
    for f in (meta, tensors):
        if not f.is_file():
            raise DataError(f"{f}: not found (not a directory written by `jaxsae synth`)")
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise DataError(f"{meta}: not a JSON object")
    kind = info.get("generator")
    if kind not in GENERATORS:
        raise DataError(f"{meta}: unknown generator {kind!r}")
    if info.get("block_tokens", BLOCK_TOKENS) != BLOCK_TOKENS:
        raise DataError(f"{meta}: written with blocks of {info['block_tokens']} tokens; this "
                        f"version regenerates blocks of {BLOCK_TOKENS}")
    wanted = getattr(GENERATORS[kind].spec, "sampler", None)
    if wanted is not None and info.get("sampler", 1) != wanted:
        raise OtherSamplerError(meta, kind, info.get("sampler", 1), wanted)
    fields = {f.name for f in dataclasses.fields(GENERATORS[kind].spec)}
    _, spec = parse_spec({"kind": kind, **{k: v for k, v in info.items() if k in fields}},
                         key=str(meta))
    # (fault testing: a truth.safetensors with other shapes, a tensor missing or NaN
    # directions trained every step and then failed in a traceback, on every rerun; values
    # edited were blamed on the data.) Directories written before the digest: the checks
    # below only.
    if TRUTH_DIGEST in info and outputs.file_digest(tensors) != info[TRUTH_DIGEST]:
        raise DataError(f"{tensors}: not the file `jaxsae synth` wrote (its digest differs from "
                        f"the one {meta.name} records): damaged or edited; write the data again")
    arrays = {k: np.asarray(v) for k, v in tensorfile.read(tensors).items()}
    if "directions" not in arrays:
        raise DataError(f"{tensors}: no 'directions' tensor")
    for name, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise DataError(f"{tensors}: {name} holds non-finite values (NaN or inf)")
    check_directions(arrays["directions"], str(tensors))
    return Truth(spec=spec, arrays=arrays)


def check_directions(directions: np.ndarray, where: str, width: int | None = None) -> None:
    """Refuses true directions no recovery metric can be measured against, naming `where`:
    not [n_features, width], not finite, or a row of norm 0 (which has no direction: its
    cosines came out 0, an MCC pulled down as if measured; fault testing)."""
    if directions.ndim != 2 or (width is not None and directions.shape[1] != width):
        want = "[n_features, d]" if width is None else f"[n_features, {width}]"
        raise DataError(f"{where}: 'directions' is {list(directions.shape)}, expected {want}")
    if not np.isfinite(directions).all():
        rows = np.flatnonzero(~np.isfinite(directions).all(axis=1))
        raise DataError(f"{where}: 'directions' row {rows[0]} is not finite ({len(rows)} such "
                        "rows)")
    zero = np.flatnonzero(~np.any(directions != 0, axis=1))
    if len(zero):
        raise DataError(f"{where}: 'directions' row {zero[0]} has norm 0 ({len(zero)} such "
                        "rows): a direction to compare with is needed")


