"""The SAELens half of tests/interop, run with .venv-interop's Python (torch + sae-lens).

    python saelens_side.py JOB.json

JOB.json: {"inputs": "x.npy", "encode": [{"dir": ..., "out": ...}, ...],
           "make": [{"arch": "standard"|"topk"|"topk_rescaled"|"topk_trained"|"jumprelu"|
                             "gated"|"gated_uncentred"|"matching_pursuit",
                     "dir": ..., "out": ..., "d_in": .., "d_sae": .., "k": .., "seed": ..},
                    ...]}
encode: load each exported directory with SAE.load_from_disk and save its codes and
reconstruction of the inputs. make: build a SAELens SAE with random weights, save it with
save_model, and save its codes and reconstruction (topk_rescaled: rescale_acts_by_decoder_norm,
decoder rows not unit; topk_trained: a TopKTrainingSAE with SAELens's training defaults, saved as
its runner saves the final SAE, save_inference_model, then read back; gated_uncentred:
apply_b_dec_to_input false).
losses: [{"dir", "out", "d_in", "d_sae", "seed", "lp_norm", "l1_coefficient"}, ...]: a
StandardTrainingSAE with random weights, its training losses on the inputs (SAELens's own
training_forward_pass), and the SAE saved as a training run saves it (save_inference_model).
"""

import json
import sys

import numpy as np
import torch
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    MatchingPursuitSAE,
    MatchingPursuitSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)


def run(sae, x: np.ndarray, out: str) -> None:
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(x))
        # a (skip) transcoder's output: its forward adds the bypass that decode leaves out
        recon = (sae(torch.from_numpy(x)) if "Transcoder" in type(sae).__name__
                 else sae.decode(codes))
    np.savez(out, codes=codes.float().numpy(), recon=recon.float().numpy(),
             kind=type(sae).__name__)


def make(spec: dict):
    d_in, d_sae = spec["d_in"], spec["d_sae"]
    if spec["arch"] == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    elif spec["arch"] == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=spec["k"]))
    elif spec["arch"] == "topk_rescaled":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=spec["k"],
                                    rescale_acts_by_decoder_norm=True))
    elif spec["arch"] == "topk_trained":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=spec["k"]))
        assert sae.cfg.rescale_acts_by_decoder_norm  # (SAELens's default)
    elif spec["arch"] == "gated":
        sae = GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=d_sae))
    elif spec["arch"] == "gated_uncentred":
        sae = GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False))
    elif spec["arch"] == "matching_pursuit":  # a fixed number of steps, as jaxsae runs it
        sae = MatchingPursuitSAE(MatchingPursuitSAEConfig(
            d_in=d_in, d_sae=d_sae, max_iterations=spec["k"], residual_threshold=0.0,
            stop_on_duplicate_support=False))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        if spec["arch"] == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=gen) * 0.5)
        if spec["arch"] == "matching_pursuit":  # unit rows: r · d is a correlation
            sae.W_dec.copy_(sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True))
    if spec["arch"] == "topk_trained":
        sae.save_inference_model(spec["dir"])
        return SAE.load_from_disk(spec["dir"], device="cpu")
    sae.save_model(spec["dir"])
    return sae


def losses(spec: dict, x: np.ndarray) -> None:
    from sae_lens.saes.sae import TrainStepInput

    sae = StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=spec["d_in"], d_sae=spec["d_sae"], lp_norm=spec["lp_norm"],
        l1_coefficient=spec["l1_coefficient"]))
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=torch.from_numpy(x), coefficients={"l1": spec["l1_coefficient"]},
            dead_neuron_mask=None, n_training_steps=0, is_logging_step=False))
    sae.save_inference_model(spec["dir"])
    with open(spec["out"], "w") as f:
        json.dump({k: float(v) for k, v in out.losses.items()}, f)


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    x = np.load(job["inputs"]).astype(np.float32)
    for item in job.get("encode", []):
        run(SAE.load_from_disk(item["dir"], device="cpu"), x, item["out"])
    for spec in job.get("make", []):
        run(make(spec), x, spec["out"])
    for spec in job.get("losses", []):
        losses(spec, x)
    print("ok")


if __name__ == "__main__":
    main()
