"""Activation data: formats, the loader, and synthetic ground-truth generators."""

from __future__ import annotations

from pathlib import Path

from jaxsae.config import DataConfig
from jaxsae.data.shards import ShardSet, is_shard_dir
from jaxsae.errors import DataError


def open_source(cfg: DataConfig) -> ShardSet:
    """Opens `cfg.path` in the format `cfg.format` names (`auto` detects it)."""
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"{path}: data directory does not exist (data.path)")
    if cfg.format in ("auto", "shards"):
        if cfg.format == "auto" and not is_shard_dir(path):
            raise DataError(f"{path}: not a recognised activation directory (no manifest.json)")
        return ShardSet(path, check_finite=cfg.check_finite)
    raise DataError(f"data.format: unsupported format {cfg.format!r}")
