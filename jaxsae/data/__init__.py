"""Activation data: formats, the loader, and synthetic ground-truth generators."""

from __future__ import annotations

from pathlib import Path

from jaxsae.config import DataConfig
from jaxsae.data.saelens import SAELensCache, is_saelens_cache
from jaxsae.data.shards import ShardSet, is_shard_dir
from jaxsae.data.source import ArraySource
from jaxsae.errors import DataError


def detect_format(path: Path) -> str:
    if is_shard_dir(path):
        return "shards"
    if is_saelens_cache(path):
        return "saelens"
    raise DataError(f"{path}: not a recognised activation directory (no manifest.json, and "
                    "no dataset_info.json + state.json of a SAELens cache)")


def open_source(cfg: DataConfig) -> ArraySource:
    """Opens `cfg.path` in the format `cfg.format` names (`auto` detects it)."""
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"{path}: data directory does not exist (data.path)")
    kind = detect_format(path) if cfg.format == "auto" else cfg.format
    if kind == "shards":
        return ShardSet(path, check_finite=cfg.check_finite)
    return SAELensCache(path, hook=cfg.hook, check_finite=cfg.check_finite)
