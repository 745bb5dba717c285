"""The commands of `jaxsae`: one dataclass per command, registered by the words that name it.

A command is a dataclass whose fields are its arguments, each documented by the string under
it (that string is its `--help` text), and whose `run()` does the work and returns the exit
status. `jaxsae.cli` turns the registered classes into the command line (with tyro) and owns
the error policy; from Python, build the dataclass and call `run()`:

    from jaxsae.commands.train import Train
    Train(config="configs/quickstart.yaml", overrides=["optim.lr=1e-3"]).run()

Adding a command is one module in this package defining a subclass decorated with
`@command("name")` (or `@command("group", "name")` under a group such as `stitch`, whose help
`group()` sets); every module here is imported by `registry()`. Commands import what they run
inside `run()`, so `jaxsae --help` stays fast and never loads PyTorch.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import sys
import typing
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, TypeVar

import tyro

from jaxsae.errors import JaxsaeError, require_at_least

Flag = Annotated[bool, tyro.conf.FlagCreatePairsOff, tyro.conf.arg(help_behavior_hint="")]
"""A switch that is off unless given (`--no-progress`), without a generated `--no-no-...`."""

Overrides = Annotated[tuple[str, ...], tyro.conf.Positional,
                      tyro.conf.arg(metavar="[key=value ...]", help_behavior_hint="")]
"""`train CONFIG a.b=1 c=2`: dotted config overrides (see jaxsae.parsing)."""


def unset(metavar: str, meaning: str) -> object:
    """For an optional field whose None means something: `--step N ... (default: latest)`."""
    return tyro.conf.arg(metavar=metavar, help_behavior_hint=f"(default: {meaning})")


class Command:
    """The base class of every command."""

    words: ClassVar[tuple[str, ...]] = ()
    """How it is called: ("train",), ("stitch", "compare"); set by `@command`."""
    resumes: ClassVar[bool] = False
    """Whether the same command, run again after an interruption, continues where it stopped
    (said when Ctrl-C or SIGTERM stops it)."""
    choices: ClassVar[tuple[str, tuple[str, ...]] | None] = None
    """A command whose first argument is one of several words (`synth`'s generators): what
    they are called and the words, for an error that names an unknown one."""
    memory: ClassVar[tuple[str, ...]] = ()
    """The settings that size its memory, for an out-of-memory error to name (fault
    testing: `eval` and `analyze` named train's sae.d_sae and optim.batch_size)."""

    def memory_settings(self) -> tuple[str, ...]:
        """`memory`, as this invocation uses them (a command of several modes: its mode's)."""
        return self.memory

    def __post_init__(self):
        """Arguments given from Python as a user would write them: a path object is its path,
        and a single string (or path) where several are taken is a tuple of one (fault
        testing: `Eval(sae_dir="runs/a/sae", ...)` read each character as an SAE, and
        `overrides="k=v"` each character as an override)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            several = typing.get_origin(hints.get(f.name)) in (tuple, list)
            if isinstance(value, str | os.PathLike):
                value = os.fspath(value)
                value = (value,) if several else value
            elif several and isinstance(value, list | tuple):
                value = tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
            else:
                continue
            object.__setattr__(self, f.name, value)

    def run(self) -> int:
        """Does the work; returns the exit status (bad input raises `JaxsaeError`)."""
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring: the command's line in `jaxsae --help`."""
        return inspect.cleandoc(cls.__doc__ or "").split("\n")[0].rstrip(".")


_COMMANDS: dict[tuple[str, ...], type[Command]] = {}
_GROUPS: dict[str, str] = {}
C = TypeVar("C", bound=type[Command])


def command(*words: str) -> Callable[[C], C]:
    """Registers a command class under `words` (one word, or a group and a word)."""
    if not 1 <= len(words) <= 2:
        raise ValueError(f"a command is one word or a group and a word, got {words}")

    def register(cls: C) -> C:
        if words in _COMMANDS:
            raise ValueError(f"command {' '.join(words)!r} is registered twice")
        cls.words = words
        _COMMANDS[words] = cls
        reflow_field_help(cls)
        return cls

    return register


def field_help(cls: type) -> dict[str, str]:
    """Each field's docstring (its own class's, through the MRO) as one paragraph."""
    import docstring_parser

    docs: dict[str, str] = {}
    for owner in reversed(cls.__mro__):
        if dataclasses.is_dataclass(owner):
            docs.update({p.arg_name: " ".join(p.description.split())
                         for p in docstring_parser.parse_from_object(owner).params
                         if p.description})
    return docs


def reflow_field_help(cls: type) -> None:
    """Gives each field its docstring as one paragraph of help. tyro (1.0) keeps the line
    breaks of an attribute docstring whose lines are indented, as every docstring in a class
    body is, so a sentence broke wherever the source did. The annotations are set on `cls`
    (inherited fields included), never on the classes it inherits from."""
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_help(cls)
    cls.__annotations__ = {**hints, **{name: Annotated[hints[name], tyro.conf.arg(help=text)]
                                       for name, text in docs.items() if name in hints}}


def group(name: str, description: str) -> None:
    """Describes a group of commands (its line in `jaxsae --help`)."""
    _GROUPS[name] = description


def registry() -> tuple[dict[tuple[str, ...], type[Command]], dict[str, str]]:
    """Every command (words -> class) and every group's description, all modules imported."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(_COMMANDS), dict(_GROUPS)


def at_least_one(command: Command, *names: str) -> None:
    """Refuses a field below 1, naming its flag."""
    require_at_least(*((f"--{name.replace('_', '-')}", getattr(command, name), 1)
                       for name in names))


def only_with(command: object, mode: str, *names: str) -> None:
    """Refuses flags, given (not None, not False), that belong to another mode
    (`--windows-per-batch goes with --model`)."""
    for name in names:
        value = getattr(command, name)
        if value is not None and value is not False:
            raise JaxsaeError(f"--{name.replace('_', '-')} goes with {mode}")


def note_training(report: dict[str, Any], data: str, what: str = "evaluated") -> None:
    """On stderr: how many of the tokens an evaluation read its SAE was trained on, when it
    read any (`jaxsae.data.window.training_note`)."""
    from jaxsae.data.window import training_note

    note = training_note(report, data, what)
    if note is not None:
        print(note, file=sys.stderr)
