"""`jaxsae export RUN --out DIR`."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from jaxsae.commands import Command, Flag, command, unset


@command("export")
@dataclass
class Export(Command):
    """Export a checkpoint as a SAELens (or sparsify) directory.

    Exports a checkpointed SAE to the SAELens layout (a sweep: every SAE, to
    OUT/sweep/<i>/), to EleutherAI sparsify's (--format sparsify), or as a folder ready for
    the Hugging Face Hub (--hub)."""

    checkpoint: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="RUN")]
    """run directory or its checkpoints/ directory"""
    out: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """output directory"""
    step: Annotated[int | None, unset("N", "latest")] = None
    """checkpoint step"""
    format: Literal["saelens", "sparsify"] = "saelens"
    """the layout: SAELens (cfg.json + sae_weights.safetensors + sparsity.safetensors), or
    EleutherAI sparsify's (cfg.json + sae.safetensors; TopK SAEs)"""
    hub: Flag = False
    """write what SAELens users upload to the Hugging Face Hub: a folder per SAE named for its
    hook, a README.md model card, curves.png (upload it with huggingface-cli upload)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """weights dtype"""
    data: Annotated[str | None, unset("DIR", "the run's data.path")] = None
    """activations to evaluate on: cfg.json's eval_* figures and the firing frequencies
    (sparsity.safetensors), recorded as eval_dataset_path; the data trained on stays
    dataset_path"""
    overwrite: Flag = False
    """replace an existing --out that is not a jaxsae export, or one that holds files jaxsae
    did not write or does not know of (a jaxsae export as it wrote it is replaced without it;
    never the run itself, a run with checkpoints, or a file)"""
    no_progress: Flag = False
    """no progress bar (of the evaluation on the held-out tokens)"""

    def run(self) -> int:
        from jaxsae.finish import export_checkpoint

        out = export_checkpoint(self.checkpoint, self.out, step=self.step, dtype=self.dtype,
                                data=self.data, overwrite=self.overwrite, layout=self.format,
                                hub_layout=self.hub, progress=not self.no_progress)
        print(f"exported {out}")
        if self.hub:
            print(f"upload it with: huggingface-cli upload USER/REPO {shlex.quote(str(out))} . "
                  "--exclude .jaxsae-output.json")
        return 0
