"""`jaxsae import SAELENS_DIR --out RUN --data DIR [key=value ...]`."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Annotated

import tyro

from jaxsae.commands import Command, Flag, Overrides, command


@command("import")
@dataclass
class Import(Command):
    """Start a run from an existing SAELens or sparsify dictionary.

    Writes RUN/config.yaml that trains (fine-tunes) starting from it (init_from; a sparsify
    TopK SAE is converted to RUN/imported-sae first); then train it with `jaxsae train
    RUN/config.yaml`."""

    sae_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="SAE_DIR")]
    """a SAELens directory (cfg.json + sae_weights.safetensors) or an EleutherAI sparsify
    one (cfg.json + sae.safetensors)"""
    out: Annotated[str, tyro.conf.arg(metavar="RUN")]
    """run directory to create (an untrained import there is replaced)"""
    data: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """activations to train on"""
    overrides: Overrides = ()
    """config overrides, e.g. optim.total_tokens=10_000_000 (not of what the arguments set:
    data.path, init_from, run_dir, name; nor the whole data section: data.KEY=... each)"""
    overwrite: Flag = False
    """replace an existing --out that is not an untrained import (never a run with
    checkpoints)"""

    def run(self) -> int:
        from jaxsae.export import import_config

        config = import_config(self.sae_dir, self.out, self.data, list(self.overrides),
                               overwrite=self.overwrite)
        print(f"wrote {config}\ntrain it with: jaxsae train {shlex.quote(str(config))}")
        return 0
