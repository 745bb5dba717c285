"""SAELens's SAETrainer tokens/s, fed from memory (run with .venv-interop's Python).

    python saelens_trainer.py --arch standard|topk|batchtopk|matryoshka_batchtopk \
        --d-in 768 --d-sae 12288 --batch 4096 --k 32 [--widths 768,3072,12288]

Times SAETrainer.fit() step by step: the data provider records when each batch is requested,
so the gaps between requests are whole training steps (forward, backward, optimizer, SAELens's
bookkeeping). Prints JSON with the median step time after two warm-up steps.
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

parser = argparse.ArgumentParser()
parser.add_argument("--arch", choices=["standard", "topk", "batchtopk", "matryoshka_batchtopk"],
                    required=True)
parser.add_argument("--d-in", type=int, default=768)
parser.add_argument("--d-sae", type=int, default=12288)
parser.add_argument("--batch", type=int, default=4096)
parser.add_argument("--k", type=int, default=32)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--widths", default=None, help="matryoshka_batchtopk: comma-separated widths")
args = parser.parse_args()
if args.arch == "matryoshka_batchtopk" and not args.widths:
    parser.error("--widths: required with --arch matryoshka_batchtopk")

torch.manual_seed(0)
if args.arch == "standard":
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae,
                                                        l1_coefficient=1.0))
elif args.arch == "topk":
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k))
elif args.arch == "batchtopk":
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae,
                                                          k=args.k))
else:
    widths = [int(w) for w in args.widths.split(",")]
    sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=args.d_in, d_sae=args.d_sae, k=args.k, matryoshka_widths=widths))
batch = torch.randn(args.batch, args.d_in).abs()
stamps = []


def provider():
    while True:
        stamps.append(time.perf_counter())
        yield batch


cfg = SAETrainerConfig(total_training_samples=args.batch * args.steps,
                       train_batch_size_samples=args.batch, lr_end=3e-5,
                       logger=LoggingConfig(log_to_wandb=False))
SAETrainer(cfg=cfg, sae=sae, data_provider=provider()).fit()
steps = sorted(b - a for a, b in itertools.pairwise(stamps[2:]))  # after two warm-up steps
step_s = steps[len(steps) // 2]
print(json.dumps({"arch": args.arch, "step_s": step_s, "tokens_per_s": args.batch / step_s,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
