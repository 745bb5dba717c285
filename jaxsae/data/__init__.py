"""Activation data: formats, the loader, and synthetic ground-truth generators."""

from __future__ import annotations

from pathlib import Path

from jaxsae.config import DataConfig
from jaxsae.data.generated import GeneratedSource, stream_spec
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


def open_source(cfg: DataConfig, *, train_tokens: int | None = None
                ) -> ArraySource | PairedSource | GeneratedSource:
    """Opens `cfg.path` in the format `cfg.format` names (`auto` detects it); with
    `cfg.target`, paired with the targets (a transcoder's data): two jaxsae shard directories
    paired shard by shard, or SAELens caches of the same tokens (one cache may hold both
    columns: `cfg.hook` and `cfg.target_hook`). With `cfg.stream`, the generated tokens of
    `cfg.generate`, sized for `train_tokens` training tokens unless it sets `tokens`."""
    if cfg.stream:
        if train_tokens is None:
            raise ValueError("streamed data is sized by the run: pass train_tokens")
        return GeneratedSource(stream_spec(cfg.generate, train_tokens, cfg.held_out))
    inputs = _open_one(cfg)
    if cfg.target is None:
        return inputs
    target = Path(cfg.target)
    if not target.exists():
        raise DataError(f"{target}: target directory does not exist (data.target, or --target)")
    if is_shard_dir(target):
        targets: ArraySource = ShardSet(target, check_finite=cfg.check_finite)
    elif is_saelens_cache(target):
        targets = SAELensCache(target, hook=cfg.target_hook,
                               key="data.target_hook or --target-hook",
                               check_finite=cfg.check_finite)
        if isinstance(inputs, SAELensCache) and (target.resolve() == inputs.path.resolve()
                                                 and targets.hook == inputs.hook):
            raise DataError(f"data.target_hook: {targets.hook!r} is also data.hook; a "
                            "transcoder maps one column of the cache to another")
        if isinstance(inputs, SAELensCache) and targets.context_size != inputs.context_size:
            raise DataError(f"{target}: sequences of {targets.context_size} tokens, but "
                            f"data.path's are {inputs.context_size}; the targets must be "
                            "paired row by row")
    else:
        raise DataError(f"{target}: not a recognised activation directory (data.target: a "
                        "jaxsae shard directory or a SAELens cache)")
    if cfg.target_hook is not None and not isinstance(targets, SAELensCache):
        raise DataError(f"data.target_hook or --target-hook: {target} is a jaxsae shard "
                        "directory (one activation per row); the key is for SAELens caches")
    if isinstance(targets, ShardSet) and target.resolve() == Path(cfg.path).resolve():
        # (fault testing: it trained a transcoder of x to x, exported as a skip transcoder)
        raise DataError(f"data.target {target}: is data.path; a transcoder maps the "
                        "activations to others (a generated transcoder's: DIR/target)")
    if isinstance(inputs, ShardSet) != isinstance(targets, ShardSet):
        raise DataError(f"{target}: data.path and data.target must be of one format (a shard "
                        "directory and a SAELens cache do not say that their rows pair up)")
    return PairedSource(inputs, targets, by_file=isinstance(inputs, ShardSet))


def _open_one(cfg: DataConfig) -> ArraySource:
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"{path}: data directory does not exist (data.path, or --data)")
    kind = detect_format(path) if cfg.format == "auto" else cfg.format
    if kind == "shards":
        if cfg.hook is not None:
            raise DataError(f"data.hook or --hook: {path} is a jaxsae shard directory (one "
                            "activation per row); a hook names a column of a SAELens cache")
        return ShardSet(path, check_finite=cfg.check_finite)
    return SAELensCache(path, hook=cfg.hook, check_finite=cfg.check_finite)
