"""Generated data as a token source: `data.stream` draws the tokens of `data.generate` as
training reads them, with nothing written to disk.

The source serves exactly the tokens `jaxsae synth` would write for the same spec (block b
from the block's own seed, rounded through the spec's dtype), so everything that reads a
source — the loader's shuffle, lanes and resumable position, the statistics, the held-out
evaluation and its ground-truth metrics — works on it unchanged, and a streamed run sees the
batches a run on the written directory sees (given the same chunking: `chunk_tokens`). A
process generates only the blocks of the chunks its lanes read (per data shard), each once per
epoch when chunks are whole blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxsae.data import synthetic
from jaxsae.errors import DataError


def refuse_other_sampler(saved: int | None, source: Any, where: Any, remedy: str) -> None:
    """Refuses streamed data drawn by another version of its generator's sampler than the
    checkpoint's (`saved`, from its loader state; absent: version 1): the same seed gives
    other tokens. `remedy`: what to do instead."""
    sampler = getattr(source, "sampler", None)
    if sampler is not None and (1 if saved is None else saved) != sampler:
        raise DataError(
            f"{where}: the checkpoint's streamed data was drawn by version "
            f"{1 if saved is None else saved} of the {source.spec.kind} sampler and this "
            f"jaxsae draws version {sampler} (other tokens from the same seed); {remedy}")


class GeneratedSource:
    """Tokens [0, spec.tokens) of a generator spec (`synthetic.GENERATORS`), regenerated on
    read. `truth` is their ground truth (the final evaluation's true codes)."""

    iid = True
    """Tokens are drawn independently: any contiguous range is as good a sample as tokens
    spread over the data (the statistics read one range instead of 64 places)."""

    def __init__(self, spec: Any):
        if spec.kind == "transcoder":  # (refused with the config: jaxsae.checks)
            raise ValueError("a transcoder's pairs are not streamed")
        self.spec = spec
        self.truth = synthetic.Truth(spec=spec, arrays=spec.truth())
        self.manifest = None
        self.names = [f"generated {spec.kind}"]
        self.sampler = getattr(spec, "sampler", None)
        """The version of the generator's sampler (None: a generator without one): which
        tokens the spec gives. A checkpoint records it (`Loader.state`)."""

    @property
    def d_in(self) -> int:
        return self.spec.d_in

    d_out = 0

    @property
    def width(self) -> int:
        return self.spec.d_in

    @property
    def n_tokens(self) -> int:
        return self.spec.tokens

    @property
    def chunk_tokens(self) -> int:
        """The loader's preferred chunk: a whole block, so each block is generated once per
        epoch (the loader halves it on data too short for every lane to get several chunks;
        a power of two, a chunk then never spans two blocks)."""
        return synthetic.BLOCK_TOKENS

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        return self.truth.tokens(start, stop)

    def locate(self, token: int) -> tuple[str, int]:
        return self.names[0], token

    def check_finite(self, rows_per_read: int = 65536) -> None:
        """Nothing to scan: every block is checked as it is drawn (`synthetic.block_rows`
        refuses non-finite tokens)."""


def stream_spec(raw: Mapping[str, Any], train_tokens: int,
                held_out: Callable[[int], int]) -> Any:
    """The spec of `data.generate` for a streamed run: its `tokens` as given, else just enough
    for `train_tokens` training tokens after the held-out ones (`held_out(n)`: the tokens of n
    that data.eval_tokens holds out), so that no training token is drawn twice."""
    _, spec = synthetic.parse_spec(raw, key="data.generate")
    if "tokens" in raw:
        return spec
    n = train_tokens + held_out(train_tokens)
    while n - held_out(n) < train_tokens:
        n += train_tokens - (n - held_out(n))
    return dataclasses.replace(spec, tokens=n)
