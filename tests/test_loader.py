"""The lane-based shuffled loader (coverage, determinism, process-count invariance, mixing, exact
resumption, filtering, errors, state, close) and the background Prefetcher."""

from __future__ import annotations

import itertools
import json
import threading
import time

import numpy as np
import pytest

from jaxsae.data.loader import Loader, Prefetcher, dropped_tokens, lanes_of_process
from jaxsae.data.shards import ShardSet, ShardWriter
from jaxsae.errors import DataError


class IndexSource:
    """An in-memory token source whose row i is [i, -i, i / 2]: column 0 identifies the token.
    Records every (start, stop) read."""

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
        self.reads.append((start, stop))  # list.append is atomic: safe from the window threads
        i = np.arange(start, stop, dtype=np.float32)
        return np.stack([i, -i, i / 2], axis=1)


B = 32
CHUNK = 16
LANES = 4
BUFFER = 256  # 64 tokens per lane: windows of 4 chunks = 8 batches (8 rows per lane per batch)
# With N = 1024 tokens every lane has 16 chunks = 256 tokens = 4 windows = 32 batches an epoch.
N = 1024
# With 1000 tokens the lanes differ: 256, 256, 248 (chunk 62 has 8 tokens) and 240 (15 chunks)
# tokens, so their window and epoch boundaries fall on different batches.
UNEVEN = 1000

_open_loaders: list[Loader] = []


@pytest.fixture(autouse=True)
def _close_loaders():
    yield
    while _open_loaders:
        _open_loaders.pop().close()


def make_loader(n_tokens=N, *, lanes=LANES, owned=None, seed=0, position=None, stop=None,
                source=None, keep=None, batch_size=B, buffer=BUFFER, chunk=CHUNK) -> Loader:
    source = source or IndexSource(n_tokens)
    loader = Loader(source, batch_size=batch_size, buffer_tokens=buffer, seed=seed, stop=stop,
                    lanes=lanes, owned_lanes=owned, keep=keep, position=position,
                    chunk_tokens=chunk)
    _open_loaders.append(loader)
    return loader


def run(loader: Loader, n: int) -> list[tuple[np.ndarray, dict]]:
    """The first n (rows, position) pairs."""
    return list(itertools.islice(loader.batches(), n))


def rows(pairs) -> list[np.ndarray]:
    return [r for r, _ in pairs]


def ids(batch: np.ndarray) -> np.ndarray:
    return batch[:, 0].astype(np.int64)


def stream(pairs) -> np.ndarray:
    """Token ids of the batches, concatenated."""
    return np.concatenate([ids(r) for r, _ in pairs])


