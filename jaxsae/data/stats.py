"""Statistics estimated before training: the median token norm (for dropping outliers such as
attention sinks) and the input scale of `normalize: unit_mean_squared_norm`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from jaxsae.config import DataConfig
from jaxsae.data.loader import KeepFn
from jaxsae.data.source import TokenSource, iter_blocks
from jaxsae.errors import ConfigError, DataError


@dataclass(frozen=True)
class DataStats:
    median_norm: float
    """Median L2 norm of the sampled tokens."""
    drop_above: float | None
    """Tokens with a larger norm are dropped (None: keep all)."""
    scale: float
    """Inputs are multiplied by this before the SAE (1.0 unless normalising)."""
    target_scale: float = 1.0
    """A transcoder's targets are multiplied by this (E‖y‖² = d_out when normalising)."""

    def keep_fn(self, d_in: int | None = None) -> KeepFn | None:
        """The filter of the tokens to train on; `d_in`: only the first d_in columns count (a
        transcoder's rows carry their targets after them)."""
        return None if self.drop_above is None else norm_filter(self.drop_above, d_in)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataStats:
        return cls(**raw)


def norm_filter(limit: float, d_in: int | None = None) -> KeepFn:
    """[n, width] rows -> [n] bool: whose norm (over the first `d_in` columns; None: all) is
    at most `limit`."""
    def keep(rows: np.ndarray) -> np.ndarray:
        x = rows if d_in is None else rows[:, :d_in]
        return np.einsum("nd,nd->n", x, x) <= limit * limit

    return keep


def sample_evenly(source: TokenSource, stop: int, n: int, pieces: int = 64, *,
                  start: int = 0) -> np.ndarray:
    """About n tokens from `pieces` evenly spaced places in [start, stop) (sequential reads)."""
    return np.concatenate([source.read(s, s + per)
                           for s, per in _sample_reads(stop, n, pieces, start)])


