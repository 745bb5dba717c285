"""Activation data: formats, the loader, and synthetic ground-truth generators."""

from __future__ import annotations

from pathlib import Path

from jaxsae.config import DataConfig
from jaxsae.data.saelens import SAELensCache, is_saelens_cache
from jaxsae.data.shards import ShardSet, is_shard_dir
from jaxsae.data.source import ArraySource, PairedSource
from jaxsae.errors import DataError


def detect_format(path: Path) -> str:
    if is_shard_dir(path):
        return "shards"
    if is_saelens_cache(path):
        return "saelens"
    raise DataError(f"{path}: not a recognised activation directory (no manifest.json, and "
                    "no dataset_info.json + state.json of a SAELens cache)")


def open_source(cfg: DataConfig) -> ArraySource | PairedSource:
    """Opens `cfg.path` in the format `cfg.format` names (`auto` detects it); with
    `cfg.target`, paired with the targets (a transcoder's data)."""
    inputs = _open_one(cfg)
    if cfg.target is None:
        return inputs
    target = Path(cfg.target)
    if not target.exists():
        raise DataError(f"{target}: target directory does not exist (data.target)")
    if not isinstance(inputs, ShardSet) or not is_shard_dir(target):
        raise DataError(f"{target if isinstance(inputs, ShardSet) else cfg.path}: transcoders "
                        "read jaxsae shard directories for data.path and data.target (not "
                        "SAELens caches)")
    return PairedSource(inputs, ShardSet(target, check_finite=cfg.check_finite))


def _open_one(cfg: DataConfig) -> ArraySource:
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"{path}: data directory does not exist (data.path)")
    kind = detect_format(path) if cfg.format == "auto" else cfg.format
    if kind == "shards":
        return ShardSet(path, check_finite=cfg.check_finite)
    return SAELensCache(path, hook=cfg.hook, check_finite=cfg.check_finite)