def lane_stream(pairs, lane: int, per_lane: int = B // LANES) -> np.ndarray:
    """Token ids of one lane's rows of the batches, concatenated."""
    return np.concatenate([ids(r)[lane * per_lane : (lane + 1) * per_lane] for r, _ in pairs])


def lane_tokens(n: int, lane: int, lanes: int = LANES, chunk: int = CHUNK) -> np.ndarray:
    """The tokens of lane `lane`: chunks c with c mod lanes == lane."""
    starts = np.arange(0, n, chunk)[lane::lanes]
    return np.concatenate([np.arange(s, min(s + chunk, n)) for s in starts])


def not_seven(tokens: np.ndarray) -> np.ndarray:
    return tokens[:, 0].astype(np.int64) % 7 != 0


def assert_same_batches(got, want, msg=""):
    assert len(got) == len(want)
    for i, ((g_rows, g_pos), (w_rows, w_pos)) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(g_rows, w_rows, err_msg=f"{msg} batch {i}")
        assert g_pos == w_pos, f"{msg} batch {i}"


def drain(loader: Loader) -> None:
    """Waits until every window read the loader started (prefetches included) has finished."""
    loader._pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# Shape and coverage


def test_batches_are_well_formed():
    for batch, position in run(make_loader(), 5):
        assert batch.shape == (B, 3)
        assert batch.dtype == np.float32
        i = batch[:, 0]
        np.testing.assert_array_equal(batch[:, 1], -i)  # rows stay intact through the shuffle
        np.testing.assert_array_equal(batch[:, 2], i / 2)
        assert len(position["lanes"]) == LANES


@pytest.mark.parametrize("lanes", [1, 2, 4, 8])
def test_each_epoch_covers_every_token_once(lanes):
    # N / lanes tokens per lane in batches of B / lanes rows: 32 batches an epoch for any lanes.
    pairs = run(make_loader(lanes=lanes), 96)
    s = stream(pairs)
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(s[epoch * N : (epoch + 1) * N]), np.arange(N))
    # The positions say the same: after 32 batches every lane ends epoch 0, then starts epoch 1.
    assert {tuple(p) for p in pairs[31][1]["lanes"]} == {(0, 3, 64 * 4 // lanes)}
    assert all(p[0] == 1 for p in pairs[32][1]["lanes"])


def test_every_lane_draws_from_the_whole_data_set_and_covers_its_chunks_each_epoch():
    pairs = run(make_loader(UNEVEN), 70)
    for lane in range(LANES):
        mine = lane_tokens(UNEVEN, lane)
        assert mine.min() < 64 and mine.max() >= UNEVEN - 64  # spread over the whole set
        s = lane_stream(pairs, lane)
        n = len(mine)  # 256, 256, 248, 240
        for epoch in range(2):
            np.testing.assert_array_equal(np.sort(s[epoch * n : (epoch + 1) * n]), mine)


@pytest.mark.parametrize("stop", [768, UNEVEN])  # 1000: the last chunk is cut at the stop
def test_stop_excludes_the_held_out_tail(stop):
    source = IndexSource(N)
    loader = make_loader(source=source, stop=stop)
    assert loader.n_tokens == stop
    pairs = run(loader, 2 * stop // B)
    s = stream(pairs)
    assert s.min() >= 0 and s.max() < stop
    for lane in range(LANES):
        mine = lane_tokens(stop, lane)
        n = len(mine)
        np.testing.assert_array_equal(np.sort(lane_stream(pairs, lane)[:n]), mine)
    drain(loader)
    assert max(end for _, end in source.reads) == stop


# ---------------------------------------------------------------------------------------------
# Determinism


def test_order_repeats_for_a_seed_and_differs_between_seeds_and_epochs():
    a = run(make_loader(seed=0), 64)
    assert_same_batches(run(make_loader(seed=0), 64), a)
    sa = stream(a)
    other = stream(run(make_loader(seed=1), 64))
    assert not np.array_equal(sa[:N], other[:N])
    assert not np.array_equal(sa[:N], sa[N:])  # epoch 1 is another order of the same tokens
    np.testing.assert_array_equal(np.sort(sa[:N]), np.sort(sa[N:]))
    # Each epoch visits a lane's chunks in a new order: its first window holds other chunks.
    first_windows = [[set(lane_stream(a[32 * e : 32 * e + 8], lane) // CHUNK) for e in (0, 1)]
                     for lane in range(LANES)]
    assert all(len(w0) == len(w1) == 4 for w0, w1 in first_windows)
    assert any(w0 != w1 for w0, w1 in first_windows)
    # Shuffled, not merely rotated: far from the identity order, also within each lane.
    assert np.mean(sa[:N] == np.arange(N)) < 0.05
    for lane in range(LANES):
        s = lane_stream(a, lane)[:256]
        assert np.mean(s == lane_tokens(N, lane)) < 0.1


# ---------------------------------------------------------------------------------------------
# Process-count invariance


def test_lanes_of_process():
    assert lanes_of_process(4, 0, 1) == [0, 1, 2, 3]
    assert lanes_of_process(4, 1, 2) == [2, 3]
    assert lanes_of_process(4, 3, 4) == [3]
    assert lanes_of_process(8, 3, 4) == [6, 7]


@pytest.mark.parametrize(("lanes", "processes", "keep"), [
    (4, 1, None), (4, 2, None), (4, 4, None), (8, 2, None), (4, 2, not_seven),
])
def test_a_process_produces_exactly_its_rows_of_the_global_batches(lanes, processes, keep):
    n_batches = 70  # more than two epochs of every lane
    reference = run(make_loader(UNEVEN, lanes=lanes, keep=keep), n_batches)
    rows_per_process = B // processes
    for p in range(processes):
        owned = lanes_of_process(lanes, p, processes)
        local = run(make_loader(UNEVEN, lanes=lanes, owned=owned, keep=keep), n_batches)
        for i, ((got, pos), (want, global_pos)) in enumerate(zip(local, reference, strict=True)):
            assert got.shape == (rows_per_process, 3)
            np.testing.assert_array_equal(
                got, want[p * rows_per_process : (p + 1) * rows_per_process],
                err_msg=f"process {p} of {processes}, batch {i}")
            assert pos["lanes"] == [global_pos["lanes"][lane] if lane in owned else None
                                    for lane in range(lanes)]


def test_processes_read_disjoint_chunks_that_together_cover_the_data():
    stop = 960  # 60 chunks: 15 per lane, 240 tokens per lane = 30 batches an epoch
    coverage = []
    for p in range(2):
        source = IndexSource(N)
        owned = lanes_of_process(LANES, p, 2)
        loader = make_loader(source=source, owned=owned, stop=stop)
        run(loader, 30)
        drain(loader)
        covered = np.zeros(N, bool)
        for start, end in source.reads:
            assert end - start == CHUNK and start % CHUNK == 0  # whole chunks
            assert (start // CHUNK) % LANES in owned  # only this process's lanes
            covered[start:end] = True
        coverage.append(covered)
        for lane in owned:
            # A lane's windows are read one after another: its first 15 reads are epoch 0,
            # every chunk once, each window (4, 4, 4, 3 chunks) in file order.
            reads = [s for s, _ in source.reads if (s // CHUNK) % LANES == lane][:15]
            np.testing.assert_array_equal(np.sort(reads), lane_tokens(stop, lane)[::CHUNK])
            for w in range(0, 15, 4):
                assert reads[w : w + 4] == sorted(reads[w : w + 4])
    assert not (coverage[0] & coverage[1]).any()
    np.testing.assert_array_equal(coverage[0] | coverage[1], np.arange(N) < stop)


# ---------------------------------------------------------------------------------------------
# Mixing


def test_tokens_from_many_chunks_are_mixed_within_a_batch():
    for batch, _ in run(make_loader(), 32):
        i = ids(batch)
        assert len(np.unique(i // CHUNK)) >= 8  # 4 lanes, each interleaving its window's chunks
        for lane in range(LANES):
            assert len(np.unique(i[lane * 8 : (lane + 1) * 8] // CHUNK)) >= 2
        s = np.sort(i)
        assert not np.array_equal(s, np.arange(s[0], s[0] + B))  # not a contiguous run
        # Nor mostly runs of neighbouring tokens. (Rows within a lane's piece are sorted by file
        # position for near-sequential reads; the order inside a batch does not matter.)
        assert np.mean(np.diff(s) == 1) < 0.35


def test_tokens_from_different_shards_are_mixed(tmp_path):
    n, d = 1024, 2
    data = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    with ShardWriter(tmp_path / "set", d, shard_tokens=256) as writer:  # 4 shards
        writer.write(data)
    shards = ShardSet(tmp_path / "set")
    loader = Loader(shards, batch_size=64, buffer_tokens=256, seed=0, lanes=2, chunk_tokens=32)
    _open_loaders.append(loader)
    batches = rows(run(loader, n // 64))
    np.testing.assert_array_equal(np.sort(np.concatenate([ids(b) for b in batches])),
                                  np.arange(n))
    n_shards_per_batch = [len(np.unique(ids(b) // 256)) for b in batches]
    assert min(n_shards_per_batch) >= 2


# ---------------------------------------------------------------------------------------------
# Exact resumption


@pytest.mark.parametrize(("k", "lanes_at"), [
    (3, [0, 0, 24]),  # inside the first window
    (12, [0, 1, 32]),  # inside a later window
    (8, [0, 0, 64]),  # at a window boundary
    (16, [0, 1, 64]),  # at a window boundary
    (31, [0, 3, 56]),  # the last batch of the epoch
    (32, [0, 3, 64]),  # at the epoch boundary
    (35, [1, 0, 24]),  # inside the second epoch
])
@pytest.mark.parametrize("via_json", [False, True])
def test_resume_from_a_yielded_position_matches_the_uninterrupted_run(k, lanes_at, via_json):
    reference = run(make_loader(), 48)
    position = reference[k - 1][1]
    assert position["lanes"] == [lanes_at] * LANES
    if via_json:  # as a checkpoint stores it
        position = json.loads(json.dumps(position))
    assert_same_batches(run(make_loader(position=position), 48 - k), reference[k:])


def test_resume_from_every_position_with_unaligned_lanes():
    # The lanes' windows and epochs end on different batches, so many positions mix
    # lanes at a boundary with lanes inside a window, and cross lane epochs (30, 31, 32).
    reference = run(make_loader(UNEVEN), 72)
    for k in range(1, 68):
        position = json.loads(json.dumps(reference[k - 1][1]))
        assert_same_batches(run(make_loader(UNEVEN, position=position), 4),
                            reference[k : k + 4], msg=f"resumed after {k}")


def test_resume_chains_and_a_resumed_run_can_be_resumed_again():
    reference = run(make_loader(UNEVEN), 60)
    first = run(make_loader(UNEVEN, position=reference[9][1]), 25)  # batches 10..34
    second = run(make_loader(UNEVEN, position=first[-1][1]), 25)  # batches 35..59
    assert_same_batches(first + second, reference[10:])


@pytest.mark.parametrize("k", [5, 8, 31, 33])
@pytest.mark.parametrize(("lanes", "processes"), [(4, 2), (4, 4), (8, 2)])
def test_a_process_resumes_its_rows_from_a_global_position(k, lanes, processes):
    reference = run(make_loader(UNEVEN, lanes=lanes), k + 10)
    position = json.loads(json.dumps(reference[k - 1][1]))
    per = B // processes
    for p in range(processes):
        owned = lanes_of_process(lanes, p, processes)
        resumed = run(make_loader(UNEVEN, lanes=lanes, owned=owned, position=position), 10)
        for (got, _), (want, _) in zip(resumed, reference[k:], strict=True):
            np.testing.assert_array_equal(got, want[p * per : (p + 1) * per])


def test_a_process_position_resumes_that_process():
    owned = lanes_of_process(LANES, 1, 2)
    reference = run(make_loader(UNEVEN, owned=owned), 40)
    position = json.loads(json.dumps(reference[19][1]))
    assert position["lanes"][:2] == [None, None]
    assert_same_batches(run(make_loader(UNEVEN, owned=owned, position=position), 20),
                        reference[20:])


# ---------------------------------------------------------------------------------------------
# Filtering


def test_filtered_tokens_never_appear_and_each_epoch_covers_the_kept_ones():
    pairs = run(make_loader(keep=not_seven), 70)
    assert not (stream(pairs) % 7 == 0).any()
    for lane in range(LANES):
        kept = lane_tokens(N, lane)
        kept = kept[kept % 7 != 0]
        s = lane_stream(pairs, lane)
        for epoch in range(2):
            n = len(kept)
            np.testing.assert_array_equal(np.sort(s[epoch * n : (epoch + 1) * n]), kept)


def test_the_position_offset_counts_within_the_filtered_window():
    plain = run(make_loader(), 32)  # epoch 0: lane l's window w is batches [8w, 8w + 8)
    filtered = run(make_loader(keep=not_seven), 24)
    for lane in range(LANES):
        windows = [lane_stream(plain[8 * w : 8 * w + 8], lane) for w in range(4)]
        kept = [np.sort(w[w % 7 != 0]) for w in windows]  # the tokens of each filtered window
        served = lane_stream(filtered, lane)
        # The filtered windows are served one after another (each in its own shuffled order).
        for w, start in enumerate(np.cumsum([0] + [len(x) for x in kept[:-1]])):
            part = served[start : start + len(kept[w])]
            np.testing.assert_array_equal(np.sort(part), kept[w][np.isin(kept[w], part)])
            assert len(part) == min(len(kept[w]), max(0, len(served) - start))
        for k, (_, position) in enumerate(filtered, start=1):
            epoch, window, offset = position["lanes"][lane]
            assert epoch == 0 and 0 <= offset <= len(kept[window])
            assert sum(len(x) for x in kept[:window]) + offset == 8 * k


def test_dropped_counts_the_filtered_tokens_of_the_windows_served_from():
    # Windows of a whole lane epoch (buffer = every token): after any batch of epoch e, each
    # lane has served from e + 1 windows, each holding all of its multiples of 7.
    pairs = run(make_loader(keep=not_seven, buffer=N), 70)
    sevens = [int(np.sum(lane_tokens(N, lane) % 7 == 0)) for lane in range(LANES)]
    for _, position in pairs:
        assert dropped_tokens(position) == sum(position["dropped"])
        for lane, (epoch, window, _) in enumerate(position["lanes"]):
            assert window == 0 and position["dropped"][lane] == (epoch + 1) * sevens[lane]
    assert {p["lanes"][0][0] for _, p in pairs} == {0, 1, 2}  # (three epochs)


def test_a_lane_whose_every_token_is_filtered_out_is_refused_not_read_for_ever():
    """(fault testing: data.drop_norm_above leaving out every token of one lane, whose chunks
    are every LANES-th of the data, made the loader read that lane's windows for ever, the run
    hung without a word.) The loader names the lane and the keys to change."""
    windows = []

    def not_lane_2(rows):  # (a lane-2 chunk: its first token's chunk index is 2 mod LANES)
        windows.append(len(rows))
        assert len(windows) < 200, "still reading windows"
        return (rows[:, 0] // CHUNK) % LANES != 2

    with pytest.raises(DataError, match=r"^data\.drop_norm_above leaves out every training "
                                        r"token of lane 2 of 4 \(data\.lanes: its 16 chunks "
                                        r"of 16 tokens.*a larger multiple, or fewer lanes"):
        run(make_loader(keep=not_lane_2), 1)


def test_dropped_is_part_of_the_position_and_resumes_exactly():
    """(fault testing: a resumed run counted from 0 again, and the count was of the windows
    read ahead by the loader's threads, so that it depended on timing)"""
    reference = run(make_loader(UNEVEN, keep=not_seven), 50)
    counts = [sum(p["dropped"]) for _, p in reference]
    assert counts == sorted(counts) and counts[0] > 0
    for k in (1, 7, 8, 29, 40):
        position = json.loads(json.dumps(reference[k - 1][1]))
        resumed = run(make_loader(UNEVEN, keep=not_seven, position=position), 50 - k)
        assert [p["dropped"] for _, p in resumed] == [p["dropped"] for _, p in reference[k:]]
    # a position saved without the count (before it was kept) resumes, the count unknown
    old = {k: v for k, v in reference[9][1].items() if k != "dropped"}
    resumed = run(make_loader(UNEVEN, keep=not_seven, position=old), 3)
    assert_same_batches([(r, {**p, "dropped": None}) for r, p in resumed],
                        [(r, {**p, "dropped": None}) for r, p in reference[10:13]])
    assert all(dropped_tokens(p) is None for _, p in resumed)
    # no filter: nothing to count
    assert "dropped" not in run(make_loader(UNEVEN), 1)[0][1]


def one_in_sixteen(tokens: np.ndarray) -> np.ndarray:
    """Keeps 1 token per chunk: a window (4 tokens) is less than a lane's rows of a batch."""
    return tokens[:, 0].astype(np.int64) % CHUNK == 5


def above_600(tokens: np.ndarray) -> np.ndarray:
    """Drops whole chunks: some windows are empty after filtering."""
    return tokens[:, 0] >= 600


@pytest.mark.parametrize("k", [1, 5, 7, 8, 9, 20, 27, 28, 29, 30, 40])
def test_resume_is_exact_with_a_filter(k):
    reference = run(make_loader(UNEVEN, keep=not_seven), 50)
    position = json.loads(json.dumps(reference[k - 1][1]))
    resumed = run(make_loader(UNEVEN, keep=not_seven, position=position), 50 - k)
    assert_same_batches(resumed, reference[k:])


@pytest.mark.parametrize("keep", [one_in_sixteen, above_600])
def test_heavy_filters_cover_the_kept_tokens_and_resume_exactly(keep):
    pairs = run(make_loader(keep=keep), 40)
    for lane in range(LANES):
        mine = lane_tokens(N, lane)
        kept = mine[keep(np.stack([mine] * 3, axis=1).astype(np.float32))]
        s = lane_stream(pairs, lane)
        assert len(s) >= 2 * len(kept)
        for epoch in range(2):
            n = len(kept)
            np.testing.assert_array_equal(np.sort(s[epoch * n : (epoch + 1) * n]), kept)
    for k in range(1, 36):
        position = json.loads(json.dumps(pairs[k - 1][1]))
        assert_same_batches(run(make_loader(keep=keep, position=position), 4),
                            pairs[k : k + 4], msg=f"resumed after {k}")


# ---------------------------------------------------------------------------------------------
# Errors


def test_batch_size_must_divide_into_the_lanes():
    with pytest.raises(ValueError, match="not divisible"):
        make_loader(batch_size=30)


def test_fewer_chunks_than_lanes_is_refused():
    with pytest.raises(ValueError, match="fewer than"):
        make_loader(40)  # 3 chunks of 16 for 4 lanes
    with pytest.raises(ValueError, match="fewer than"):
        make_loader(N, stop=0)


def test_a_position_without_an_owned_lane_is_refused():
    process0 = run(make_loader(owned=lanes_of_process(LANES, 0, 2)), 3)[-1][1]
    with pytest.raises(ValueError, match="no entry"):
        make_loader(owned=lanes_of_process(LANES, 1, 2), position=process0)
    with pytest.raises(ValueError, match="no entry"):
        make_loader(position=process0)  # the global loader owns every lane
    full = run(make_loader(), 3)[-1][1]
    with pytest.raises(ValueError, match="no entry"):
        make_loader(lanes=8, position=full)  # saved with 4 lanes


def test_lanes_of_process_needs_processes_dividing_lanes():
    with pytest.raises(ValueError, match="do not divide"):
        lanes_of_process(4, 0, 3)
    with pytest.raises(ValueError, match="do not divide"):
        lanes_of_process(8, 1, 16)


# ---------------------------------------------------------------------------------------------
# state()


def test_state_of_a_fresh_and_of_a_process_loader():
    assert make_loader().state() == {
        "lanes": [[0, 0, 0]] * LANES, "seed": 0, "n_tokens": N, "batch_size": B,
        "n_lanes": LANES, "d_in": 3, "d_out": 0}
    loader = make_loader(UNEVEN, owned=lanes_of_process(LANES, 1, 2), seed=5, stop=960)
    assert loader.state() == {
        "lanes": [None, None, [0, 0, 0], [0, 0, 0]], "seed": 5, "n_tokens": 960,
        "batch_size": B, "n_lanes": LANES, "d_in": 3, "d_out": 0}


def test_state_is_the_position_after_the_batches_yielded():
    loader = make_loader()
    it = loader.batches()
    yielded = []
    for _ in range(10):
        _, position = next(it)
        assert position == loader.state()
        yielded.append((position, json.dumps(position)))
    assert set(yielded[-1][0]) == {"lanes", "seed", "n_tokens", "batch_size", "n_lanes", "d_in",
                                    "d_out"}
    assert yielded[-1][0]["lanes"] == [[0, 1, 16]] * LANES
    for position, snapshot in yielded:  # later batches do not change a position handed out
        assert json.dumps(position) == snapshot
    assert len({s for _, s in yielded}) == 10


# ---------------------------------------------------------------------------------------------
# close()


def test_close_stops_the_window_pool():
    loader = make_loader()
    run(loader, 5)  # windows being prefetched
    threads = list(loader._pool._threads)
    assert threads
    start = time.monotonic()
    loader.close()
    assert time.monotonic() - start < 0.5
    assert loader._pool._shutdown
    for t in threads:
        t.join(timeout=5)
        assert not t.is_alive()
    with pytest.raises(RuntimeError):  # no new window reads after close
        loader._pool.submit(lambda: None)


class BlockingSource(IndexSource):
    """Reads wait until `release` is set."""

    def __init__(self, n_tokens: int):
        super().__init__(n_tokens)
        self.entered = threading.Event()
        self.release = threading.Event()

    def read(self, start: int, stop: int) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(timeout=10)
        return super().read(start, stop)


def test_close_returns_promptly_while_a_window_read_is_in_flight():
    source = BlockingSource(N)
    loader = make_loader(source=source)
    outcome = []

    def consume():
        try:
            outcome.append(next(loader.batches()))
        except Exception as e:  # whatever a consumer still waiting at close() gets
            outcome.append(e)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()  # waits for lane 0's first window
    assert source.entered.wait(timeout=5)
    threads = list(loader._pool._threads)
    start = time.monotonic()
    loader.close()
    assert time.monotonic() - start < 0.5
    source.release.set()
    for t in [*threads, consumer]:
        t.join(timeout=5)
        assert not t.is_alive()
    # Only the window that was in flight was read: lane 0's first 4 chunks.
    assert len(source.reads) == 4
    assert all((s // CHUNK) % LANES == 0 for s, _ in source.reads)


def test_no_window_threads_outlive_closed_loaders():
    threads = []
    for lanes in (1, 4, 8):
        loader = make_loader(lanes=lanes)
        run(loader, 3)
        threads += loader._pool._threads
        loader.close()
    assert len(threads) >= 3
    for t in threads:
        t.join(timeout=5)
        assert not t.is_alive()


# ---------------------------------------------------------------------------------------------
# Prefetcher


def test_prefetcher_yields_items_in_order():
    items = [np.full(3, i) for i in range(20)]
    got = list(Prefetcher(iter(items), depth=3))
    assert len(got) == 20
    for a, b in zip(got, items, strict=True):
        np.testing.assert_array_equal(a, b)


def test_prefetcher_over_a_loader_yields_the_loader_batches():
    reference = run(make_loader(), 10)
    it = Prefetcher(make_loader().batches(), depth=2)
    got = [next(it) for _ in range(10)]
    it.close()
    assert_same_batches(got, reference)


def test_prefetcher_applies_transform():
    seen = []

    def transform(x):
        seen.append(threading.current_thread())
        return x * 10

    got = list(Prefetcher(iter(range(7)), transform=transform))
    assert got == [0, 10, 20, 30, 40, 50, 60]
    assert seen and all(t is not threading.main_thread() for t in seen)  # in the background


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


def test_prefetcher_keeps_raising_after_an_error_or_the_end():
    it = Prefetcher(iter(range(10)), transform=lambda x: 1 // (x - 2))
    assert [next(it) for _ in range(2)] == [-1, -1]
    for _ in range(3):  # the same error again, without blocking on the empty queue
        with pytest.raises(ZeroDivisionError):
            next(it)
    done = Prefetcher(iter([1]))
    assert next(done) == 1
    for _ in range(3):
        with pytest.raises(StopIteration):
            next(done)


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
