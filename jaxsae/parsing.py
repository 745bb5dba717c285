"""Reading configuration, whatever it configures: YAML files, dotted `a.b.c=value`
overrides, and mappings turned into (nested, frozen) dataclasses with every key and type
checked. An error names the key, and an unknown key comes with the closest known one.

Nothing here knows about SAEs: `jaxsae.config` declares the run's schema with it, the
generators (`jaxsae.data.synthetic`) and `jaxsae bench` theirs, and loss terms parse their own
hyper-parameters with `parse_value`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from jaxsae.errors import ConfigError


def from_dict(cls: type, raw: Any, key: str = "") -> Any:
    """Builds dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {typename(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in fields:
            raise ConfigError(unknown_key_message(sub, str(name), fields))
        kwargs[name] = parse_value(hints[name], value, sub)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{key or 'config'}: {e}") from None


def parse_value(tp: Any, value: Any, key: str) -> Any:
    """`value` checked against the annotation `tp` (bool, int, float, str, Literal, unions,
    tuples, mappings, dataclasses); numbers written as strings (`3e-4`) are accepted."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    # a config built in Python: a path object is its path, numpy's numbers and arrays Python's
    # (fault testing: Path("data") was "expected a string", np.int64(64) "an integer", and
    # inside a loss term's settings a traceback when config.yaml was written)
    value = python_value(value)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        # A word like `auto` is tried against the Literal first; anything else against the
        # other types in order, reporting the first one's error if none accepts it.
        options.sort(key=lambda arg: typing.get_origin(arg) is not Literal
                     or not isinstance(value, str))
        errors = []
        for arg in options:
            try:
                return parse_value(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        raise _union_error(options, value, key, errors, nullable=type(None) in args)
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(arg, bool) for arg in args):
            # YAML reads a bare on / off (yes / no) as a boolean: take the word it was
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((arg for arg in args if arg in words), value)
        if value not in args:
            choices = ", ".join(map(str, args))
            raise ConfigError(f"{key}: must be one of {choices}; got {shown(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if hasattr(tp, "parse"):  # a schema that parses itself (e.g. a list item's own keys)
            return tp.parse(value, key)
        return from_dict(tp, value, key)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {typename(value)}")
        item = args[0] if args else Any
        return tuple(parse_value(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {typename(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
        if isinstance(value, int):
            return value
        number = _as_float(value)
        if number is None or not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {shown(value)}")
        number = _as_float(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {shown(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {shown(value)}"
                              f"{_quote_hint(key, value)}")
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported by the parser")


def _quote_hint(key: str, value: Any) -> str:
    """Why YAML did not read `value` as the string it may have been meant as."""
    if isinstance(value, bool):
        return " (YAML reads yes, no, on, off as true or false: quote it)"
    if isinstance(value, int | float):
        return f" (YAML reads {value!r} as a number: quote it, {key}=\"'{value}'\")"
    if isinstance(value, datetime.date):
        return f" (YAML reads {value} as a date: quote it)"
    return ""


def _union_error(options: list, value: Any, key: str, errors: list[ConfigError], *,
                 nullable: bool = False) -> ConfigError:
    words = [str(w) for arg in options if typing.get_origin(arg) is Literal
             for w in typing.get_args(arg)]
    others = [arg for arg in options if typing.get_origin(arg) is not Literal]
    if words and others:
        words += ["null"] if nullable else []  # (fault testing: `sae.init_l0: 1.5` was told
        # "an integer or auto", leaving out the null that turns it off)
        kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        items = [kinds.get(others[0], str(others[0])), *words]
        what = " or ".join([", ".join(items[:-1]), items[-1]])
        return ConfigError(f"{key}: expected {what}, got {shown(value)}")
    if nullable and len(options) == 1:  # one choice or null (fault testing: the error left
        # null out, e.g. checkpoint.every_steps, log.wandb.mode)
        if words:
            return ConfigError(f"{key}: must be one of {', '.join(words)} or null; got "
                               f"{shown(value)}")
        simple = {int: "an integer", float: "a finite number"}.get(options[0])
        if simple is not None:
            return ConfigError(f"{key}: expected {simple} or null, got {shown(value)}")
        if options[0] is str:  # (init_from=5 was "expected a string")
            return ConfigError(f"{key}: expected a string or null, got {shown(value)}"
                               f"{_quote_hint(key, value)}")
    return errors[-1] if len(errors) == 1 or not words else errors[0]


def _as_float(value: Any) -> float | None:
    # YAML 1.1 reads `3e-4` (no dot) as a string; accept it as the number it obviously is.
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def is_positive_int(value: Any) -> bool:
    """Whether a value read from JSON / YAML is an integer > 0 (true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def refuse_repeated_overrides(overrides: Sequence[str]) -> None:
    """A `key=value` override given twice is refused, as a flag or a YAML key given twice is
    (fault testing: `optim.lr=1e-3 ... optim.lr=3e-3` trained with the last one, silently).
    The same key spelt otherwise (`loss.l1.coefficient` / `loss.1.coefficient`) is caught as
    the overrides are applied (`apply_override`'s `seen`)."""
    given: dict[str, str] = {}
    for assignment in overrides:
        if "=" not in assignment:
            continue
        key = assignment.split("=", 1)[0].strip()
        if key in given:
            raise ConfigError(f"override {key}: given twice ({given[key]} and "
                              f"{assignment.strip()}); give it once")
        given[key] = assignment.strip()


def shown(value: Any) -> str:
    """A value read from YAML as YAML writes it, for messages (null, true, 2024-01-01, 'text';
    fault testing: None, True and datetime.date(2024, 1, 1) in messages about YAML)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, datetime.date):
        return value.isoformat()
    return repr(value)


def unknown_key_message(key: str, name: str, known: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    valid = ", ".join(known) or "none"
    return f"{key}: unknown key{hint}; valid keys: {valid}"


def python_value(value: Any) -> Any:
    """`value` with path objects as strings and numpy scalars and arrays as Python numbers
    and lists, at any depth (what YAML and JSON write)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {python_value(k): python_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [python_value(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# YAML files and dotted overrides.


def apply_override(tree: dict[str, Any], assignment: str,
                   seen: dict[str, tuple[str, Any]] | None = None) -> None:
    """Applies one `a.b.c=value` (a YAML value; list items by position or name:
    `loss.1.coefficient=2`, `loss.sparsity.coefficient=2`). `seen`: what the overrides applied
    before set (their assignment and value), by the key as assigned (list items by position),
    updated; one that sets such a key again under another spelling (`loss.l1.coefficient`,
    then `loss.1.coefficient`; `optim={lr: ...}`, then `optim.lr`), or replaces a mapping an
    earlier one set a key in (`optim.lr=1e-3`, then `optim={...}`), is refused: one would
    undo the other unseen."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value (e.g. optim.lr=1e-3)")
    dotted, text = assignment.split("=", 1)
    value = override_value(dotted, text)
    key = assign(tree, dotted.strip(), value)
    if seen is not None:
        note_override(seen, key, assignment, value)


def note_override(seen: dict[str, tuple[str, Any]], key: str, assignment: str,
                  value: Any) -> None:
    """Adds `key`, set by `assignment` to `value`, to `seen` (see `apply_override`), refusing
    it if it sets or replaces what an earlier override set."""
    for earlier, (given, set_to) in seen.items():
        inside = key.startswith(earlier + ".") and sets_path(set_to, key[len(earlier) + 1:])
        if earlier == key or inside or earlier.startswith(key + "."):
            raise ConfigError(f"override {assignment.split('=', 1)[0].strip()}: "
                              f"{'replaces' if earlier.startswith(key + '.') else 'sets'} "
                              f"what {given} set; give each setting once")
    seen[key] = (assignment.strip(), copy.deepcopy(value))  # (later overrides edit the tree)


def sets_path(value: Any, path: str) -> bool:
    """Whether a value given whole sets `path` (dotted; list items by position; a key that
    holds dots itself, as a sweep's axes do, is looked up whole first)."""
    if isinstance(value, Mapping):
        if path in value:
            return True
        head, _, rest = path.partition(".")
        return bool(rest) and head in value and sets_path(value[head], rest)
    if isinstance(value, list):
        head, _, rest = path.partition(".")
        if head.isdigit() and int(head) < len(value):
            return not rest or sets_path(value[int(head)], rest)
    return False


def override_value(dotted: str, text: str) -> Any:
    """The YAML value of an override `dotted=text` (empty: None), read as config files are
    (a key given twice in a mapping is refused), errors naming the override."""
    if not text.strip():
        return None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        problem = e.problem
    except yaml.YAMLError as e:  # (a control character: a ReaderError, which has no .problem)
        problem = " ".join(str(e).split())
    raise ConfigError(f"override {dotted}: value is not valid YAML ({problem})")


def assign(tree: dict[str, Any], dotted: str, value: Any) -> str:
    """Sets `a.b.c` in a config tree (list items by position or name, see `list_index`; a
    position also as `a[1].c`, how errors name list items), creating missing mappings.
    Returns the key set, list items by their (non-negative) position."""
    parts = re.sub(r"(?<=[^.\[])\[(-?\d+)\]", r".\1", dotted).split(".")
    if not all(parts):
        raise ConfigError(f"override {dotted!r}: empty key segment")
    node: Any = tree
    key: list[str] = []
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            index = list_index(node, part, here) % len(node)
            node = node[index]
            key.append(str(index))
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            key.append(part)
        else:
            raise ConfigError(f"override {dotted}: {here} is not a mapping or list")
    last = parts[-1]
    if isinstance(node, list):
        index = list_index(node, last, dotted) % len(node)
        node[index] = value
        key.append(str(index))
    elif isinstance(node, dict):
        node[last] = value
        key.append(last)
    else:
        raise ConfigError(f"override {dotted}: {'.'.join(parts[:-1])} is not a mapping or list")
    return ".".join(key)


def list_index(node: list, part: str, key: str) -> int:
    """A list item by position, or (a list of mappings) by its label, its `name` or else its
    `term`, when one item has it: `loss.1.coefficient`, `loss.sparsity.coefficient`,
    `loss.l1.coefficient`."""
    if part.lstrip("-").isdigit():
        if not -len(node) <= int(part) < len(node):
            raise ConfigError(f"override {key}: list index out of range (list has "
                              f"{len(node)} items)")
        return int(part)
    labels = [item.get("name") or item.get("term") if isinstance(item, Mapping) else None
              for item in node]
    found = [i for i, label in enumerate(labels) if label == part]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(f"override {key}: {len(found)} items have term {part!r}; give them "
                          "names (name: ...) or use positions")
    names = [str(label) for label in labels if label is not None]
    close = difflib.get_close_matches(part, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"override {key}: no item named {part!r}{hint}; items: "
                      f"{', '.join(names) or 'none'} (or positions 0..{len(node) - 1})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last one silently: a second `lr:` further down a config would win unseen). Keys a merge
    (`<<: *base`) brings in may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (first on line "
                        f"{seen[key].start_mark.line + 1})", key_node.start_mark)
                if isinstance(key, Hashable):
                    seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}), errors naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give the config file (YAML)")
    if path.exists() and not path.is_file():  # (fault testing: /dev/null, a FIFO: "not found")
        raise ConfigError(f"{path}: not a regular file (a device or a pipe); give the config "
                          "file (YAML)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({where}{e.problem})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return tree
