"""Training throughput against the machine's matmul limit and against SAELens, in one run.

    python benchmarks/throughput.py [--arch relu|topk|batchtopk|matryoshka_batchtopk]
                                    [--widths 768,3072,12288] [--d-in 768] [--d-sae 12288]
                                    [--batch 4096] [--k 32] [--steps 5] [--device "note"]
                                    [--compute-dtype float32|bfloat16] [--peak-tflops T]
                                    [--kernels auto|cpu|xla|pallas] [--saelens-python PY]

1. roofline: FLOP/s of the XLA matmul [batch, d_in] @ [d_in, d_sae] on this machine, in the
   compute dtype;
2. jaxsae: tokens/s of the real train step fed by the real loader (steady state, after
   compilation and warm-up), and of the step alone on a batch already on the device; its
   FLOP rate counting a dense step as 10·B·d_in·d_sae;
3. SAELens: tokens/s of its SAETrainer with the training SAE class of the same architecture
   (StandardTrainingSAE, TopKTrainingSAE, BatchTopKTrainingSAE,
   MatryoshkaBatchTopKTrainingSAE with the same --widths) on the same shapes and batch, fed
   from memory, on the same device (CUDA when there is one; bf16 autocast when the compute
   dtype is bfloat16), run by --saelens-python (default .venv-interop's, which
   scripts/test.sh builds; skipped when there is none).
Prints JSON with jaxsae/roofline and jaxsae/SAELens, and the MFU (model FLOP/s over the
device's peak) where the peak is known: --peak-tflops, or the bf16 dense peak of a known GPU /
TPU. Model FLOPs: 10·B·d_in·d_sae a dense step, 2·B·d_in·(d_sae + 4k) a sparse TopK or
BatchTopK step (k per token on average; the prefix losses of matryoshka_batchtopk add no
FLOPs on the sparse path). jaxsae_over_encoder_limit: the step's time against its dense encoder
matmul alone (2·B·d_in·d_sae at the roofline rate), the most a sparse step can reach.
floor_parts (sparse architectures): seconds of the step's parts that nothing fuses away: the
encoder matmul at the roofline rate, and, each jitted alone at its shapes, the optimizer's
update of every parameter and the selection of the codes; floor_over_encoder_limit: the
matmul over their sum, the most the step could reach were everything else free.

On an accelerator (issue: throughput, item 6):
    python benchmarks/throughput.py --arch relu --d-in 2304 --d-sae 65536 --batch 8192 \
        --compute-dtype bfloat16 --device "..."     (and --arch topk --k 64)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_shape_args, machine, median_seconds

from jaxsae import hostmem, kernels, sae
from jaxsae.build import build
from jaxsae.config import config_from_dict
from jaxsae.data.loader import Loader, Prefetcher
from jaxsae.data.shards import ShardSet, ShardWriter
from jaxsae.step import make_optimizer

HERE = Path(__file__).resolve().parent
INTEROP_PYTHON = HERE.parent / ".venv-interop" / "bin" / "python"


# Dense bfloat16 peaks (TFLOP/s, no sparsity) by device_kind prefix, from the vendors' sheets.
BF16_PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0,
                    "NVIDIA H20": 148.0, "NVIDIA A100": 312.0, "NVIDIA L4": 121.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def known_peak(device_kind: str) -> float | None:
    """The longest matching prefix wins (H200 before H20)."""
    matches = [name for name in BF16_PEAK_TFLOPS if device_kind.startswith(name)]
    return BF16_PEAK_TFLOPS[max(matches, key=len)] * 1e12 if matches else None


SPARSE = ("topk", "batchtopk", "matryoshka_batchtopk")


def step_flops(args) -> int:
    """Model FLOPs of one training step (see the module docstring)."""
    if args.arch in SPARSE:
        return 2 * args.batch * args.d_in * (args.d_sae + 4 * args.k)
    return 10 * args.batch * args.d_in * args.d_sae


def roofline(batch: int, d_in: int, d_sae: int, dtype: str, reps: int = 5) -> float:
    """FLOP/s of the encoder-shaped matmul (the step's dominant operation), on random data
    (constant operands can run faster than real data on a GPU)."""
    keys = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(keys[0], (batch, d_in), dtype)
    w = jax.random.normal(keys[1], (d_in, d_sae), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(x, w))
    t0 = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(x, w))
    return 2 * batch * d_in * d_sae * reps / (time.perf_counter() - t0)


def floor_parts(args, cfg, peak: float) -> dict[str, float]:
    """Seconds of the sparse step's parts that no fusion removes, at the step's shapes: the
    dense encoder matmul (at the roofline rate `peak`, as the encoder limit takes it), and,
    each jitted alone, the optimizer's update of every parameter (the step's own optax
    transformation) and the selection of the codes from the pre-activations
    (`kernels.top_k_indices`, or `batch_top_k_entries` for BatchTopK). Their sum bounds the
    step from below whatever the rest (decode, gradients, scatters) costs."""
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(keys[0], (args.batch, args.d_in), args.compute_dtype)
    w = jax.random.normal(keys[1], (args.d_in, args.d_sae), args.compute_dtype)
    pre = jax.jit(lambda a, b: a @ b)(x, w).astype(jnp.float32)
    params = sae.init_params(keys[2], args.d_in, cfg.sae)
    tx = make_optimizer(cfg)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 1e-3 * p, params)

    @jax.jit
    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if args.arch == "topk":
        select = jax.jit(lambda p: kernels.top_k_indices(p, args.k))
    else:
        select = jax.jit(lambda p: kernels.batch_top_k_entries(
            p, args.k, slots=args.batch * args.k))  # as sparse_batchtopk
    return {"encoder_matmul_s": 2 * args.batch * args.d_in * args.d_sae / peak,
            "optimizer_s": median_seconds(update, params, state, grads),
            "selection_s": median_seconds(select, pre)}


def train_config(args, data: ShardSet):
    """The run config of --arch at args's shapes: the loss SAELens's class of that
    architecture trains with."""
    activation = "batchtopk" if args.arch == "matryoshka_batchtopk" else args.arch
    sae = {"d_sae": args.d_sae, "activation": activation, "k": args.k, "decoder_norm": "free"}
    loss = ([{"term": "mse"}, {"term": "l1", "coefficient": 1.0}] if args.arch == "relu"
            else [{"term": "mse"}, {"term": "auxk", "coefficient": 1 / 32}])
    if args.arch == "matryoshka_batchtopk":
        # SAELens sums the prefix losses (the whole dictionary's among them): weights 1 each.
        widths = widths_of(args)
        loss = [{"term": "matryoshka", "prefixes": widths, "weights": [1.0] * len(widths)},
                {"term": "auxk", "coefficient": 1 / 32}]
    return config_from_dict({"data": {"path": str(data.path)}, "sae": sae, "loss": loss,
                             "optim": {"batch_size": args.batch,
                                       "compute_dtype": args.compute_dtype,
                                       "total_tokens": args.batch * 1000, "warmup_steps": 1,
                                       "kernels": args.kernels}})


def jaxsae_rates(args, data: ShardSet) -> tuple[float, float]:
    """(tokens/s fed by the loader, tokens/s of the step alone on one resident batch)."""
    cfg = train_config(args, data)
    built = build(cfg, args.d_in)
    state = built.init()
    loader = Loader(data, batch_size=args.batch, buffer_tokens=cfg.data.shuffle_buffer, seed=0,
                    lanes=cfg.data.lanes)
    shape = (args.batch, args.d_in)
    batches = Prefetcher(loader.batches(), transform=lambda item: (
        jax.make_array_from_process_local_data(built.batch_sharding, item[0], shape), item[1]))
    for _ in range(2):  # compile, warm up
        state, metrics = built.step(state, next(batches)[0])
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = built.step(state, next(batches)[0])
    jax.block_until_ready((state, metrics))
    fed = args.steps * args.batch / (time.perf_counter() - t0)
    resident = next(batches)[0]
    batches.close()
    loader.close()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = built.step(state, resident)
    jax.block_until_ready((state, metrics))
    return fed, args.steps * args.batch / (time.perf_counter() - t0)


def widths_of(args) -> list[int]:
    """The matryoshka prefixes: --widths, ending at d_sae (default d_sae/16, d_sae/4, d_sae)."""
    widths = args.widths or [args.d_sae // 16, args.d_sae // 4]
    return sorted({*widths, args.d_sae})


def width_list(text: str) -> list[int]:
    """--widths: comma-separated positive integers (argparse reports anything else)."""
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 768,3072, got {text!r}")
    return widths


def saelens_python(args) -> Path | None:
    """The Python that runs SAELens: --saelens-python ("none": skip), else .venv-interop's."""
    if args.saelens_python == "none":
        return None
    if args.saelens_python:
        return Path(args.saelens_python)
    return INTEROP_PYTHON if INTEROP_PYTHON.exists() else None


