"""`jaxsae convert SAE_DIR --data DIR --out DIR`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import tyro

from jaxsae import outputs
from jaxsae.commands import Command, Flag, at_least_one, command, note_training, unset
from jaxsae.commands.analyze import Outliers, TokenFilter


@command("convert")
@dataclass(kw_only=True)
class Convert(Command):
    """A TopK SAE as a JumpReLU SAE (per-latent thresholds).

    Calibrates each latent's threshold on --data so that the JumpReLU fires where the TopK
    SAE kept the latent, as nearly as one threshold allows (see jaxsae.analysis.convert),
    writes the SAELens-format JumpReLU SAE to OUT/sae with OUT/convert.json: how its codes differ
    from the TopK SAE's on the last --tokens tokens (recall of the TopK codes, precision, both
    L0s and explained variances). stitch frankenstein needs per-latent codes (it converts
    TopK members itself)."""

    sae_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="SAE_DIR")]
    """a TopK SAE (SAELens-format directory)"""
    data: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """the activations it was trained on"""
    out: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """output directory (the JumpReLU SAE)"""
    tokens: Annotated[int | None, unset("N", "65536, or half the data if less")] = None
    """compare on the last N tokens; calibrate on the N before them"""
    hook: Annotated[str | None, unset(
        "HOOK", "the SAE's own (cfg.json hook_name), or the only column")] = None
    """SAELens caches: the activation column"""
    batch_size: int = 4096
    """tokens per block"""
    overwrite: Flag = False
    """replace an existing --out that is not this command's own output"""
    no_progress: Flag = False
    """no progress bar"""
    outliers: Outliers = field(default_factory=TokenFilter)

    def run(self) -> int:
        from jaxsae.analysis.convert import convert_dir

        at_least_one(self, *(["tokens"] if self.tokens is not None else []), "batch_size")
        report = convert_dir(self.sae_dir, self.data, self.out, tokens=self.tokens,
                             batch_size=self.batch_size, hook=self.hook,
                             overwrite=self.overwrite, drop_norm_above=self.outliers.drop_rule(),
                             progress=not self.no_progress)
        print(outputs.json_text(report))
        note_training(report, self.data, "compared")
        print(f"wrote {self.out}")
        return 0
