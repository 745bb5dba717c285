"""Ground-truth generators: activations built from known feature directions, written as shards.

Each generator is a frozen spec dataclass (its fields are the `jaxsae synth KIND` flags and the
keys of `data.generate` in a config) and a function that writes the shards plus
`truth.safetensors` (the true directions and firing statistics) and `truth.json` (the spec).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxsae import tensorfile
from jaxsae.data.shards import ShardWriter
from jaxsae.errors import ConfigError

TRUTH_TENSORS = "truth.safetensors"
TRUTH_JSON = "truth.json"


@dataclass(frozen=True)
class SuperpositionSpec:
    n_features: int = 512
    """Number of true features (may exceed d_in: superposition)."""
    d_in: int = 128
    """Dimension of the activations."""
    tokens: int = 1_048_576
    """Number of tokens to write."""
    mean_l0: float = 4.0
    """Expected number of active features per token."""
    zipf_exponent: float = 0.5
    """Firing probabilities fall off as rank^-exponent (0: all equal)."""
    magnitude_mean: float = 1.0
    """Mean magnitude of an active feature."""
    magnitude_std: float = 0.1
    """Standard deviation of the magnitude (clipped at 0)."""
    seed: int = 0
    """Seed of the directions, probabilities and samples."""
    shard_tokens: int = 131072
    """Tokens per shard file."""
    dtype: str = "float32"
    """Stored dtype: float32 or float16."""

    def __post_init__(self):
        def need(ok, key, why):
            if not ok:
                raise ConfigError(f"{key}: {why}")

        need(self.n_features > 0, "n_features", "must be > 0")
        need(self.d_in > 0, "d_in", "must be > 0")
        need(self.tokens > 0, "tokens", "must be > 0")
        need(0 < self.mean_l0 <= self.n_features, "mean_l0", "must be in (0, n_features]")
        need(self.zipf_exponent >= 0, "zipf_exponent", "must be >= 0")
        need(self.magnitude_mean > 0, "magnitude_mean", "must be > 0")
        need(self.magnitude_std >= 0, "magnitude_std", "must be >= 0")
        need(self.shard_tokens > 0, "shard_tokens", "must be > 0")
        need(self.dtype in ("float32", "float16"), "dtype", "must be float32 or float16")


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


def generate_superposition(spec: SuperpositionSpec, out: str | Path, *, overwrite: bool = False,
                           progress: bool = True) -> Path:
    """x = Σ_i a_i · m_i · d_i with a_i ~ Bernoulli(p_i), m_i ~ N(mean, std)₊, d_i unit random."""
    rng = np.random.default_rng([spec.seed, 0])
    directions = rng.standard_normal((spec.n_features, spec.d_in))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    probs = rng.permutation(zipf_probabilities(spec.n_features, spec.mean_l0, spec.zipf_exponent))
    directions = directions.astype(np.float32)
    source = {"generator": "superposition", **dataclasses.asdict(spec)}
    block = 16384
    with ShardWriter(out, spec.d_in, dtype=spec.dtype, shard_tokens=spec.shard_tokens,
                     source=source, overwrite=overwrite) as writer:
        bar = tqdm(total=spec.tokens, unit="tok", unit_scale=True, desc="synth superposition",
                   disable=not progress)
        for i, lo in enumerate(range(0, spec.tokens, block)):
            n = min(block, spec.tokens - lo)
            draw = np.random.default_rng([spec.seed, 1, i])  # per block: regenerable by seed
            active = draw.random((n, spec.n_features), dtype=np.float32) < probs
            mags = draw.normal(spec.magnitude_mean, spec.magnitude_std, (n, spec.n_features))
            codes = (active * np.maximum(mags, 0.0)).astype(np.float32)
            writer.write(codes @ directions)
            bar.update(n)
        bar.close()
        tensorfile.write(writer.staging / TRUTH_TENSORS, {
            "directions": directions,
            "firing_prob": probs.astype(np.float32),
            "magnitude_mean": np.full(spec.n_features, spec.magnitude_mean, np.float32),
            "magnitude_std": np.full(spec.n_features, spec.magnitude_std, np.float32),
        })
        (writer.staging / TRUTH_JSON).write_text(json.dumps(source, indent=1))
    return Path(out)


@dataclass(frozen=True)
class Generator:
    spec: type
    run: Callable[..., Path]


GENERATORS: dict[str, Generator] = {
    "superposition": Generator(SuperpositionSpec, generate_superposition),
}


def parse_spec(raw: Mapping[str, Any], *, key: str = "generate") -> tuple[Generator, Any]:
    """`{kind: superposition, n_features: 512, ...}` -> (generator, spec), errors naming the key."""
    from jaxsae.config import from_dict

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: expected a mapping with 'kind'")
    raw = dict(raw)
    kind = raw.pop("kind", None)
    if kind not in GENERATORS:
        raise ConfigError(f"{key}.kind: must be one of {', '.join(GENERATORS)}, got {kind!r}")
    gen = GENERATORS[kind]
    try:
        return gen, from_dict(gen.spec, raw, key)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(key) else f"{key}.{msg}") from None


def generate(raw: Mapping[str, Any], out: str | Path, **kwargs) -> Path:
    gen, spec = parse_spec(raw)
    return gen.run(spec, out, **kwargs)
