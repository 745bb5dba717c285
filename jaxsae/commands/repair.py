"""`jaxsae repair SAE_DIR --data DIR --out DIR`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import tyro

from jaxsae.commands import Command, Flag, at_least_one, command, note_training, unset
from jaxsae.commands.analyze import Outliers, TokenFilter


@command("repair")
@dataclass(kw_only=True)
class Repair(Command):
    """Project absorbed parent / child components out of an SAE.

    Finds the child / parent latent pairs (jaxsae analyze's kinds, kept in OUT/analysis),
    removes the parent's direction from each child's decoder and the children's directions
    from the parent's encoder (docs/optimality.md, "Repair"), writes the SAE to OUT/sae and
    the reconstruction and L0 before / after (with --truth: absorption and parent recall too)
    to OUT/repair.json and repair.md."""

    memory = ("--batch-size",)

    sae_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="SAE_DIR")]
    """SAELens-format directory"""
    data: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """the activations it was trained on"""
    out: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """output directory"""
    truth: Annotated[str | None, unset("DIR", "none")] = None
    """the data's `jaxsae synth` directory: ground-truth metrics before / after"""
    tokens: int = 65536
    """analyse and evaluate on the last N tokens"""
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
        from jaxsae.analysis.repair import repair
        from jaxsae.outputs import json_text

        at_least_one(self, "tokens", "batch_size")
        report = repair(self.sae_dir, self.data, self.out, tokens=self.tokens,
                        batch_size=self.batch_size, truth=self.truth, hook=self.hook,
                        progress=not self.no_progress, overwrite=self.overwrite,
                        drop_norm_above=self.outliers.drop_rule())
        print(json_text({k: report[k] for k in ("before", "after")}))
        note_training(report, self.data)
        print(f"{len(report['pairs'])} pairs repaired; wrote {self.out}")
        return 0
