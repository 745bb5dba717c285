"""`jaxsae data inspect DIR`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import tyro

from jaxsae.commands import Command, Flag, command, group, unset

group("data", "Tools for activation directories")


@command("data", "inspect")
@dataclass
class Inspect(Command):
    """Validate an activation directory and print a summary.

    Validates every shard (headers, sizes, NaN/inf) of a jaxsae shard directory or SAELens
    cache, and prints its format, size, dtype, all-zero tokens and norm statistics."""

    path: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="DIR")]
    """activation directory"""
    hook: Annotated[str | None, unset("HOOK", "the only column")] = None
    """SAELens caches: the activation column"""
    json: Flag = False
    """print JSON instead of text"""
    no_progress: Flag = False
    """no progress bar"""

    def run(self) -> int:
        from jaxsae.data.inspect import format_summary, inspect

        summary = inspect(self.path, hook=self.hook, progress=not self.no_progress)
        from jaxsae.outputs import json_text  # (NaN: null)
        print(json_text(summary) if self.json else format_summary(summary))
        return 0
