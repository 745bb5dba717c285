"""Shuffled batches from a token source, reproducible from a small position.

The order is a pure function of the seed and the data:

* the training tokens are cut into chunks of `chunk_tokens` contiguous tokens, and chunk c
  belongs to lane c mod L (`lanes`), so every lane draws from the whole data set;
* each lane visits its chunks in a seeded random order per epoch, grouped into windows of
  about `buffer_tokens / L` tokens (the shuffle buffer); a window is read with sequential
  reads, optionally filtered (`keep`), and its tokens are permuted (seeded by lane, epoch and
  window); the next window is read in the background while this one is served;
* rows [l·B/L, (l+1)·B/L) of every batch come from lane l.

So a batch does not depend on how many processes read it: with P processes (P dividing L),
process p owns lanes [p·L/P, (p+1)·L/P), reads only their chunks, and produces exactly its
rows of every global batch. The position is (epoch, window, offset) per lane; a restarted
loader reads the window that holds it and continues with exactly the same batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxsae.data.source import TokenSource
from jaxsae.errors import DataError

KeepFn = Callable[[np.ndarray], np.ndarray]
"""[n, d_in] float32 tokens -> [n] bool: which tokens to keep."""


class Loader:
    def __init__(
        self,
        source: TokenSource,
        *,
        batch_size: int,
        buffer_tokens: int,
        seed: int,
        stop: int | None = None,
        lanes: int = 1,
        owned_lanes: Sequence[int] | None = None,
        keep: KeepFn | None = None,
        position: dict[str, Any] | None = None,
        chunk_tokens: int | None = None,
    ):
        """Batches of `batch_size` tokens (this process's rows of them when it owns only some
        lanes) from tokens [0, stop) of `source`, from `position` on (None: the start)."""
        if batch_size % lanes:
            raise ValueError(f"batch size {batch_size} is not divisible by {lanes} lanes")
        self.source = source
        # A source's rows: d_in wide, or a transcoder's pairs (`width`); sources written
        # before paired data have no `width` and hold inputs alone.
        self.width = getattr(source, "width", source.d_in)
        self.batch_size = batch_size
        self.lanes = lanes
        self.owned = list(range(lanes) if owned_lanes is None else owned_lanes)
        self.per_lane = batch_size // lanes
        self.seed = seed
        self.keep = keep
        self.n_tokens = source.n_tokens if stop is None else stop
        lane_buffer = max(1, buffer_tokens // lanes)
        preferred = getattr(source, "chunk_tokens", None)  # generated data: whole blocks
        if chunk_tokens is None and preferred:
            chunk_tokens = preferred
            while chunk_tokens > 1 and self.n_tokens // chunk_tokens < 4 * lanes:
                chunk_tokens //= 2
        # Chunks long enough for sequential reads, short enough that a window mixes many and,
        # on small data, that every lane gets several.
        self.chunk_tokens = chunk_tokens or max(1, min(int(np.clip(lane_buffer // 16, 256, 8192)),
                                                       self.n_tokens // (4 * lanes)))
        self.chunks_per_window = max(1, lane_buffer // self.chunk_tokens)
        starts = np.arange(0, self.n_tokens, self.chunk_tokens)
        if len(starts) < lanes:
            raise ValueError(f"{self.n_tokens} tokens make {len(starts)} chunks of "
                             f"{self.chunk_tokens}, fewer than the {lanes} lanes")
        self._chunk_starts = starts
        self._chunk_stops = np.minimum(starts + self.chunk_tokens, self.n_tokens)
        self._lane_chunks = [np.arange(lane, len(starts), lanes) for lane in range(lanes)]
        # Per lane, the tokens `keep` left out of the windows the lane has served from (its
        # current one included): part of the position, so exact on resume. A position saved
        # without it (an older checkpoint) leaves it unknown (None) for the rest of the run.
        self.dropped: dict[int, int] | None = {lane: 0 for lane in self.owned}
        if position is None:
            self.position = {lane: (0, 0, 0) for lane in self.owned}
        else:
            saved = position["lanes"]
            if len(saved) != lanes or any(saved[lane] is None for lane in self.owned):
                raise ValueError(f"the saved position has no entry for lanes {self.owned}")
            self.position = {lane: tuple(saved[lane]) for lane in self.owned}
            counts = position.get("dropped")
            self.dropped = (None if counts is None or len(counts) != lanes
                            else {lane: int(counts[lane]) for lane in self.owned})
        self._pool = ThreadPoolExecutor(max_workers=min(4, len(self.owned)),
                                        thread_name_prefix="jaxsae-window")

    # -- the order ------------------------------------------------------------------------

    def windows_per_epoch(self, lane: int) -> int:
        return -(-len(self._lane_chunks[lane]) // self.chunks_per_window)

    def _read_window(self, lane: int, epoch: int, window: int) -> _Window:
        order = np.random.default_rng([self.seed, lane, epoch]).permutation(
            self._lane_chunks[lane])
        chunks = np.sort(order[window * self.chunks_per_window :
                               (window + 1) * self.chunks_per_window])
        # Views of the chunks in file order (no copy for float32 data within one file).
        parts = [self.source.read(int(self._chunk_starts[c]), int(self._chunk_stops[c]))
                 for c in chunks]
        starts = np.cumsum([0] + [len(p) for p in parts])
        if self.keep is None:
            rows = None
            n = int(starts[-1])
        else:
            kept = [np.flatnonzero(self.keep(p)) + s for p, s in zip(parts, starts, strict=False)]
            rows = np.concatenate(kept)
            n = len(rows)
        perm = np.random.default_rng([self.seed, lane, epoch, window, 1]).permutation(n)
        return _Window(parts, starts, perm if rows is None else rows[perm],
                       dropped=int(starts[-1]) - n)

    def _next_window(self, lane: int, epoch: int, window: int) -> tuple[int, int]:
        window += 1
        return (epoch + 1, 0) if window >= self.windows_per_epoch(lane) else (epoch, window)

    def _lane_pieces(self, lane: int) -> Iterator[tuple[list, tuple[int, int, int], int]]:
        """Pieces of `per_lane` rows of one lane as [(window, row indices), ...] segments
        (a piece may span windows), each with the lane position after it and the tokens
        dropped from the windows served from so far (0 when not counted: see `dropped`)."""
        epoch, window, offset = self.position[lane]
        dropped = 0 if self.dropped is None else self.dropped[lane]
        counted = offset > 0  # a position inside a window: counted when it was entered
        ahead = self._pool.submit(self._read_window, lane, epoch, window)
        segments: list[tuple[_Window, np.ndarray]] = []
        have = empty = 0  # (empty: windows in a row of which `keep` kept no token)
        while True:
            current = ahead.result()
            if not counted:
                dropped += current.dropped
            counted = False
            empty = 0 if len(current.order) else empty + 1
            if empty >= self.windows_per_epoch(lane):  # (fault testing: it read on for ever)
                chunks = len(self._lane_chunks[lane])
                raise DataError(
                    f"data.drop_norm_above leaves out every training token of lane {lane} of "
                    f"{self.lanes} (data.lanes: its {chunks} chunk{'s' if chunks > 1 else ''} "
                    f"of {self.chunk_tokens} tokens, every {self.lanes}th of the data), which "
                    "has no row to give a batch: a larger multiple, or fewer lanes")
            upcoming = self._next_window(lane, epoch, window)
            ahead = self._pool.submit(self._read_window, lane, *upcoming)
            while offset < len(current.order):
                take = min(self.per_lane - have, len(current.order) - offset)
                segments.append((current, current.order[offset : offset + take]))
                have += take
                offset += take
                if have == self.per_lane:
                    yield segments, (epoch, window, offset), dropped
                    segments, have = [], 0
            (epoch, window), offset = upcoming, 0

    def batches(self) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        """Yields (float32 [rows, d_in], position after it) forever: rows is batch_size times
        the fraction of lanes this loader owns. Pass the position back to resume."""
        streams = [self._lane_pieces(lane) for lane in self.owned]
        rows = self.per_lane * len(self.owned)
        while True:
            batch = _aligned_empty((rows, self.width))
            at = 0
            positions, dropped = [], []
            for stream in streams:
                segments, position, lane_dropped = next(stream)
                for window, index in segments:
                    at = window.gather(index, batch, at)
                positions.append(position)
                dropped.append(lane_dropped)
            self.position = dict(zip(self.owned, positions, strict=True))
            if self.dropped is not None:
                self.dropped = dict(zip(self.owned, dropped, strict=True))
            yield batch, self.state()

    def state(self) -> dict[str, Any]:
        """The checkpointable position, plus what must match for it to mean the same thing."""
        lanes = [list(self.position[lane]) if lane in self.position else None
                 for lane in range(self.lanes)]
        sampler = getattr(self.source, "sampler", None)  # generated data: which draws
        counts = ({} if self.dropped is None or self.keep is None else
                  {"dropped": [self.dropped.get(lane) for lane in range(self.lanes)]})
        return {"lanes": lanes, **counts,
                "seed": self.seed, "n_tokens": int(self.n_tokens), "batch_size": self.batch_size,
                "n_lanes": self.lanes, "d_in": int(self.source.d_in),
                "d_out": int(getattr(self.source, "d_out", 0)),
                **({"sampler": sampler} if sampler is not None else {})}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Window:
    """A window: views of its chunks in file order, and the order its rows are served in."""

    def __init__(self, parts: list[np.ndarray], starts: np.ndarray, order: np.ndarray,
                 dropped: int = 0):
        self.parts, self.starts, self.order = parts, starts, order
        self.dropped = dropped
        """Tokens of its chunks the `keep` filter left out."""

    def gather(self, index: np.ndarray, out: np.ndarray, at: int) -> int:
        """Copies rows `index` into out[at:], sorted by position in the files (near-sequential
        reads, one take per chunk, straight from the page cache); returns the next free row."""
        index = np.sort(index)
        bounds = np.searchsorted(index, self.starts)
        for part, start, lo, hi in zip(self.parts, self.starts, bounds[:-1], bounds[1:],
                                       strict=False):
            if hi == lo:
                continue
            local = index[lo:hi] - start
            rows = out[at : at + hi - lo]
            if part.dtype == np.float32:
                np.take(part, local, axis=0, out=rows, mode="clip")  # "raise" buffers `out`
            else:
                with np.errstate(over="ignore"):  # (float64 beyond float32: inf, as read)
                    rows[:] = part[local]
            at += hi - lo
        return at


def _aligned_empty(shape: tuple[int, int], align: int = 64) -> np.ndarray:
    """An uninitialised float32 array whose data is `align`-byte aligned. On the CPU backend
    JAX then adopts the buffer without a copy (the batch is never written after it is handed
    over, so sharing it is safe); on accelerators it is copied to the device as usual."""
    nbytes = shape[0] * shape[1] * 4
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(np.float32).reshape(shape)


def dropped_tokens(position: dict[str, Any]) -> int | None:
    """The tokens left out by the filter in the windows served from up to `position` (a
    loader state, every lane filled in: see `Loader.state`), summed over the lanes; None when
    the position does not carry the count (saved by a jaxsae before it did)."""
    counts = position.get("dropped")
    if counts is None or any(c is None for c in counts):
        return None
    return int(sum(counts))


def lanes_of_process(lanes: int, process: int, processes: int) -> list[int]:
    """The contiguous block of lanes process `process` of `processes` reads."""
    if lanes % processes:
        raise ValueError(f"{processes} processes do not divide {lanes} lanes")
    per = lanes // processes
    return list(range(process * per, (process + 1) * per))


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead, applying `transform`
    (e.g. the host-to-device transfer), so the consumer never waits when the producer keeps up."""

    _DONE = object()

    def __init__(self, items: Iterator[Any], *, depth: int = 2,
                 transform: Callable[[Any], Any] = lambda x: x):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(items, transform), daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        """Blocks until there is room, unless the consumer closed us; False if closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items, transform):
        try:
            for item in items:
                if not self._put(transform(item)):
                    return
            self._put(self._DONE)
        except BaseException as e:  # re-raised in the consumer
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished is not None:  # after the end or an error, keep answering the same
            raise self._finished
        item = self._queue.get()
        if item is self._DONE:
            self._finished = StopIteration()
            raise self._finished
        if isinstance(item, BaseException):
            self._finished = item
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
