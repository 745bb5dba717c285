"""`jaxsae analyze SAE_DIR --data DIR --out DIR`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from jaxsae.commands import Command, Flag, at_least_one, command, note_training, unset
from jaxsae.errors import ConfigError


@dataclass
class TokenFilter:
    """Tokens left out: those whose norm is far above the median (attention sinks), as the
    SAE's training with data.drop_norm_above left them out (jaxsae.data.window)."""

    drop_norm_above: Annotated[float | None, unset(
        "X", "the SAE's training data.drop_norm_above")] = None
    """leave out tokens whose norm is above X times the median norm of the tokens evaluated"""
    all_tokens: Flag = False
    """evaluate every token, also those training left out"""

    def drop_rule(self) -> float | str | None:
        """For `jaxsae.data.window.drop_multiple`: the flag's multiple, None (--all-tokens),
        or what the SAEs' training used."""
        from jaxsae.data.window import TRAINED

        if self.all_tokens and self.drop_norm_above is not None:
            raise ConfigError("--all-tokens and --drop-norm-above: give one")
        if self.drop_norm_above is not None and not self.drop_norm_above >= 1:
            # (as data.drop_norm_above; fault testing: analyze --drop-norm-above 0.5 left out
            # 96 % of the tokens and reported on the rest)
            raise ConfigError(f"--drop-norm-above: must be >= 1 (a multiple of the median norm: "
                              f"below 1 it drops most tokens, not outliers), got "
                              f"{self.drop_norm_above:g}")
        if self.drop_norm_above == float("inf"):  # (fault testing: reported as null, which
            # reads as "no rule given"; it leaves out nothing, as --all-tokens says)
            raise ConfigError("--drop-norm-above: inf leaves out no token; pass --all-tokens")
        if self.all_tokens:
            return None
        return TRAINED if self.drop_norm_above is None else self.drop_norm_above


Outliers = Annotated[TokenFilter, tyro.conf.OmitArgPrefixes]
"""The field type of `TokenFilter` in a command: its flags without a prefix, in a box of
their own in --help."""


@dataclass
class AnalysisInputs:
    """What the analyses (`analyze`, `stitch`) read and write: the fields they share."""

    data: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """the activations the SAEs were trained on"""
    out: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """output directory"""
    tokens: int = 65536
    """analyse the last N tokens of the data (held out only as far as training held them out:
    its last data.eval_tokens; the report's training_tokens counts the others)"""
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


@command("analyze")
@dataclass(kw_only=True)
class Analyze(AnalysisInputs, Command):
    """Feature geometry of one SAE: CSV, PNG, index.html.

    Firing density and activation histograms per latent,
    co-firing (Jaccard, parent/child candidates), decoder nearest neighbours and clusters;
    written as CSV and PNG with an index.html (see jaxsae.analysis.geometry)."""

    memory = ("--batch-size", "--cofire-tokens")

    sae_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="SAE_DIR")]
    """SAELens-format directory"""
    cofire_tokens: int = 16384
    """tokens (the first of the sample) for co-firing"""
    cluster_threshold: float = 0.7
    """decoder clusters: cos > this"""
    optimality: Flag = False
    """also test the first-order optimality conditions of dictionary learning (per latent and
    per candidate pair: optimality_latents.csv, optimality.csv, optimality.png;
    docs/optimality.md)"""
    optimality_pairs: int = 20000
    """most candidate pairs to test (siblings under a parent candidate, then co-firing pairs)"""
    sparsity_weight: Annotated[float | None, unset("LAMBDA", "the one the codes imply")] = None
    """the L1 weight λ of the objective whose conditions are tested (with --optimality)"""

    def run(self) -> int:
        from jaxsae.analysis.geometry import analyze

        at_least_one(self, "tokens", "batch_size", "cofire_tokens", "optimality_pairs")
        if not 0 < self.cluster_threshold < 1:  # (NaN too)
            raise ConfigError(f"--cluster-threshold: a cosine in (0, 1), got "
                              f"{self.cluster_threshold}")
        if self.sparsity_weight is not None and not 0 <= self.sparsity_weight < math.inf:
            raise ConfigError(f"--sparsity-weight: must be a finite number >= 0, got "
                              f"{self.sparsity_weight}")
        if self.sparsity_weight is not None and not self.optimality:  # (it would do nothing)
            raise ConfigError("--sparsity-weight: weighs the optimality test; add --optimality")
        summary = analyze(self.sae_dir, self.data, self.out, tokens=self.tokens,
                          cofire_tokens=self.cofire_tokens, batch_size=self.batch_size,
                          cluster_threshold=self.cluster_threshold, hook=self.hook,
                          progress=not self.no_progress, overwrite=self.overwrite,
                          optimality=self.optimality, optimality_pairs=self.optimality_pairs,
                          sparsity_weight=self.sparsity_weight,
                          drop_norm_above=self.outliers.drop_rule())
        from jaxsae.outputs import json_text  # (NaN: null)
        print(json_text(summary))
        note_training(summary, self.data, "analysed")
        print(f"open {Path(self.out) / 'index.html'}")
        return 0
