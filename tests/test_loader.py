"""The shuffled loader (coverage, mixing, exact resumption) and the background Prefetcher."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from jaxsae.data.loader import Loader, Prefetcher
from jaxsae.data.shards import ShardSet, ShardWriter


class IndexSource:
    """An in-memory token source whose row i is [i, -i, i / 2]: column 0 identifies the token."""

    def __init__(self, n_tokens: int):
        self._n = n_tokens
        self.reads: list[tuple[int, int]] = []

    @property
    def d_in(self) -> int:
        return 3

    @property
    def n_tokens(self) -> int:
        return self._n

    def read(self, start: int, stop: int) -> np.ndarray:
        assert 0 <= start < stop <= self._n
        self.reads.append((start, stop))
        i = np.arange(start, stop, dtype=np.float32)
        return np.stack([i, -i, i / 2], axis=1)


B = 32
CHUNK = 16
BUFFER = 128  # 8 chunks per window = 4 batches


def make_loader(n_tokens=960, *, seed=0, position=0, stop=None, source=None) -> Loader:
    source = source or IndexSource(n_tokens)
    return Loader(source, batch_size=B, buffer_tokens=BUFFER, seed=seed, stop=stop,
                  position=position, chunk_tokens=CHUNK)


def ids(batch: np.ndarray) -> np.ndarray:
    return batch[:, 0].astype(np.int64)


def take(loader: Loader, n: int) -> list[np.ndarray]:
    return list(itertools.islice(loader.batches(), n))


def stream(loader: Loader, n_batches: int) -> np.ndarray:
    """Token ids of the first n_batches batches, concatenated."""
    return np.concatenate([ids(b) for b in take(loader, n_batches)])


def test_batches_are_well_formed():
    for batch in take(make_loader(), 5):
        assert batch.shape == (B, 3)
        assert batch.dtype == np.float32
        i = batch[:, 0]
        np.testing.assert_array_equal(batch[:, 1], -i)  # rows stay intact through the shuffle
        np.testing.assert_array_equal(batch[:, 2], i / 2)


def test_each_epoch_covers_every_token_once():
    n = 960  # 30 batches per epoch
    s = stream(make_loader(n), 90)
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(s[epoch * n : (epoch + 1) * n]), np.arange(n))


def test_order_differs_between_epochs_and_seeds_and_repeats_for_a_seed():
    n = 960
    a = stream(make_loader(n, seed=0), 60)
    again = stream(make_loader(n, seed=0), 60)
    other = stream(make_loader(n, seed=1), 60)
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a[:n], a[n:])
    assert not np.array_equal(a[:n], other[:n])
    # Shuffled, not merely rotated: far from the identity order.
    assert np.mean(a[:n] == np.arange(n)) < 0.05


def test_tokens_from_many_chunks_are_mixed_within_a_batch():
    for batch in take(make_loader(960), 30):
        i = np.sort(ids(batch))
        assert len(np.unique(i // CHUNK)) >= 3  # a window's 8 chunks are interleaved
        assert not np.array_equal(i, np.arange(i[0], i[0] + B))  # not a contiguous run


def test_tokens_from_different_shards_are_mixed(tmp_path):
    n, d = 1024, 2
    data = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    with ShardWriter(tmp_path / "set", d, shard_tokens=256) as writer:  # 4 shards
        writer.write(data)
    shards = ShardSet(tmp_path / "set")
    loader = Loader(shards, batch_size=64, buffer_tokens=256, seed=0, chunk_tokens=32)
    batches = take(loader, n // 64)
    np.testing.assert_array_equal(np.sort(np.concatenate([ids(b) for b in batches])),
                                  np.arange(n))
    n_shards_per_batch = [len(np.unique(ids(b) // 256)) for b in batches]
    assert min(n_shards_per_batch) >= 2


def test_reads_are_whole_chunks_in_file_order():
    source = IndexSource(960)
    take(make_loader(source=source), 4)  # exactly one window
    assert len(source.reads) == BUFFER // CHUNK
    starts = [s for s, _ in source.reads]
    assert starts == sorted(starts)
    assert all(s % CHUNK == 0 and e - s == CHUNK for s, e in source.reads)


@pytest.mark.parametrize(("k", "where"), [
    (1, "inside the first window"),
    (6, "inside a later window"),
    (4, "at a window boundary"),
    (8, "at a window boundary"),
    (29, "the last batch of the epoch"),
    (30, "at the epoch boundary"),
    (33, "inside the second epoch"),
])
def test_resume_matches_uninterrupted_run(k, where):
    reference = take(make_loader(960), 40)
    resumed = make_loader(960, position=k * B)
    for got, want in zip(take(resumed, 40 - k), reference[k:], strict=True):
        np.testing.assert_array_equal(got, want, err_msg=where)


def test_state_reports_the_position_to_resume_from():
    loader = make_loader(960)
    it = loader.batches()
    for _ in range(7):
        next(it)
    state = loader.state()
    assert state == {"position": 7 * B, "seed": 0, "n_tokens": 960, "batch_size": B, "d_in": 3}
    after = [next(it) for _ in range(5)]
    resumed = take(make_loader(960, position=state["position"]), 5)
    for got, want in zip(resumed, after, strict=True):
        np.testing.assert_array_equal(got, want)


def test_batches_span_the_epoch_boundary():
    n = 1000  # not a multiple of 32, nor of the chunk size: the last chunk has 8 tokens
    s = stream(make_loader(n), 63)  # 2016 tokens
    np.testing.assert_array_equal(np.sort(s[:n]), np.arange(n))
    np.testing.assert_array_equal(np.sort(s[n : 2 * n]), np.arange(n))
    # Batch 31 = stream [992, 1024): the 8 epoch-0 tokens not yet seen, then 24 of epoch 1.
    batch31 = s[31 * B : 32 * B]
    np.testing.assert_array_equal(np.sort(batch31[:8]), np.setdiff1d(np.arange(n), s[: 31 * B]))
    np.testing.assert_array_equal(batch31[8:], s[n : n + 24])


@pytest.mark.parametrize("k", [30, 31, 32, 40])
def test_resume_across_a_batch_that_spans_the_epoch_boundary(k):
    n = 1000
    reference = take(make_loader(n), 45)
    resumed = take(make_loader(n, position=k * B), 45 - k)
    for got, want in zip(resumed, reference[k:], strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("position", [5, 127, 129, 999, 1003])
def test_any_position_continues_the_same_stream(position):
    n = 1000
    s = stream(make_loader(n), 40)
    resumed = stream(make_loader(n, position=position), 2)
    np.testing.assert_array_equal(resumed, s[position : position + 2 * B])


def test_stop_excludes_the_held_out_tail():
    source = IndexSource(1000)
    loader = make_loader(source=source, stop=800)
    assert loader.n_tokens == 800
    s = stream(loader, 50)  # exactly two epochs of 800
    assert s.max() < 800
    np.testing.assert_array_equal(np.sort(s[:800]), np.arange(800))
    np.testing.assert_array_equal(np.sort(s[800:]), np.arange(800))
    assert max(stop for _, stop in source.reads) <= 800


def test_empty_loader_is_refused():
    with pytest.raises(ValueError, match="no tokens"):
        make_loader(100, stop=0)


# ---------------------------------------------------------------------------------------------
# Prefetcher


def test_prefetcher_yields_items_in_order():
    items = [np.full(3, i) for i in range(20)]
    got = list(Prefetcher(iter(items), depth=3))
    assert len(got) == 20
    for a, b in zip(got, items, strict=True):
        np.testing.assert_array_equal(a, b)


def test_prefetcher_applies_transform():
    seen = []

    def transform(x):
        seen.append(threading.current_thread())
        return x * 10

    got = list(Prefetcher(iter(range(7)), transform=transform))
    assert got == [0, 10, 20, 30, 40, 50, 60]
    assert all(t is not threading.main_thread() for t in seen)  # in the background thread


def test_prefetcher_reraises_producer_exception():
    def produce():
        yield 1
        yield 2
        raise KeyError("producer failed")

    it = Prefetcher(produce())
    assert next(it) == 1
    assert next(it) == 2
    with pytest.raises(KeyError, match="producer failed"):
        next(it)


def test_prefetcher_reraises_transform_exception():
    def transform(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x

    it = Prefetcher(iter(range(10)), transform=transform)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)


def test_prefetcher_close_stops_the_thread():
    produced = []

    def produce():
        for i in itertools.count():
            produced.append(i)
            yield i

    it = Prefetcher(produce(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not it._thread.is_alive()
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count
    assert count <= 3 + 2 + 2  # consumed + queue depth + at most one pending item (and its next)


def test_prefetcher_close_stops_an_exhausted_producer():
    it = Prefetcher(iter([1, 2]), depth=2)
    deadline = time.monotonic() + 5
    while not it._queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the thread is now waiting to put the end marker
    start = time.monotonic()
    it.close()
    assert not it._thread.is_alive()
    assert time.monotonic() - start < 1.0
