"""`jaxsae plot RUN [RUN ...] --out FILE.png`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from jaxsae import outputs
from jaxsae.commands import Command, Flag, command
from jaxsae.errors import JaxsaeError


@command("plot")
@dataclass
class Plot(Command):
    """Overlay the training curves of runs.

    Draws the loss (total and per term), L0, explained variance, dead fraction, learning rate
    and gradient norm against tokens from each run's metrics.jsonl (every SAE of a sweep) into
    one PNG, a colour per run. Each run also keeps its own curves.png."""

    runs: Annotated[tyro.conf.Positional[tuple[str, ...]], tyro.conf.arg(
        metavar="RUN [RUN ...]", help_behavior_hint="(required)")]
    """run directories (runs/NAME, or a sweep's runs/NAME)"""
    out: Annotated[str, tyro.conf.arg(metavar="FILE.png")]
    """the PNG to write"""
    title: str = ""
    """a title above the panels (default: one run's name; several are named in the legend)"""
    overwrite: Flag = False
    """replace an existing --out"""

    def run(self) -> int:
        from jaxsae import curves

        if not self.runs:
            raise JaxsaeError("RUN: give one or more run directories")
        seen: dict[Path, str] = {}
        for run in self.runs:
            if Path(run).resolve() in seen:
                raise JaxsaeError(f"RUN {run}: given twice (as {seen[Path(run).resolve()]})")
            seen[Path(run).resolve()] = run
        out = Path(self.out)
        if out.suffix.lower() != ".png":
            raise JaxsaeError(f"--out {out}: must end with .png")
        if out.is_dir() or ((out.exists() or out.is_symlink()) and not self.overwrite):
            raise JaxsaeError(f"--out {out}: exists; choose another file"
                              + ("" if out.is_dir() else " or give --overwrite"))
        if not out.parent.is_dir():
            what = "is not a directory" if out.parent.exists() else "does not exist"
            raise JaxsaeError(f"--out {out}: {out.parent} {what}")
        outputs.check_file_target(out)
        files: dict[Path, str] = {}  # a sweep's SAE given as well as its sweep: refused
        series, empty = [], []
        for run in self.runs:
            found = curves.run_metrics(Path(run))
            if not found:  # (a run, or a sweep, that has logged nothing yet)
                empty.append(Path(run).name)
            for label, path in found:
                if path.resolve() in files:
                    raise JaxsaeError(f"RUN {run}: its {path.name} is drawn already (through "
                                      f"{files[path.resolve()]})")
                files[path.resolve()] = run
                series.append((label, lines := curves.read_metrics(path)))
                if not lines:
                    empty.append(label)
        if not any(lines for _, lines in series):
            raise JaxsaeError(f"{', '.join(self.runs)}: no metrics logged yet")
        for label in empty:
            print(f"note: {label}: no metrics logged yet, not drawn", file=sys.stderr)
        drawn_series = [s for s in series if s[1]]
        # one run is named above its panels, as its own curves.png is (fault testing: the
        # picture named it nowhere); several are named in the legend
        title = self.title or (drawn_series[0][0] if len(drawn_series) == 1 else "")
        curves.plot(drawn_series, out, title=title)
        drawn = len(drawn_series)
        print(f"wrote {out} ({drawn} run{'s' if drawn != 1 else ''} drawn)")
        return 0
