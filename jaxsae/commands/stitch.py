"""`jaxsae stitch compare SMALL LARGE ...` and `jaxsae stitch frankenstein BASE OTHER... ...`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from jaxsae.commands import Command, at_least_one, command, group, note_training, unset
from jaxsae.commands.analyze import AnalysisInputs
from jaxsae.errors import JaxsaeError

group("stitch", "Compare and combine SAEs of different widths (see jaxsae.analysis.stitch)")


def _check(command: AnalysisInputs, threshold: float) -> dict:
    at_least_one(command, *(["tokens"] if command.tokens is not None else []), "batch_size")
    if not 0 < threshold < 1:
        raise JaxsaeError(f"--threshold must be between 0 and 1, got {threshold}")
    return {"threshold": threshold, "tokens": command.tokens, "batch_size": command.batch_size,
            "hook": command.hook, "progress": not command.no_progress,
            "overwrite": command.overwrite, "drop_norm_above": command.outliers.drop_rule()}


@command("stitch", "compare")
@dataclass(kw_only=True)
class Compare(AnalysisInputs, Command):
    """Novel vs reconstruction latents and their MSE effect.

    Splits LARGE's latents by their max
    decoder cosine to SMALL into novel (<= threshold) and reconstruction latents; for each, the
    change in SMALL's MSE when it is inserted; for each parent -> children component, the MSE
    and L0 change of swapping it in. Writes stitch.csv, components.csv, summary.md/json and PNG
    plots."""

    memory = ("--batch-size",)

    small: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="SMALL")]
    """the narrower SAE (SAELens-format directory)"""
    large: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="LARGE")]
    """the wider SAE"""
    threshold: float = 0.7
    """novel: max cos <= this"""

    def run(self) -> int:
        from jaxsae.analysis import stitch

        summary = stitch.compare(self.small, self.large, self.data, self.out,
                                 **_check(self, self.threshold))
        print(Path(self.out, "summary.md").read_text())
        note_training(summary, self.data)
        print(f"wrote {self.out}")
        return 0


@command("stitch", "frankenstein")
@dataclass(kw_only=True)
class Frankenstein(AnalysisInputs, Command):
    """Stitch the novel latents of a family of widths.

    Starts from the narrowest SAE, adds from each wider one the latents whose decoder cosine
    to everything already included is below the threshold, retrains only the decoder (encoder
    frozen) and exports the result to OUT/sae. OUT also
    holds stitched/ (the SAE before the retraining), retrain/ (the retraining's config,
    metrics and SAE), and frankenstein.md / frankenstein.csv (width, L0 and MSE of the family
    and of both stitched SAEs, on the last --tokens of the data)."""

    memory = ("--batch-size",)

    resumes = True

    saes: Annotated[tyro.conf.Positional[tuple[str, ...]], tyro.conf.arg(
        metavar="SAE_DIR SAE_DIR...", help_behavior_hint="(required)")]
    """the family: two or more SAEs (ReLU, JumpReLU, BatchTopK, or TopK: converted to JumpReLU
    first; any order: sorted by width)"""
    threshold: float = 0.7
    """add latents with cos < this"""
    tokens: Annotated[int | None, unset("N", "as training holds out: min(65536, 5% of the "
                                        "data)")] = None
    """evaluate on the last N tokens of the data; the decoder is retrained on the others"""
    retrain_decoder_tokens: int = 2_000_000
    """tokens of decoder-only training (0: none)"""
    lr: float = 1e-3
    """decoder retraining learning rate"""

    def run(self) -> int:
        from jaxsae.analysis import stitch

        common = _check(self, self.threshold)
        if len(self.saes) < 2:
            raise JaxsaeError(f"stitching needs two or more SAEs, got {len(self.saes)}")
        if self.retrain_decoder_tokens < 0:
            raise JaxsaeError("--retrain-decoder-tokens must be >= 0")
        stitch.frankenstein(list(self.saes), self.data, self.out, lr=self.lr,
                            retrain_decoder_tokens=self.retrain_decoder_tokens, **common)
        print(Path(self.out, "frankenstein.md").read_text())
        print(f"wrote {self.out}")
        return 0
