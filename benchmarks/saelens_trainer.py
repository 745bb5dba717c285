"""SAELens's SAETrainer tokens/s, fed from memory (run with .venv-interop's Python).

    python saelens_trainer.py --arch standard|topk|batchtopk|matryoshka_batchtopk[,...] \
        --d-in 768 --d-sae 12288 --batch 4096 --k 32 [--widths 768,3072,12288] \
        [--device auto|cpu|cuda] [--autocast]

Times SAETrainer.fit() step by step: the data provider records when each batch is requested,
so the gaps between requests are whole training steps (forward, backward, optimizer, SAELens's
bookkeeping; on CUDA the provider waits for the device first, so queued work is counted).
Prints a JSON line per architecture (several, comma-separated, share one start of Python,
torch and SAELens) with the median step time after two warm-up steps. --device auto: CUDA when
torch sees a GPU. --autocast: SAELens's bf16 autocast (float32 parameters, bf16 matmuls: as
jaxsae's optim.compute_dtype bfloat16).
"""

import argparse
import itertools
import json
import time

import torch
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

ARCHS = ("standard", "topk", "batchtopk", "matryoshka_batchtopk")


def arch_list(text: str) -> list[str]:
    archs = text.split(",")
    if not all(a in ARCHS for a in archs):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(ARCHS)}, got {text!r}")
    return archs


parser = argparse.ArgumentParser()
parser.add_argument("--arch", type=arch_list, required=True,
                    help=f"one or more of {','.join(ARCHS)}, comma-separated")
parser.add_argument("--d-in", type=int, default=768)
parser.add_argument("--d-sae", type=int, default=12288)
parser.add_argument("--batch", type=int, default=4096)
parser.add_argument("--k", type=int, default=32)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--widths", default=None, help="matryoshka_batchtopk: comma-separated widths")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
parser.add_argument("--autocast", action="store_true", help="bf16 autocast (SAETrainerConfig)")
args = parser.parse_args()
if "matryoshka_batchtopk" in args.arch and not args.widths:
    parser.error("--widths: required with --arch matryoshka_batchtopk")
device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device


def training_sae(arch: str):
    shape = {"d_in": args.d_in, "d_sae": args.d_sae, "device": device}
    if arch == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(**shape, l1_coefficient=1.0))
    if arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**shape, k=args.k))
    if arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**shape, k=args.k))
    widths = [int(w) for w in args.widths.split(",")]
    return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        **shape, k=args.k, matryoshka_widths=widths))


def step_seconds(arch: str) -> float:
    torch.manual_seed(0)
    sae = training_sae(arch)
    batch = torch.randn(args.batch, args.d_in).abs().to(device)
    stamps = []

    def provider():
        while True:
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            yield batch

    cfg = SAETrainerConfig(total_training_samples=args.batch * args.steps,
                           train_batch_size_samples=args.batch, lr_end=3e-5, device=device,
                           autocast=args.autocast, logger=LoggingConfig(log_to_wandb=False))
    SAETrainer(cfg=cfg, sae=sae, data_provider=provider()).fit()
    steps = sorted(b - a for a, b in itertools.pairwise(stamps[2:]))  # after two warm-ups
    return steps[len(steps) // 2]


for arch in args.arch:
    step_s = step_seconds(arch)
    print(json.dumps({"arch": arch, "step_s": step_s, "tokens_per_s": args.batch / step_s,
                      "device": device, "autocast": args.autocast,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}),
          flush=True)
