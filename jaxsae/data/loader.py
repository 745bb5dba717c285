"""Shuffled batches from a token source, with a position that fits in one integer.

The order is a pure function of (seed, position), which is what makes resumption exact:

* the training tokens are cut into chunks of `chunk_tokens` contiguous tokens;
* epoch e visits the chunks in a seeded random order; consecutive chunks of that order are
  grouped into windows of about `buffer_tokens` tokens (the shuffle buffer), so one window mixes
  tokens from many places in many shards;
* each window is read with large sequential reads and its tokens are permuted (seeded by
  epoch and window);
* the stream is the concatenation of the windows of epochs 0, 1, 2, ...; batch b is tokens
  [b·B, (b+1)·B) of it.

The checkpointed position is the number of tokens consumed: a restarted loader recomputes the
window that holds it and continues with exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np


class TokenSource(Protocol):
    """What the loader reads from (a `ShardSet`, a SAELens cache, ...)."""

    @property
    def d_in(self) -> int: ...

    @property
    def n_tokens(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class Loader:
    def __init__(
        self,
        source: TokenSource,
        *,
        batch_size: int,
        buffer_tokens: int,
        seed: int,
        stop: int | None = None,
        position: int = 0,
        chunk_tokens: int | None = None,
    ):
        """Batches of `batch_size` tokens from tokens [0, stop) of `source`, from `position` on."""
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.n_tokens = source.n_tokens if stop is None else stop
        if self.n_tokens <= 0:
            raise ValueError("the loader has no tokens to read")
        # Chunks are large enough for sequential reads, small enough that a window mixes many.
        self.chunk_tokens = chunk_tokens or int(np.clip(buffer_tokens // 64, 256, 8192))
        self.chunks_per_window = max(1, buffer_tokens // self.chunk_tokens)
        starts = np.arange(0, self.n_tokens, self.chunk_tokens)
        self._chunk_starts = starts
        self._chunk_sizes = np.minimum(starts + self.chunk_tokens, self.n_tokens) - starts
        self.position = position

    # -- the order ------------------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The chunk order of an epoch and the stream offsets where its windows start."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._chunk_starts))
        sizes = self._chunk_sizes[order]
        window_sizes = np.add.reduceat(sizes, np.arange(0, len(order), self.chunks_per_window))
        return order, np.concatenate([[0], np.cumsum(window_sizes)])

    def _read_window(self, epoch: int, window: int, order: np.ndarray) -> np.ndarray:
        chunks = order[window * self.chunks_per_window : (window + 1) * self.chunks_per_window]
        # Read in file order (sequential I/O), then shuffle in memory.
        parts = [self.source.read(int(self._chunk_starts[c]),
                                  int(self._chunk_starts[c] + self._chunk_sizes[c]))
                 for c in np.sort(chunks)]
        tokens = np.concatenate(parts)
        perm = np.random.default_rng([self.seed, epoch, window, 1]).permutation(len(tokens))
        return tokens[perm]

    def batches(self) -> Iterator[np.ndarray]:
        """Yields float32 [batch_size, d_in] forever, starting at `self.position`."""
        epoch, offset = divmod(self.position, self.n_tokens)
        pending: list[np.ndarray] = []
        pending_tokens = 0
        while True:
            order, window_starts = self._epoch_plan(epoch)
            window = int(np.searchsorted(window_starts, offset, side="right")) - 1
            while window < len(window_starts) - 1:
                tokens = self._read_window(epoch, window, order)
                tokens = tokens[offset - window_starts[window] :]
                offset = int(window_starts[window + 1])
                window += 1
                while len(tokens):
                    take = min(self.batch_size - pending_tokens, len(tokens))
                    pending.append(tokens[:take])
                    pending_tokens += take
                    tokens = tokens[take:]
                    if pending_tokens == self.batch_size:
                        batch = pending[0] if len(pending) == 1 else np.concatenate(pending)
                        pending, pending_tokens = [], 0
                        self.position += self.batch_size
                        yield batch
            epoch, offset = epoch + 1, 0

    def state(self) -> dict[str, Any]:
        """The checkpointable position (plus what must match for it to mean the same thing)."""
        return {"position": int(self.position), "seed": self.seed, "n_tokens": int(self.n_tokens),
                "batch_size": self.batch_size, "d_in": int(self.source.d_in)}


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
