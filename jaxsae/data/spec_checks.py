"""The checks every ground-truth generator spec makes (`synthetic`, `synthsaebench`): a failed
one is a ConfigError naming the field (`jaxsae synth` turns it into the flag's name)."""

from __future__ import annotations

import dataclasses
import math

from jaxsae.errors import ConfigError


def need(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def check_common(spec) -> None:
    """The fields every generator has: d_in, tokens, seed, shard_tokens, dtype; and every
    number finite (inf and nan pass comparisons such as > 0)."""
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        values = value if isinstance(value, tuple | list) else (value,)
        for v in values:
            if isinstance(v, float):
                need(math.isfinite(v), field.name, f"must be a finite number, got {v}")
    need(spec.d_in > 0, "d_in", "must be > 0")
    need(0 <= spec.seed < 2**63, "seed", "must be in [0, 2^63)")
    need(spec.tokens > 0, "tokens", "must be > 0")
    need(spec.shard_tokens > 0, "shard_tokens", "must be > 0")
    need(spec.dtype in ("float32", "float16"), "dtype", "must be float32 or float16")