def saelens_rate(args) -> float | None:
    return saelens_rates(args, [args.arch])[args.arch]


def saelens_rates(args, archs: list[str]) -> dict[str, float | None]:
    """SAELens's tokens/s for each of `archs` (jaxsae's names) at args's shape, in one run of
    saelens_trainer.py (one start of torch and SAELens); None each when there is no SAELens."""
    python = saelens_python(args)
    if python is None:
        return dict.fromkeys(archs)
    names = ["standard" if arch == "relu" else arch for arch in archs]
    extra = (["--widths", ",".join(map(str, widths_of(args)))]
             if "matryoshka_batchtopk" in archs else [])
    if args.compute_dtype == "bfloat16":
        extra.append("--autocast")
    proc = subprocess.run([str(python), str(HERE / "saelens_trainer.py"),
                           "--arch", ",".join(names),
                           "--d-in", str(args.d_in), "--d-sae", str(args.d_sae),
                           "--batch", str(args.batch), "--k", str(args.k),
                           "--steps", str(args.steps + 3), *extra],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {arch: line["tokens_per_s"] for arch, line in zip(archs, lines, strict=True)}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["relu", *SPARSE], default="relu")
    parser.add_argument("--widths", type=width_list, default=None,
                        help="matryoshka_batchtopk prefixes, comma-separated (default "
                             "d_sae/16, d_sae/4, d_sae)")
    add_shape_args(parser)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default=None, help="a note on the hardware")
    parser.add_argument("--no-saelens", action="store_true")
    parser.add_argument("--saelens-python", default=None,
                        help="the Python with SAELens (default .venv-interop's; none: skip)")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="optim.compute_dtype (and the roofline matmul's dtype)")
    parser.add_argument("--kernels", choices=["auto", "cpu", "xla", "pallas"], default="auto",
                        help="optim.kernels: the sparse paths' gathers and scatters")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for the MFU (default: known GPUs / TPUs)")
    return parser


