"""The checks every ground-truth generator spec makes (`synthetic`, `synthsaebench`): a failed
one is a ConfigError naming the field (`jaxsae synth` turns it into the flag's name)."""

from __future__ import annotations

import dataclasses
import math
import os

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
    # The feature directions are built whole (float64) before anything is written: a count
    # beyond memory is refused here, not after the machine's memory is spent (fault testing:
    # a hierarchy of depth 40 was killed by the kernel, exit 137, no message).
    # (fault testing: circles' count was blamed on a --depth they do not have, and a
    # transcoder's children were not counted) `features_set_by`: the key that sets the count
    # and how, where it is not n_features itself.
    n = getattr(spec, "all_features", getattr(spec, "n_features", None))
    if isinstance(n, int) and n * spec.d_in * 8 > _memory():
        key, count = getattr(spec, "features_set_by", ("n_features", ""))
        need(False, key, f"{n:,} features{count} in d_in {spec.d_in} need "
             f"{size_text(n * spec.d_in * 8)} for their directions alone, more than this "
             f"machine's {size_text(_memory())} of memory")


def size_text(n_bytes: float) -> str:
    """`512 bytes`, `15.6 KiB`, `1.3 GiB`: a size in the unit that reads best (fault testing:
    "the shards need 0.0 GiB, more than the 0.0 GiB free")."""
    if n_bytes < 1024:
        return f"{n_bytes:,.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n_bytes /= 1024
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:,.1f} {unit}"
    raise AssertionError("unreachable")


def _memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
