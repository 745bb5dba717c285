"""The `jaxsae` command line: the registered commands (`jaxsae.commands`), each parsed by tyro.

  jaxsae synth superposition|hierarchy|hierarchy_small|circles --out DIR [--n-features N ...]
  jaxsae train CONFIG [key=value ...]
  jaxsae bench CONFIG [key=value ...]
  jaxsae export RUN --out DIR [--step N] [--dtype float32|bfloat16]
  jaxsae import SAELENS_DIR --out RUN --data DIR [key=value ...]
  jaxsae eval SAE_DIR --data DIR [--truth TRUTH] [--tokens N]
  jaxsae eval SAE_DIR... --model MODEL --text FILE... [--layer L] [--tokens N]
  jaxsae cache --model MODEL --layer L --text FILE... --tokens N --out DIR
  jaxsae stitch compare SMALL LARGE --data DIR --out DIR [--threshold 0.7]
  jaxsae stitch frankenstein SAE_DIR SAE_DIR... --data DIR --out DIR
  jaxsae analyze SAE_DIR --data DIR --out DIR [--optimality]
  jaxsae convert SAE_DIR --data DIR --out DIR
  jaxsae repair SAE_DIR --data DIR --out DIR [--truth DIR]
  jaxsae data inspect DIR [--hook HOOK] [--json]

The command words pick the command class; tyro turns the rest of the line into an instance
of it (flags from its fields, help from their docstrings). This module owns the error policy:
bad input, whether tyro finds it in the flags or the command in its files, exits with status
2 and one line `jaxsae COMMAND: error: ...` naming the culprit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import os
import re
import signal
import sys

import tyro

from jaxsae import hostmem, progress
from jaxsae.commands import Command, registry
from jaxsae.errors import JaxsaeError, describe_os_error, one_line
from jaxsae.interrupts import Terminated, clear_terminated, install_signal_handlers

DESCRIPTION = "Train sparse autoencoders on cached activations with JAX."


class UsageError(JaxsaeError):
    """Bad command words or flags; `words` are the command words that were recognised."""

    def __init__(self, message: str, words: tuple[str, ...] = ()):
        super().__init__(message)
        self.words = words


def parse(argv: list[str]) -> Command:
    """The command `argv` asks for. Bad words or flags raise `UsageError` (one line);
    `--help` prints and raises SystemExit(0)."""
    if argv[:1] in (["--version"], ["-V"]):
        print(version_line())
        raise SystemExit(0)
    commands, groups = registry()
    words: tuple[str, ...] = ()
    for arg in argv[:2]:
        if not any(key[:len(words) + 1] == (*words, arg) for key in commands):
            break
        words = (*words, arg)
        if words in commands:
            return _parse_command(commands[words], argv[len(words):])
    choices = sorted({key[len(words)] for key in commands if key[:len(words)] == words})
    rest = argv[len(words):]
    if not rest or rest[0] in ("-h", "--help"):
        print(_listing(words, choices, commands, groups))
        if not rest:  # `jaxsae` or `jaxsae stitch` alone: usage, as an error
            raise UsageError(f"a command is required: {', '.join(choices)}", words)
        raise SystemExit(0)
    close = difflib.get_close_matches(rest[0], choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"unknown command {rest[0]!r}{hint}; commands: {', '.join(choices)}",
                     words)


def version_line() -> str:
    """`jaxsae --version`: jaxsae's version with those of what its numbers depend on (for a
    bug report or a results table)."""
    import platform
    from importlib import metadata

    import jax

    import jaxsae

    return (f"jaxsae {jaxsae.__version__} (jax {jax.__version__}, jaxlib "
            f"{metadata.version('jaxlib')}, Python {platform.python_version()})")


def _parse_command(cls: type[Command], args: list[str], *, moved: bool = False) -> Command:
    """`moved`: the key=value overrides given after flags were moved before them (tyro takes
    positionals before flags only; fault testing: appending an override to a command that
    ends in --no-progress, the natural edit, was refused)."""
    _refuse_repeated_flags(args, cls.words)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = tyro.cli(cls, args=args, prog="jaxsae " + " ".join(cls.words),
                              config=(tyro.conf.OmitSubcommandPrefixes,
                                      tyro.conf.CascadeSubcommandArgs))
    except SystemExit as e:
        if e.code in (0, None):
            raise
        message = _box_to_line(captured.getvalue())
        unknown = re.match(r"unrecognized options: (\S+)", message, re.IGNORECASE)
        if cls.choices is not None and unknown and unknown.group(1) in args:
            what, words = cls.choices
            word = unknown.group(1)
            if (not word.startswith("-") and "=" not in word
                    and not any(a in words for a in args)):  # (else a stray word)
                close = difflib.get_close_matches(word, words, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"unknown {what} {word!r}{hint}; one of: {', '.join(words)}",
                                 cls.words) from None
        if (unknown := _unknown_option(cls, args)) is not None:  # (fault testing: `train -x
            # CFG` was "Missing value for argument 'config'")
            option, known = unknown
            close = difflib.get_close_matches(option, sorted(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UsageError(f"unknown option {option} ({hint}see --help)", cls.words) from None
        stray = [a for a in args if "=" in a and not a.startswith("-") and a in message]
        takes = any(f.name == "overrides" for f in dataclasses.fields(cls))
        if stray and takes and not moved:  # `train CFG --no-progress optim.lr=1e-3`: as given
            # before the flags (tyro left them unconsumed: no flag took them as its value)
            rest = [a for a in args if a not in stray]
            first = next((i for i, a in enumerate(rest) if a.startswith("-")), len(rest))
            return _parse_command(cls, [*rest[:first], *stray, *rest[first:]], moved=True)
        raise UsageError(message, cls.words) from None
    sys.stderr.write(captured.getvalue())  # warnings, if any
    return parsed


def _unknown_option(cls: type[Command], args: list[str]) -> tuple[str, set[str]] | None:
    """The first of `args` (before `--`) that looks like an option but is none of the
    command's (read from its --help: a command with choices, `synth`, from the chosen one's),
    if any, and the command's options. Numbers (`-1e-3`, `-inf`) and what follows a flag that
    takes a value (`--title -x`) are values."""
    help_args = ["--help"]
    if cls.choices is not None:
        chosen = next((a for a in args if a in cls.choices[1]), None)
        if chosen is None:  # (none named: tyro's own message says what is missing)
            return None
        help_args = [chosen, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            tyro.cli(cls, args=help_args, prog="jaxsae",
                     config=(tyro.conf.OmitSubcommandPrefixes, tyro.conf.CascadeSubcommandArgs))
    except SystemExit:
        pass
    text = out.getvalue()
    known = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))
    takes_value = set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)[ =][A-Z{]", text))
    after_flag = False
    for arg in args:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        value = after_flag
        after_flag = name.replace("_", "-") in takes_value and "=" not in arg
        if value or not arg.startswith("-") or len(arg) == 1:
            continue
        if re.fullmatch(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf|-nan", name, re.IGNORECASE):
            continue
        if name.replace("_", "-") not in known:
            return name, known
    return None


def _refuse_repeated_flags(args: list[str], words: tuple[str, ...]) -> None:
    """A flag given twice (`--data a --data b`): tyro would take the last silently, so a run
    could train on data other than the user believes."""
    seen: set[str] = set()
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("--") or len(arg) == 2:
            continue
        name = arg.split("=", 1)[0].replace("_", "-")
        if name in seen:
            raise UsageError(f"{name} given twice: give it once", words)
        seen.add(name)


def _listing(words: tuple[str, ...], choices: list[str], commands, groups) -> str:
    """`jaxsae --help`, `jaxsae stitch --help`: the commands, each with its summary."""
    prog = " ".join(("jaxsae", *words))
    rows = []
    for choice in choices:
        key = (*words, choice)
        summary = commands[key].summary() if key in commands else groups.get(choice, "")
        rows.append((choice, summary))
    width = max(len(name) for name, _ in rows)
    lines = [f"usage: {prog} COMMAND [ARGS ...]", "",
             DESCRIPTION if not words else groups.get(words[0], ""), "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, summary in rows]
    lines += ["", f"'{prog} COMMAND --help' describes a command."]
    if not words:
        lines.append("'jaxsae --version' prints the versions of jaxsae, jax, jaxlib and Python.")
    return "\n".join(lines)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RULE = set("─-━=")


def _box_to_line(text: str) -> str:
    """tyro reports a parse error as a box (UTF-8 or ASCII lines): a title, the message with
    arguments indented 4 and their help 8, a rule, then hints ("For full helptext, run ...").
    The title, message and arguments, on one line."""
    rows, title = [], ""
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        head = line.lstrip()[:1]
        if head == "╭":  # the top border holds the title
            title = line.strip().strip("╭╮─ ")
            continue
        if head == "╰":
            break
        if head == "│":
            line = line.strip()[1:-1].rstrip()
        rows.append(line)
    body, base = [], None
    for line in rows:
        inner = line.strip()
        if not inner:
            continue
        if not title:  # ASCII: the first line is the title, underlined by a rule
            title = inner
            continue
        if set(inner) <= _RULE:
            if body:
                break  # the rule before the hints
            continue
        indent = len(line) - len(line.lstrip())
        base = indent if base is None else base
        if indent < base + 8:  # deeper: an argument's help text
            body.append(inner)
    message = " ".join(" ".join(body).split())
    # An optional number's error lists the None alternative too: not what the user meant.
    message = re.sub(r" ?- <class 'NoneType'>: .*? does not match choices \('None',\)", "",
                     message)
    message = re.sub(r"<class '(\w+)'>", r"\1", message)
    if not message:
        message = " ".join(text.split()) or "bad arguments"
    if title and not message.lower().startswith(title.lower()):
        message = f"{title.lower()}: {message}"
    return message + " (see --help)"


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None
    if as_program:  # run as the program: restart once with huge pages (see jaxsae.hostmem)
        hostmem.restart_with_huge_pages()
        argv = sys.argv[1:]
        install_signal_handlers()
    clear_terminated()
    name, again = "jaxsae", ""  # until the command is known
    try:
        cmd = parse(argv)
        name = " ".join(("jaxsae", *cmd.words))
        if cmd.resumes:  # (fault testing: a Ctrl-C as a run evaluated said only "aborted")
            again = "; run the same command again to continue where it stopped"
        return _run(cmd, name)
    except UsageError as e:
        print(f"{' '.join(('jaxsae', *e.words))}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `jaxsae synth superposition --help | head`
        return _reader_gone()
    except Terminated:
        print(f"{name}: terminated (SIGTERM){again}", file=sys.stderr)
        clear_terminated()
        if as_program:
            _exit_now(128 + signal.SIGTERM)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{name}: aborted{again}", file=sys.stderr)
        clear_terminated()
        if as_program:
            _exit_now(130)
        return 130


def _reader_gone() -> int:
    """SIGPIPE's status when stdout's reader stopped reading, and no second error when Python
    flushes stdout at exit."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def _run(cmd: Command, name: str) -> int:
    """The command, with bad input (flags, files, sizes) reported in one line."""
    try:
        progress.seconds_between_lines()  # (its environment variable, checked up front)
        return cmd.run()
    except BrokenPipeError:  # stdout closed by its reader (`jaxsae data inspect D | head`)
        return _reader_gone()
    except JaxsaeError as e:
        code = getattr(e, "exit_code", 2)
        # a stop asked for (Ctrl-C, SIGTERM: a checkpoint saved) is no error (fault testing:
        # "error: interrupted by SIGINT" alarmed readers of cluster logs)
        kind = "" if code >= 128 else "error: "
        print(f"{name}: {kind}{one_line(str(e))}", file=sys.stderr)
        return code
    except OSError as e:  # the file system refused: disk full, read-only, not a directory
        print(f"{name}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except MemoryError as e:  # sizes (flags, config) beyond this machine's memory
        detail = f" ({one_line(str(e))})" if str(e) else ""
        print(f"{name}: error: out of memory{detail}: the sizes asked for{_sizes(cmd)} need "
              "more memory than this machine has", file=sys.stderr)
        return 2
    except Exception as e:
        if not _device_out_of_memory(e):
            raise
        print(f"{name}: error: out of memory on {_device_words()} "
              f"({one_line(str(e).splitlines()[0])}): the sizes asked for{_sizes(cmd)} need "
              "more memory than it has", file=sys.stderr)
        return 2


def _sizes(cmd: Command) -> str:
    """The command's settings that size its memory, for the error to name."""
    settings = cmd.memory_settings()
    return f" ({', '.join(settings)}, ...)" if settings else ""


def _device_out_of_memory(error: Exception) -> bool:
    """An XLA allocation that failed (JAX raises it as a JaxRuntimeError: no MemoryError);
    on the CPU, XLA's YNNPACK kernels report one as an INTERNAL "YNNPACK operation failed"
    (after printing "allocate of <n> failed"; fault testing: a traceback, exit status 1)."""
    text = str(error)
    return (type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
            and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text
                 or "YNNPACK operation failed" in text))


def _device_words() -> str:
    import jax  # (imported already: only a JAX computation gets here)

    return "the CPU" if jax.default_backend() == "cpu" else f"the {jax.default_backend()}"


def _exit_now(code: int) -> None:
    """Ends the process without the interpreter's teardown, once the interrupted command has
    cleaned up (its staging directories removed, checkpoints closed): an interrupt during an
    XLA compilation leaves the compiler's threads running, and tearing the runtime down under
    them crashed the process (SIGSEGV in 3 of 4 `synth synthsaebench` runs interrupted 6 s in,
    2026-12-03; exit status 139 instead of 130)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