def write_data(directory: Path, batch: int, d_in: int) -> ShardSet:
    """16 batches of |N(0, 1)| activations, in shards of 65536 tokens."""
    tokens = batch * 16
    rng = np.random.default_rng(0)
    with ShardWriter(directory, d_in, shard_tokens=65536) as w:
        for lo in range(0, tokens, 65536):
            w.write(np.abs(rng.standard_normal((min(65536, tokens - lo), d_in), np.float32)))
    return ShardSet(directory)


def measure(args, data: ShardSet, *, saelens: bool = True) -> dict:
    """Every figure of one configuration (see the module docstring)."""
    peak = roofline(args.batch, args.d_in, args.d_sae, args.compute_dtype)
    ours, step_only = jaxsae_rates(args, data)
    theirs = saelens_rate(args) if saelens and not args.no_saelens else None
    dense_flops = 10 * args.batch * args.d_in * args.d_sae
    device_peak = (args.peak_tflops * 1e12 if args.peak_tflops
                   else known_peak(jax.devices()[0].device_kind))
    model_flops = step_flops(args) / args.batch  # per token
    floor = floor_parts(args, train_config(args, data), peak) if args.arch in SPARSE else None
    return {
        "machine": {**machine(), "note": args.device},
        "shape": {"arch": args.arch, "d_in": args.d_in, "d_sae": args.d_sae,
                  "batch": args.batch, "k": args.k if args.arch in SPARSE else None,
                  "widths": widths_of(args) if args.arch == "matryoshka_batchtopk" else None,
                  "compute_dtype": args.compute_dtype, "kernels": args.kernels},
        "roofline_gflops": peak / 1e9,
        "jaxsae_tokens_per_s": ours,
        "jaxsae_step_only_tokens_per_s": step_only,
        "jaxsae_gflops_dense_equivalent": ours / args.batch * dense_flops / 1e9,
        "jaxsae_over_roofline": ours / args.batch * dense_flops / peak,
        "jaxsae_over_encoder_limit": ours * 2 * args.d_in * args.d_sae / peak,
        "jaxsae_step_only_over_encoder_limit":
            step_only * 2 * args.d_in * args.d_sae / peak,
        "model_tflops": ours * model_flops / 1e12,
        "device_peak_tflops": device_peak / 1e12 if device_peak else None,
        "mfu": ours * model_flops / device_peak if device_peak else None,
        "mfu_step_only": step_only * model_flops / device_peak if device_peak else None,
        "floor_parts": floor,
        # the most the step could reach were everything but those parts free
        "floor_over_encoder_limit": (floor["encoder_matmul_s"] / sum(floor.values())
                                     if floor else None),
        "saelens_tokens_per_s": theirs,
        "jaxsae_over_saelens": ours / theirs if theirs else None,
    }


def main() -> None:
    hostmem.restart_with_huge_pages()  # as the jaxsae command does
    args = parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, write_data(Path(tmp) / "data", args.batch, args.d_in))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
