"""`jaxsae synth KIND --out DIR [--SPEC-FIELD VALUE ...]`."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

import tyro

from jaxsae.commands import Command, Flag, command, reflow_field_help
from jaxsae.data.synthetic import GENERATORS
from jaxsae.errors import ConfigError


def _unchecked(spec: type) -> type:
    """The spec's fields without its checks, so that flags can hold values that are only
    valid together (`--n-trees 2 --d-in 8`); `Synth.run` builds the checked spec from them."""
    hints = typing.get_type_hints(spec)
    from_preset = [  # `--roots INT (default: the preset's)`, not "(default: None)"
        (f.name, Annotated[hints[f.name], tyro.conf.arg(
            metavar=_metavar(hints[f.name]), help_behavior_hint="(default: the preset's)")],
         dataclasses.field(default=None))
        for f in dataclasses.fields(spec) if f.default is None]
    flags = dataclasses.make_dataclass(
        spec.__name__, from_preset, bases=(spec,), frozen=True,
        namespace={"__post_init__": lambda self: None, "__doc__": spec.__doc__,
                   "__module__": spec.__module__, "checked": spec})
    reflow_field_help(flags)
    return flags


def _metavar(hint) -> str:
    """INT for `int | None`."""
    return next(t for t in typing.get_args(hint) if t is not type(None)).__name__.upper()


def _kinds() -> Any:
    """One subcommand per generator, its flags the spec's fields, its defaults the preset's."""
    options = []
    for kind, gen in GENERATORS.items():
        flags = _unchecked(gen.spec)
        options.append(Annotated[flags, tyro.conf.subcommand(
            kind, default=flags(**gen.defaults), description=gen.description)])
    return Union[tuple(options)]  # noqa: UP007 (a Union built from a tuple of types)


Kind = _kinds()


@command("synth")
@dataclass
class Synth(Command):
    """Generate synthetic activations with known features.

    Writes activation shards plus the truth
    files (truth.json, truth.safetensors) that `jaxsae eval --truth` and the bench read."""

    choices = ("generator", tuple(GENERATORS))

    spec: tyro.conf.OmitSubcommandPrefixes[Kind]
    """what to generate (a generator and its parameters)"""
    out: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """output directory (new; an existing shard directory only with --overwrite)"""
    overwrite: Flag = False
    """replace an existing --out"""
    no_progress: Flag = False
    """no progress bar"""

    def run(self) -> int:
        from jaxsae.data import synthetic

        checked = getattr(type(self.spec), "checked", type(self.spec))
        try:
            spec = checked(**{f.name: getattr(self.spec, f.name)
                              for f in dataclasses.fields(checked)})
        except ConfigError as e:  # "probs: each must be in (0, 1]" -> "--probs: ..."
            field, _, why = str(e).partition(": ")
            raise ConfigError(f"--{field.replace('_', '-')}: {why}") from None
        out = synthetic.write(spec, self.out, overwrite=self.overwrite,
                              progress=not self.no_progress, tokens_key="--tokens")
        print(f"wrote {out}")
        return 0
