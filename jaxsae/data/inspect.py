"""`jaxsae data inspect`: validate every file of an activation directory and summarise it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxsae.config import DataConfig
from jaxsae.data import detect_format, open_source
from jaxsae.data.saelens import STATE
from jaxsae.data.shards import MANIFEST
from jaxsae.data.stats import OVERFLOW_NORM
from jaxsae.errors import DataError
from jaxsae.progress import Progress

_SAMPLE = 1 << 20  # norms kept for the quantiles (an evenly strided sample of all tokens)


def inspect(path: str | Path, *, hook: str | None = None, block_tokens: int = 65536,
            progress: bool = True) -> dict[str, Any]:
    """Opens (validating every file's header), then reads every token once: refuses NaN/inf
    naming the file and rows, and data whose every token is zero (float16 underflow), and
    returns format, size, norm statistics and the count of all-zero tokens."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: does not exist")
    kind = detect_format(path)
    source = open_source(DataConfig(path=str(path), hook=hook))
    stride = max(1, source.n_tokens // _SAMPLE)
    total = total_sq = 0.0
    low, high = np.inf, 0.0
    sample = []
    bar = Progress(source.n_tokens, unit="tok", unit_scale=True, desc="inspect",
                   enabled=progress)
    seen = zeros = 0
    huge, first_huge = 0, None
    dtypes = {np.dtype(array.dtype).name for array in source.arrays}
    for name, block in source.scan(block_tokens):
        norms = np.linalg.norm(block.astype(np.float64), axis=1)
        # (fault testing: one token of 1e30 was "valid", then training's first squared
        # error was inf, and nothing named it)
        over = np.flatnonzero(norms >= OVERFLOW_NORM)
        if len(over):
            huge += len(over)
            if first_huge is None:
                first_huge = f"{name}, row {source.locate(seen + int(over[0]))[1]}"
        total += norms.sum()
        total_sq += np.square(norms).sum()
        low, high = min(low, norms.min()), max(high, norms.max())
        zeros += int(np.count_nonzero(norms == 0))
        first = (-(seen % stride)) % stride
        sample.append(norms[first::stride])
        seen += len(block)
        bar.update(len(block))
    bar.close()
    sample = np.concatenate(sample)
    n = source.n_tokens
    if zeros == n:  # nothing an SAE can learn from: not valid activations
        underflow = (" (float16 rounds |x| < 6e-8 to 0: activations of a small scale written "
                     "as float16 lose everything)" if "float16" in dtypes else "")
        raise DataError(f"{path}: every one of its {n:,} tokens is all zeros{underflow}")
    summary: dict[str, Any] = {
        "path": str(path),
        "format": kind,
        "files": len(set(name.split(" (record batch")[0] for name in source.names)),
        "tokens": n,
        "d_in": source.d_in,
        "dtype": ", ".join(sorted(dtypes)),
        "zero_tokens": zeros,
        "overflowing_tokens": huge,
        "first_overflowing": first_huge,
        "norm": {
            "mean": total / n,
            "rms": float(np.sqrt(total_sq / n)),
            "min": float(low),
            "median": float(np.median(sample)),
            "p99": float(np.quantile(sample, 0.99)),
            "max": float(high),
            "max_over_median": (float(high / np.median(sample)) if np.median(sample) > 0
                                else None),  # (no multiple of a zero median)
            # (fault testing: on data of 2^21 tokens or more, the median and p99 are those of
            # every stride-th token, and were printed as if of all of them)
            "quantile_tokens": len(sample),
        },
    }
    if kind == "shards":
        summary["source"] = dict(source.manifest.source)
        # (shards the manifest does not list, e.g. left by another write: never read)
        listed = {entry.file for entry in source.manifest.shards}
        files = r"shard-\d+\.(npy|safetensors)"
    else:
        summary["hook"] = source.hook
        summary["context_size"] = source.context_size
        listed, files = set(source.files), r"data-\d+-of-\d+\.arrow"  # (state.json's list)
    summary["unlisted"] = sorted(p.name for p in path.iterdir()
                                 if p.name not in listed and re.fullmatch(files, p.name))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    norm = summary["norm"]
    lines = [
        f"{summary['path']}: {summary['format']}, valid",
        f"  tokens      {summary['tokens']:,} in {summary['files']} file(s)",
        f"  d_in        {summary['d_in']}",
        f"  dtype       {summary['dtype']}",
    ]
    if summary["zero_tokens"]:
        lines.append(f"  zero tokens {summary['zero_tokens']:,} "
                     f"({summary['zero_tokens'] / summary['tokens']:.2%}), all their values 0")
    if summary["overflowing_tokens"]:
        lines.append(f"  warning     {summary['overflowing_tokens']:,} token(s) of a norm whose "
                     f"square overflows float32 (>= {OVERFLOW_NORM:.2g}; the first: "
                     f"{summary['first_overflowing']}): training's errors on them are inf; "
                     "repair them, or leave them out with data.drop_norm_above")
    if "hook" in summary:
        lines.append(f"  hook        {summary['hook']} (context {summary['context_size']})")
    lines += [
        f"  norm        mean {norm['mean']:.4g}, rms {norm['rms']:.4g}, median "
        f"{norm['median']:.4g}, p99 {norm['p99']:.4g}"
        + (f" (of {norm['quantile_tokens']:,} tokens evenly spaced)"
           if norm["quantile_tokens"] < summary["tokens"] else ""),
        f"              min {norm['min']:.4g}, max {norm['max']:.4g} "
        + (f"({norm['max_over_median']:.4g}x the median)"
           if norm["max_over_median"] is not None else "(the median is 0)"),
    ]
    if summary.get("unlisted"):
        listed_in = MANIFEST if summary["format"] == "shards" else STATE
        lines.append(f"  unlisted    {', '.join(summary['unlisted'])} (not in {listed_in}: "
                     "never read)")
    source = summary.get("source") or {}
    if source:
        lines.append("  source      " + ", ".join(f"{k}={v}" for k, v in source.items()))
    return "\n".join(lines)