def _sample_reads(stop: int, n: int, pieces: int, start: int) -> list[tuple[int, int]]:
    """(first token, count) of each of `sample_evenly`'s reads, in order."""
    span = stop - start
    if n >= span:  # all of them (pieces of n // pieces tokens would leave up to pieces - 1
        return [(start, span)]  # out, half of a window under 2·pieces: fault testing)
    per = max(1, n // pieces)
    starts = start + np.linspace(0, span - per, num=min(pieces, max(1, span // per)),
                                 dtype=np.int64)
    return [(int(s), per) for s in starts]


def estimate(source: TokenSource, stop: int, cfg: DataConfig, *,
             skip_nonfinite: bool = False) -> DataStats:
    """Median norm, outlier threshold and scale from tokens spread over the training range.
    A sampled token with a NaN / inf is refused, naming its file and row (it would make the
    median and the scale meaningless), unless `skip_nonfinite` (the run skips the steps such
    tokens reach): then the statistics are those of the finite tokens. A sample beyond the
    host's memory is refused naming data.stats_tokens (fault testing: the error named
    sae.d_sae and optim.batch_size, which do not size it)."""
    try:
        return _estimate(source, stop, cfg, skip_nonfinite=skip_nonfinite)
    except MemoryError as e:
        sampled = min(cfg.stats_tokens, stop)
        raise ConfigError(f"data.stats_tokens: {sampled:,} tokens sampled for the data's "
                          f"statistics need more memory than this machine has ({e}); the "
                          f"default, {DataConfig.stats_tokens:,}, estimates the median norm "
                          "and the scale well"
                          ) from None


def _estimate(source: TokenSource, stop: int, cfg: DataConfig, *,
              skip_nonfinite: bool) -> DataStats:
    # Tokens drawn independently (generated data) are sampled as well by one range.
    pieces = 1 if getattr(source, "iid", False) else 64
    rows = sample_evenly(source, stop, cfg.stats_tokens, pieces=pieces)
    finite = np.isfinite(rows).all(axis=1)
    sampled = np.flatnonzero(finite)  # (the finite rows' places in the sample)
    if not finite.all():
        if not skip_nonfinite:
            raise DataError(f"{_where(source, stop, cfg, pieces, int(np.argmin(finite)))}: "
                            "NaN or inf in a token sampled for the data's statistics (median "
                            "norm, scale); repair the data, or set optim.skip_nonfinite: true "
                            "to skip the steps such tokens reach")
        if not finite.any():
            raise DataError(f"{cfg.path or 'the data'}: every token sampled for the data's "
                            "statistics holds a NaN or inf")
        rows = rows[finite]
    tokens, targets = rows[:, :source.d_in], rows[:, source.d_in:]  # a transcoder's pairs
    norms = np.linalg.norm(tokens.astype(np.float64), axis=1)
    if not norms.any():  # (an SAE trained on it learns nothing, and reported success)
        raise DataError(f"{cfg.path or 'the data'}: every one of the {len(norms):,} tokens "
                        "sampled for the data's statistics is all zeros: nothing to train on "
                        "(float16 shards of small activations underflow to 0; check the data "
                        "with jaxsae data inspect)")
    median = float(np.median(norms))
    if cfg.drop_norm_above is not None and not median > 0:
        raise DataError(f"data.drop_norm_above: the median token norm of {cfg.path or 'the data'} "
                        "is 0 (most tokens are zero), so every non-zero token would be dropped; "
                        "unset it (data.drop_norm_above: null)")
    drop_above = None if cfg.drop_norm_above is None else cfg.drop_norm_above * median
    kept = np.ones(len(norms), bool) if drop_above is None else norms <= drop_above
    # (fault testing: such data trained in normalised units, then its evaluation in raw ones
    # overflowed and was reported as a diverged training, advising a lower learning rate)
    for what, values in (("token", tokens), ("target", targets)):
        if not values.shape[1]:
            continue
        sizes = np.linalg.norm(values.astype(np.float64), axis=1)
        over = np.flatnonzero(kept & (sizes >= OVERFLOW_NORM))
        if len(over):
            files = source.targets if what == "target" else source  # (its own file named)
            raise DataError(
                f"{_where(files, stop, cfg, pieces, int(sampled[over[0]]))}: a {what} of norm "
                f"{sizes[over[0]]:.3g}, whose square overflows float32 (norms from "
                f"{OVERFLOW_NORM:.3g}): the errors on such tokens are inf; rescale the data"
                + ("" if what == "target" else
                   " (or leave such tokens out with data.drop_norm_above)"))
    scale = target_scale = 1.0
    if cfg.normalize == "unit_mean_squared_norm":
        scale = _unit_scale(np.square(norms[kept]), source.d_in)
        if targets.shape[1]:
            y = targets[kept].astype(np.float64)
            target_scale = _unit_scale(np.sum(np.square(y), axis=1), targets.shape[1])
    return DataStats(median_norm=median, drop_above=drop_above, scale=scale,
                     target_scale=target_scale)


OVERFLOW_NORM = float(np.sqrt(np.finfo(np.float32).max))
"""A token of this norm or more has a squared norm beyond float32's range."""


def check_held_out(source: TokenSource, start: int, cfg: DataConfig) -> None:
    """Refuses, before training, held-out tokens [start, n_tokens) the evaluation at the end
    of the run would refuse or overflow on: NaN / inf, or (unless data.drop_norm_above
    leaves such tokens out) a norm whose square is beyond float32, naming the file and row
    (fault testing: either failed the run after its last step, the second as a divergence)."""
    n = source.n_tokens
    where = (f"among the {n - start:,} token{'s' if n - start != 1 else ''} held out for the "
             "evaluation at the end of the run; checked before training")
    blocks, lo = iter_blocks(source, 8192, start, n), start
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            return
        except DataError as e:  # (NaN / inf, its file and rows named)
            raise DataError(f"{e} ({where})") from None
        for files, values in ((source, block[:, :source.d_in]),
                              (getattr(source, "targets", None), block[:, source.d_in:])):
            if not values.shape[1] or cfg.drop_norm_above is not None:
                continue
            big = np.flatnonzero(np.linalg.norm(values.astype(np.float64), axis=1)
                                 >= OVERFLOW_NORM)
            if len(big):
                name, row = files.locate(lo + int(big[0]))
                raise DataError(f"{name}: row {row}: a norm whose square overflows float32 "
                                f"(from {OVERFLOW_NORM:.3g}; {where}): the evaluation's errors "
                                "on it would be inf; rescale the data, or leave such tokens "
                                "out with data.drop_norm_above")
        lo += len(block)


def check_held_out_kept(source: TokenSource, start: int, stats: DataStats) -> None:
    """Refuses, before training, held-out tokens [start, n_tokens) every one of which
    data.drop_norm_above leaves out (`stats.drop_above`): the evaluation at the end of the
    run would have none to evaluate (fault testing: it refused after the last step, and on
    every rerun; e.g. the last tokens of the data being another cache's, of larger norms)."""
    if stats.drop_above is None or start >= source.n_tokens:
        return
    keep = stats.keep_fn(source.d_in)
    for block in iter_blocks(source, 8192, start):
        if keep(block).any():
            return
    n = source.n_tokens - start
    raise ConfigError(f"data.drop_norm_above: every one of the {n:,} token{'s' if n > 1 else ''} "
                      f"held out for the evaluation at the end of the run (data.eval_tokens) "
                      f"has a norm above {stats.drop_above:.4g} (that multiple of the median "
                      f"norm, {stats.median_norm:.4g}), so none would be left to evaluate; "
                      "checked before training: hold out more tokens, or set a larger multiple")


def _where(source: TokenSource, stop: int, cfg: DataConfig, pieces: int, row: int) -> str:
    """The file and row of the `row`-th token `estimate` sampled."""
    for first, per in _sample_reads(stop, cfg.stats_tokens, pieces, 0):
        if row < per:
            locate = getattr(source, "locate", None)
            if locate is None:
                return f"{cfg.path or 'the data'}: token {first + row}"
            name, at = locate(first + row)
            return f"{name}: row {at}"
        row -= per
    raise AssertionError("a sampled row outside the sample")


def _unit_scale(squared_norms: np.ndarray, width: int) -> float:
    """The factor that makes the mean squared norm `width` (1.0 for no or all-zero rows)."""
    mean_sq = float(np.mean(squared_norms)) if len(squared_norms) else 0.0
    return float(np.sqrt(width / mean_sq)) if mean_sq > 0 else 1.0
