"""`jaxsae bench CONFIG [key=value ...]`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import tyro

from jaxsae.commands import Command, Flag, Overrides, command


@command("bench")
@dataclass
class Bench(Command):
    """Compare penalties on one data set: tables and plots.

    Trains every arm of a bench config (penalty x swept
    values x seeds, each arm one vmapped sweep) and writes results.csv, results.md and PNG
    plots (L0 vs explained variance with Pareto frontiers, mcc vs L0, absorption vs L0).
    Rerunning resumes and skips finished arms; one bench at a time in a directory."""

    memory = ("sae.d_sae", "optim.batch_size", "the arms' sweeps or their sweep_chunk",
              "data.shuffle_buffer")  # (its windows: two per lane, in float32)

    resumes = True

    config: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="CONFIG")]
    """bench YAML (see configs/bench/)"""
    overrides: Overrides = ()
    """dotted overrides of the bench config, e.g. seeds=[0,1,2] base.optim.total_tokens=1e6
    arms.topk.sae.k=64 (arms.NAME=null leaves that arm out)"""
    no_progress: Flag = False
    """no progress bars"""

    def run(self) -> int:
        from jaxsae.bench import load_bench_config, run_bench

        cfg = load_bench_config(self.config, list(self.overrides))
        rows = run_bench(cfg, progress=not self.no_progress)
        out = cfg.directory
        arms = f"{len(cfg.arms)} arm" + "s" * (len(cfg.arms) != 1)
        print(f"{len(rows)} SAEs in {arms}; results in {out / 'results.md'}, "
              f"{out / 'results.csv'} and {out}/*.png")
        return 0
