"""Is the loader fast enough? Raw read rate vs loader delivery vs training consumption.

    python benchmarks/loader.py [--dir /tmp/jaxsae-loader-bench] [--gb 2]

Builds (once) a shard set of about `--gb` GB at d_in=768, then measures in one run:
1. raw: sequential read of every shard file, page cache warm (np.fromfile), in tokens/s;
2. loader: tokens/s the real Loader + Prefetcher deliver as device arrays (batch 4096,
   shuffle buffer 262144, 8 lanes), after one warm-up window;
3. training: tokens/s the jitted step consumes for the quickstart shape (d_in 128, d_sae 1024,
   batch 2048, relu + l1) and for d_in 768, d_sae 12288, batch 4096;
and the loader on the quickstart's own data (d_in 128) against the quickstart step.
Targets: loader >= 70% of raw, and >= 10x what training consumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, time_train_step

from jaxsae.build import build
from jaxsae.config import config_from_dict
from jaxsae.data.loader import Loader, Prefetcher
from jaxsae.data.shards import ShardSet, ShardWriter
from jaxsae.data.synthetic import SuperpositionSpec, generate_superposition
from jaxsae.errors import JaxsaeError
from jaxsae.sharding import batch_sharding


def build_shards(path: Path, gb: float, d_in: int = 768) -> ShardSet:
    """The shard set at `path`, written if there is none (ShardWriter refuses a directory
    that is not its own); one written before for another --gb is refused."""
    tokens = int(gb * 1e9 / (d_in * 4))
    if not (path / "manifest.json").is_file():
        rng = np.random.default_rng(0)
        with ShardWriter(path, d_in, shard_tokens=65536) as w:
            for lo in range(0, tokens, 65536):
                w.write(rng.standard_normal((min(65536, tokens - lo), d_in), np.float32))
    shards = ShardSet(path)
    if shards.d_in != d_in or shards.n_tokens != tokens:
        raise JaxsaeError(f"{path} holds {shards.n_tokens:,} tokens of d_in {shards.d_in}, "
                          f"not the {tokens:,} of d_in {d_in} that --gb {gb} makes (or give "
                          "the --gb it was written with)")
    return shards


def raw_read(shards: ShardSet) -> float:
    """Tokens/s of a plain sequential read of every file (run twice: the second is timed)."""
    files = [shards.path / e.file for e in shards.manifest.shards]
    elapsed = 0.0
    for _ in range(2):  # the first pass warms the page cache
        t0 = time.perf_counter()
        for f in files:
            np.fromfile(f, dtype=np.uint8)
        elapsed = time.perf_counter() - t0
    return shards.n_tokens / elapsed


def loader_rate(shards: ShardSet, batch: int, buffer: int, mesh_sharding,
                seconds: float = 20.0) -> float:
    """Tokens/s delivered as device arrays (ready on the device), after a warm-up window."""
    loader = Loader(shards, batch_size=batch, buffer_tokens=buffer, seed=0, lanes=8)
    shape = (batch, shards.d_in)

    def to_devices(item):
        rows, position = item
        return jax.make_array_from_process_local_data(mesh_sharding, rows, shape), position

    batches = Prefetcher(loader.batches(), depth=2, transform=to_devices)
    warm = max(1, buffer // batch)
    for _ in range(warm):
        jax.block_until_ready(next(batches)[0])
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < shards.n_tokens * 2:
        jax.block_until_ready(next(batches)[0])
        n += batch
    elapsed = time.perf_counter() - t0
    batches.close()
    loader.close()
    return n / elapsed


def step_rate(d_in: int, d_sae: int, batch: int) -> float:
    cfg = config_from_dict({"data": {"path": "unused"},
                            "sae": {"d_sae": d_sae, "decoder_norm": "free"},
                            "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 1.0}],
                            "optim": {"batch_size": batch, "total_tokens": batch * 100,
                                      "warmup_steps": 1}})
    return batch / time_train_step(cfg, d_in, steps=3)["step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/jaxsae-loader-bench",
                        help="where the two shard sets are written once and reused (DIR/d768, "
                             "DIR/d128)")
    parser.add_argument("--gb", type=float, default=2.0,
                        help="size of the d_in 768 shard set in GB")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="how long each loader rate is measured")
    args = parser.parse_args()
    if args.gb <= 0 or args.seconds <= 0:
        parser.error("--gb and --seconds must be > 0")
    root = Path(args.dir)
    info = machine()
    try:
        big = build_shards(root / "d768", args.gb)
        small = root / "d128"
        if not (small / "manifest.json").is_file():  # (refuses a directory not its own)
            generate_superposition(SuperpositionSpec(), small, progress=False)
        small = ShardSet(small)
    except JaxsaeError as e:
        parser.exit(2, f"loader.py: error: {e} (here: give another --dir)\n")
    sharding = batch_sharding(build(config_from_dict(
        {"data": {"path": "unused"}, "optim": {"batch_size": 4096, "total_tokens": 409600,
                                                "warmup_steps": 1}}), 768).mesh)
    result = {"machine": info, "shard_set_gb": round(big.n_tokens * 768 * 4 / 1e9, 2)}
    result["raw_read_tokens_per_s_d768"] = raw_read(big)
    result["loader_tokens_per_s_d768"] = loader_rate(big, 4096, 262144, sharding, args.seconds)
    result["train_tokens_per_s_768x12288"] = step_rate(768, 12288, 4096)
    result["raw_read_tokens_per_s_d128"] = raw_read(small)
    result["loader_tokens_per_s_d128"] = loader_rate(small, 2048, 131072, sharding,
                                                     args.seconds)
    result["train_tokens_per_s_quickstart"] = step_rate(128, 1024, 2048)
    for d, train_key in (("d768", "train_tokens_per_s_768x12288"),
                         ("d128", "train_tokens_per_s_quickstart")):
        loader, raw = result[f"loader_tokens_per_s_{d}"], result[f"raw_read_tokens_per_s_{d}"]
        result[f"loader_over_raw_{d}"] = loader / raw
        result[f"loader_over_training_{d}"] = loader / result[train_key]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
