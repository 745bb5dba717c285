"""Activation data: formats, the loader, and synthetic ground-truth generators."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxsae.config import DataConfig
from jaxsae.data.generated import GeneratedSource, stream_spec
from jaxsae.data.saelens import SAELensCache, activation_columns, is_saelens_cache
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
    if isinstance(targets, ShardSet) and isinstance(inputs, ShardSet):
        # (fault testing: a target directory of links to data.path's shards trained a
        # transcoder of x to x too)
        for x, y in zip(inputs.names, targets.names, strict=False):
            if os.path.samefile(x, y):
                raise DataError(f"data.target {y}: the same file as data.path's {x} (a "
                                "link); a transcoder maps the activations to others")
    if isinstance(inputs, ShardSet) != isinstance(targets, ShardSet):
        raise DataError(f"{target}: data.path and data.target must be of one format (a shard "
                        "directory and a SAELens cache do not say that their rows pair up)")
    return PairedSource(inputs, targets, by_file=isinstance(inputs, ShardSet))


def open_for_saes(path: str | Path, hook: str | None, saes: Sequence[Any], *,
                  whose: str = "the SAE's", note: bool = True, **more: Any
                  ) -> ArraySource | PairedSource:
    """The data `saes` (loaded SAEs: their `cfg_json` and `d_in`) are evaluated or analysed
    on, refused if it is not `d_in` wide (`whose` d_in, in the message); `more`: other
    DataConfig keys (a transcoder's target). Without `hook`, a SAELens cache of several
    activation columns is read at the column their cfg.json names (metadata.hook_name; fault
    testing: such a cache was refused, asking for the --hook the SAE's own file names); a
    column other than that one is said on stderr with `note` (a comparison across layers
    may be meant, but unsaid it reads as the SAE's own)."""
    named = {(s.cfg_json.get("metadata") or {}).get("hook_name") for s in saes}
    trained = next(iter(named)) if len(named) == 1 else None
    if (hook is None and isinstance(trained, str)
            and trained in (columns := activation_columns(path)) and len(columns) > 1):
        hook = trained
    source = open_source(DataConfig(path=str(path), hook=hook, **more))
    read = column_of(source)
    if note and read is not None and isinstance(trained, str) and read != trained:
        print(f"note: {path}: reading the column {read}; the "
              f"{'SAEs were' if len(saes) > 1 else 'SAE was'} trained on {trained} "
              "(cfg.json's metadata.hook_name)", file=sys.stderr)
    if source.d_in != saes[0].d_in:
        raise DataError(f"{path}: d_in {source.d_in} does not match {whose} d_in "
                        f"{saes[0].d_in}")
    return source


def column_of(source: ArraySource | PairedSource) -> str | None:
    """The SAELens cache column `source` reads (a transcoder's: its inputs'); None for jaxsae
    shards."""
    inputs = getattr(source, "inputs", source)
    return inputs.hook if isinstance(inputs, SAELensCache) else None


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
