"""Training on streamed data (`data.stream`) against training on the same tokens written to disk,
in one run, on this machine.

    python benchmarks/stream_training.py [--generate '{"kind": "synthsaebench", "preset":
        "quarter"}'] [--d-sae 1024] [--activation batchtopk] [--k 12] [--batch 1024]
        [--steps 300] [--json PATH]

Both runs are the real `jaxsae.train` with the same config (the streamed one with
`data.stream: true`, the other on the directory `jaxsae synth` writes for the same spec, in the
page cache after one read). Tokens/s is measured over the steps after the first 10% (compile
and the first windows excluded); the streamed run's generation runs in the loader's threads
beside the steps, as it does in any run. Also reported: the generator alone (µs a token, the
block function `jaxsae synth` and the stream share). The issue's target: streamed >= 80% of
the speed from disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

from jaxsae.config import config_from_dict
from jaxsae.data import open_source, synthetic
from jaxsae.hooks import LoopHook
from jaxsae.outputs import atomic_write, json_text, markdown_table
from jaxsae.train import train


class StepTimes(LoopHook):
    def __init__(self):
        self.times: list[float] = []

    def on_step(self, done: int) -> None:
        self.times.append(time.perf_counter())


def tokens_per_s(times: list[float], batch: int) -> float:
    skip = max(1, len(times) // 10)
    return batch * (len(times) - 1 - skip) / (times[-1] - times[skip])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generate", default='{"kind": "synthsaebench", "preset": "quarter"}',
                        help="data.generate as JSON (default: the quarter SynthSAEBench world)")
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--activation", default="batchtopk")
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if min(args.d_sae, args.k, args.batch) < 1 or args.steps < 10:
        parser.error("--d-sae, --k and --batch must be >= 1, --steps >= 10")
    try:
        json.loads(args.generate)
    except ValueError:
        parser.error(f"--generate: not JSON: {args.generate!r}")
    generate = json.loads(args.generate)

    with tempfile.TemporaryDirectory() as tmp:
        tree = {"name": "stream-bench",
                "data": {"generate": generate, "stream": True, "eval_tokens": 16384},
                "sae": {"d_sae": args.d_sae, "activation": args.activation, "k": args.k},
                "optim": {"batch_size": args.batch, "total_tokens": args.batch * args.steps},
                "checkpoint": {"every_steps": 10**9}, "log": {"every_steps": 10**9,
                                                            "curves": False}}
        streamed = config_from_dict({**tree, "run_dir": f"{tmp}/stream"})
        source = open_source(streamed.data, train_tokens=streamed.optim.total_tokens)
        spec = source.spec

        # the generator alone: the blocks of the training tokens, as `jaxsae synth` draws them
        truth = spec.truth()
        synthetic.block_rows(spec, truth, 0, synthetic.BLOCK_TOKENS, codes=False)  # compile
        blocks = max(1, min(8, spec.tokens // synthetic.BLOCK_TOKENS))
        t0 = time.perf_counter()
        for b in range(1, blocks + 1):
            synthetic.block_rows(spec, truth, b, synthetic.BLOCK_TOKENS, codes=False)
        generator_us = (time.perf_counter() - t0) / (blocks * synthetic.BLOCK_TOKENS) * 1e6

        data = synthetic.write(spec, Path(tmp) / "data", progress=False)
        for f in sorted(data.iterdir()):  # into the page cache
            f.read_bytes()
        on_disk = config_from_dict({**tree, "run_dir": f"{tmp}/disk",
                                    "data": {"path": str(data), "eval_tokens": 16384}})
        rates = {}
        for label, cfg in (("from disk (page cache)", on_disk), ("streamed", streamed)):
            times = StepTimes()
            train(cfg, progress=False, log=lambda m: None, hooks=[times])
            rates[label] = tokens_per_s(times.times, args.batch)

    ratio = rates["streamed"] / rates["from disk (page cache)"]
    rows = [{"": label, "tokens/s": f"{rate:,.0f}"} for label, rate in rates.items()]
    rows.append({"": "streamed / from disk", "tokens/s": f"{ratio:.2f} (target >= 0.80)"})
    rows.append({"": "generator alone", "tokens/s": f"{1e6 / generator_us:,.0f} "
                 f"({generator_us:.1f} µs / token)"})
    m = machine()
    print(f"{m['date']}, {m['cpu_cores']}-core {m['cpu']} ({m['platform']}), jax {m['jax']}")
    print(f"{spec.kind} {json.dumps(generate)}: {spec.n_features} features in d {spec.d_in}; "
          f"SAE {args.activation} k {args.k}, d_sae {args.d_sae}, batch {args.batch}, "
          f"{args.steps} steps")
    print("\n".join(markdown_table(rows, ["", "tokens/s"])))
    if args.json:
        atomic_write(args.json, json_text({"machine": m, "args": vars(args) | {
            "json": str(args.json)}, "tokens_per_s": rates, "ratio": ratio,
            "generator_us_per_token": generator_us}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
