"""Everything jaxsae writes as a result: directories staged and renamed into place, and single
files (text, CSV, PNG) written atomically.

A command that writes a directory (`export`, `import`, `synth`, `cache`, `stitch`, `analyze`)
builds it in a staging directory beside the target and renames it into place when complete, so
an interrupted command never leaves a half-written output. What may be replaced is one rule,
`check_target`: a missing path or an empty directory; an output jaxsae wrote of the same kind,
holding nothing but what jaxsae wrote there, unchanged (its marker lists every file, with its
size and time; a SAELens directory holds the layout's three files, its cfg.json recording
the others' and a digest of itself; the shard writers replace a
shard directory only with `--overwrite`); any other directory only with `--overwrite` (but
inside a training run, whose outputs are its own, nothing but its own kind of output), and
never a file, a directory holding a run with checkpoints at any depth (even inside an output
of the same kind), the command's own inputs, the working directory, the home directory, the
Python environment running jaxsae or its code (or a directory above one); and nothing is written
inside the command's inputs or a run's checkpoints/. A replaced directory is moved aside first
and removed only once the new one is in place.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxsae import interrupts
from jaxsae.errors import ConfigError, DataError, JaxsaeError, NonFiniteError, naming
from jaxsae.runlock import LOCK_FILE, RunLock, RunLocked

# Written into the output directories whose own files do not say that jaxsae wrote them
# (SAELens directories say it in cfg.json, shard directories in manifest.json). It lists
# every file and directory the output held when it was written ("files"), so that what a user
# adds to it later is never replaced without --overwrite.
MARKER = ".jaxsae-output.json"

SAELENS_FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
"""The files of an SAE directory in the SAELens layout (the export contract)."""


class OutputError(JaxsaeError):
    """An output path that jaxsae must not write or replace."""


def write_marker(directory: Path, kind: str, *, inventory: bool = False,
                 leave_out: Sequence[str] = ()) -> None:
    """Marks `directory` as jaxsae's `kind` output; with `inventory`, listing what it holds
    now (bar `leave_out`: what goes before it is published), each file with its size,
    modification time and digest (call it on a complete output, just before it is
    published)."""
    mark: dict[str, Any] = {"kind": kind}
    if inventory:
        found = file_inventory(directory, digests=True)
        for name in (MARKER, *leave_out):
            found.pop(name, None)
        mark["files"] = dict(sorted(found.items()))
    write_file(directory / MARKER, json.dumps(mark) + "\n")


def file_inventory(directory: Path, *, digests: bool = False) -> dict[str, Any]:
    """Every entry below `directory` by relative POSIX path: "dir", "link", or a file's
    [size, modification time in ns] (links are listed, not followed), with `digests` and its
    content's digest (`file_digest`) too."""
    found: dict[str, Any] = {}
    for root, dirs, files in os.walk(directory):
        base = Path(root).relative_to(directory)
        for name in (*dirs, *files):
            path = Path(root) / name
            if path.is_symlink():
                state: Any = "link"
            elif path.is_dir():
                state = "dir"
            else:
                info = path.stat()
                state = [info.st_size, info.st_mtime_ns]
                if digests:
                    state.append(file_digest(path))
            found[(base / name).as_posix()] = state
    return found


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's content (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def _unchanged(path: Path, now: Any, recorded: Any) -> bool:
    """Whether an entry is as an inventory recorded it: a file of the same size and
    modification time, or of the same size and content where the inventory has its digest
    (fault testing: a run directory copied with `cp -r`, new times on every file, was refused
    as "changed" throughout)."""
    if not (isinstance(now, list) and isinstance(recorded, list)):
        return now == recorded
    if now[0] != recorded[0]:
        return False
    if now[1] == recorded[1]:
        return True
    return len(recorded) > 2 and file_digest(path) == recorded[2]


def foreign_entries(path: Path) -> list[str] | None:
    """What `path`, a jaxsae output, holds that jaxsae did not write there, or changed since
    (relative paths; a foreign directory is named, not what it holds), or None when that
    cannot be told: an output of an earlier jaxsae, whose marker lists no files."""
    path = Path(path)
    try:
        mark = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        mark = None
    if isinstance(mark, dict):
        listed = mark.get("files")
        if not isinstance(listed, dict):
            return None
        known: dict[str, Any] = {**listed, MARKER: None, LOCK_FILE: None}  # (`move_locked_staging`)
    elif output_kind(path) == "sae":
        known = dict.fromkeys(SAELENS_FILES)  # (no marker: its cfg.json records the others)
    else:
        return None
    foreign, named_dirs = [], []
    if MARKER not in known:
        recorded, cfg_changed = _sae_record(path)
        known.update(recorded)
        if cfg_changed:
            foreign.append(f"{SAELENS_FILES[0]} (changed)")
    now = file_inventory(path)
    for name in sorted(now):
        if any(name.startswith(f"{other}/") for other in named_dirs):
            continue  # inside a directory already named
        if name not in known:
            foreign.append(name + ("/" if now[name] == "dir" else ""))
            if now[name] == "dir":
                named_dirs.append(name)
        elif known[name] is not None and not _unchanged(path / name, now[name], known[name]):
            foreign.append(f"{name} (changed)")
    return foreign


_DIGEST = "cfg_digest"


def record_sae_files(directory: Path, cfg_json: dict[str, Any]) -> None:
    """Records, in the `jaxsae` block of the cfg.json about to be written into `directory` (a
    SAELens layout, which has no room for a marker), the size, modification time and digest of
    its other files and a digest of cfg.json's own content, so that a later replacement can tell
    an edited or replaced file (`foreign_entries`)."""
    found = file_inventory(directory, digests=True)
    own = cfg_json["jaxsae"]
    own["files"] = {name: found[name] for name in SAELENS_FILES[1:] if name in found}
    own[_DIGEST] = _cfg_digest(cfg_json)


def _cfg_digest(cfg_json: dict[str, Any]) -> str:
    """sha256 of the cfg's content without the digest itself (key order and spacing aside)."""
    own = {k: v for k, v in cfg_json["jaxsae"].items() if k != _DIGEST}
    # (as the file holds it: NaN and inf written as null; fault testing: an SAE whose
    # explained variance is null could never be replaced, its cfg.json "changed")
    text = json.dumps(_finite_or_none({**cfg_json, "jaxsae": own}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _sae_record(path: Path) -> tuple[dict[str, Any], bool]:
    """What a SAELens directory's cfg.json recorded of its files (`record_sae_files`; none
    for an export of a jaxsae before 2026-12-05, checked by name only), and whether the
    cfg.json was changed since."""
    try:
        cfg = json.loads((path / SAELENS_FILES[0]).read_text())
        own = cfg["jaxsae"]
        files, digest = own["files"], own[_DIGEST]
    except (OSError, ValueError, KeyError, TypeError):
        return {}, False
    if not isinstance(files, dict):
        return {}, True
    recorded = {name: files[name] for name in SAELENS_FILES[1:] if name in files}
    return recorded, digest != _cfg_digest(cfg)


def added_files_message(where: str, foreign: list[str] | None) -> str | None:
    """Why a jaxsae output at `where` may not be replaced as it is (None: it may be)."""
    if foreign is None:
        return (f"{where}: was written by an earlier jaxsae, which did not record its files, "
                "so files added to it since cannot be told apart")
    if foreign:
        names = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        return f"{where}: holds files jaxsae did not write ({names})"
    return None


def output_kind(path: Path) -> str | None:
    """What jaxsae wrote at `path`: the kind in its marker, `sae` for a SAELens directory
    whose cfg.json jaxsae wrote, `shards` for a jaxsae shard directory; None otherwise."""
    path = Path(path)
    for name, read in ((MARKER, lambda d: d.get("kind")),
                       ("cfg.json", lambda d: "sae" if isinstance(d.get("jaxsae"), dict)
                        else None),
                       ("manifest.json", lambda d: "shards" if d.get("format") == "jaxsae.shards"
                        else None)):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and (kind := read(data)):
            return kind
    return None


def holds_run(path: Path) -> Path | None:
    """A training run directory (one with checkpoints/) at `path` or anywhere below it (links
    are not followed), if there is one."""
    for root, dirs, _ in os.walk(path):
        if "checkpoints" in dirs and (Path(root) / "checkpoints").is_dir():
            return Path(root)
    return None


def run_around(path: Path) -> Path | None:
    """The training run directory (one with checkpoints/) that `path` lies inside, if any."""
    for parent in Path(path).resolve().parents:
        if (parent / "checkpoints").is_dir():
            return parent
    return None


def inside(path: Path, parent: Path) -> bool:
    """Whether `path` is `parent` or lies below it."""
    return path == parent or parent in path.parents


def canonical(path: str | Path) -> Path:
    """`path`, absolute, its directories resolved (links and `..`, even through directories
    that do not exist yet: `new/../x` is `x`), its last component kept as given (a link
    there is refused, not followed). Every check and write of an output uses this form: a
    `..` left in would let a missing directory hide what the path names."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        return Path(os.path.realpath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def refuse_non_directory(target: Path, where: str) -> None:
    """Refuses an output path that is a symbolic link (replacing it would replace the link,
    not what it points to) or a file."""
    if target.is_symlink():
        raise OutputError(f"{where}: is a symbolic link; give the path of a directory to write")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{where}: is a file; give the path of a directory to write")


def refuse_unwritable_place(target: Path, where: str) -> None:
    """Refuses an output whose staging, beside it, cannot be made: checked before any work
    (fault testing: export evaluated, then could not create its staging on a read-only
    mount; --out FILE/x said only "cannot use FILE: File exists")."""
    place = Path(os.path.abspath(target)).parent
    while not (place.exists() or place.is_symlink()) and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise OutputError(f"{where}: {place} is a file, not a directory to write in")
    if not os.access(place, os.W_OK | os.X_OK):
        raise OutputError(f"{where}: cannot write in {place} (a read-only file system, or no "
                          "permission)")


def _places_never_replaced() -> list[tuple[str, Path]]:
    """The directories an output may not replace, nor any directory above them (fault
    testing: `convert --out ~ --overwrite` replaced a home directory, and with it the Python
    installation jaxsae was running from)."""
    places = [("the Python environment running jaxsae", Path(sys.prefix)),
              ("the Python installation running jaxsae", Path(sys.base_prefix)),
              ("jaxsae's own code", Path(__file__).parent)]
    with contextlib.suppress(RuntimeError, KeyError):  # (no home directory known)
        places.append(("your home directory", Path.home()))
    return [(name, place.resolve()) for name, place in places]


def check_target(target: str | Path, kind: str, *, overwrite: bool = False,
                 inputs: Sequence[str | Path] = (), flag: str = "--out",
                 writable: bool = True) -> None:
    """Refuses, in one line naming `flag`, to write a `kind` output at `target` when that would
    replace something it must not (see the module docstring), or (`writable`) when its
    staging cannot be made beside it (a caller that may find it has nothing to write checks
    that itself, with `refuse_unwritable_place`)."""
    where = f"{flag} {target}"
    target = canonical(target)
    refuse_non_directory(target, where)
    if writable:
        refuse_unwritable_place(target, where)
    resolved = target.resolve()
    read = [(protected, Path(protected).resolve()) for protected in inputs]
    for protected, path in read:
        if resolved != path and inside(resolved, path):
            raise OutputError(f"{where}: lies inside {protected}, which this command reads; "
                              "write elsewhere")
    refuse_misplaced(resolved, where)
    if not target.exists():
        return
    if inside(Path.cwd().resolve(), resolved):
        raise OutputError(f"{where}: would replace the working directory ({Path.cwd()}); "
                          "choose another path")
    for protected, path in read:
        if inside(path, resolved):
            raise OutputError(f"{where}: would replace {protected}, which this command reads; "
                              "choose another path")
    for name, place in _places_never_replaced():
        if inside(place, resolved):
            raise OutputError(f"{where}: would replace {name} ({place}); jaxsae never "
                              "replaces it, not even with --overwrite: choose another path")
    if not any(target.iterdir()):
        return
    run = holds_run(target)
    if run is not None:
        raise OutputError(f"{where}: holds the training run {run} (with checkpoints); jaxsae "
                          "never replaces it: choose another path")
    found = output_kind(target)
    around = run_around(resolved)
    if around is not None and found != kind:  # (--overwrite or not: a run's are its own)
        raise OutputError(f"{where}: lies inside the training run {around} and is not a "
                          f"jaxsae {kind} output: jaxsae replaces nothing of a run's but "
                          "its own kind of output, not even with --overwrite; choose "
                          "another path")
    if overwrite:
        return
    if found == kind == "shards":  # the shard writers replace one only with --overwrite
        return
    if found == kind:  # jaxsae's own output of this kind: replaced if nothing was added
        foreign = foreign_entries(target)
        added = added_files_message(where, foreign)
        if added is None:
            return
        # (fault testing: "move them away" of an output that records no files named nothing
        # to move)
        raise OutputError(f"{added}; " + ("pass --overwrite to replace it (first check that "
                                          "it holds nothing of yours)" if foreign is None else
                                          "move them away, or pass --overwrite to replace it "
                                          "all"))
    what = f"a jaxsae {found} output, not {kind}" if found else "not empty"
    raise OutputError(f"{where}: exists and is {what}; choose another path, or pass "
                      "--overwrite to replace it")


CURVES = "curves.png"
"""A run's training curves (drawn by `jaxsae.curves`; read back by analyze and export --hub)."""
# What a training run writes in its directory (and each SAE's of a sweep) beside checkpoints/
# and sae/: never replaced by another command's file (a plot).
RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.json", CURVES, "sweep.csv", LOCK_FILE)


def check_file_target(path: str | Path, flag: str = "--out") -> None:
    """Refuses a single-file output (a plot) inside a jaxsae output directory (an export, a
    run's sae/, an analysis: replacing that output later would take the file for something
    a user added), inside a run's checkpoints/ (training's own), or in place of one of a
    run's own files (`RUN_FILES`: its curves.png, read back by analyze and export --hub as
    the run's curves), or one in a place this process cannot write (fault testing: `plot`
    drew, then was refused naming its hidden staging file, not --out)."""
    where = f"{flag} {path}"
    target = canonical(path)
    refuse_unwritable_place(target, where)
    _refuse_inside_output(target, where)
    _refuse_inside_checkpoints(target, where)
    run, parent = run_around(target), target.parent.resolve()
    if run is not None and not (parent == run or parent.parent == run / "sweep"):
        run = None
    if run is None and (parent / "config.yaml").is_file() and (parent / "metrics.jsonl").is_file():
        run = parent  # a run whose checkpoints were moved away (fault testing: then replaced)
    if run is not None and target.name in RUN_FILES:
        raise OutputError(f"{where}: is the training run {run}'s own {target.name}; jaxsae "
                          "never replaces it, not even with --overwrite: write elsewhere")


def refuse_misplaced(path: Path, where: str) -> None:
    """Refuses an output directory inside a run's checkpoints/ or inside another jaxsae
    output (`check_target` for every command; `jaxsae bench` for its directory, before any
    arm trains)."""
    _refuse_inside_checkpoints(path, where)
    _refuse_inside_output(path, where)


IMPORTED_SAE = "imported-sae"
"""An import's copy of the SAE it starts from (a sparsify SAE converted), in its run."""


def _refuse_inside_output(path: Path, where: str) -> None:
    """Refuses an output inside a directory jaxsae wrote as another output (an export, an
    analysis, shards): replacing or adding to it would leave that output other than it was
    written. A bench directory and an import's run are added to (arms' runs and analyses; the
    run's training), but not an import's own copy of its SAE (replaced by a config-only
    directory in fault testing), and so is an interrupted resumable write's staging (by the
    command that continues it)."""
    resolved = Path(path).resolve()
    for directory in resolved.parents:
        kind = output_kind(directory)
        if kind == "import" and inside(resolved, directory / IMPORTED_SAE):
            raise OutputError(f"{where}: lies in {directory / IMPORTED_SAE}, the SAE the "
                              f"import {directory} starts from; write elsewhere")
        if kind is None or kind.endswith("-partial") or kind in ("bench", "import"):
            continue
        raise OutputError(f"{where}: lies inside {directory}, a jaxsae {kind} output; "
                          "write elsewhere")


def _refuse_inside_checkpoints(path: Path, where: str) -> None:
    run = run_around(path)
    if run is not None and inside(path.resolve(), run / "checkpoints"):
        raise OutputError(f"{where}: lies inside the checkpoints of the run {run}, which "
                          "training manages; write elsewhere")


def staging_path(target: Path) -> Path:
    """A fresh name beside `target` for building it (same filesystem, so renaming is atomic),
    naming this host and process (see `remove_stale_staging`)."""
    return target.parent / (f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
                            f"{uuid.uuid4().hex[:8]}")


def remove_stale_staging(target: Path) -> list[Path]:
    """Removes the staging directories of `target` that a killed command left (SIGKILL, power
    loss: no cleanup ran): those named for this host and a process that no longer runs. One
    of another host (a shared filesystem) or of a live process is left alone. The previous
    output such a command had set aside to replace it (`replace_directory`) is put back if
    the new one never took its place, and removed if it did."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?P<what>tmp|old)-(?P<host>.+)-"
                         r"(?P<pid>\d+)-[0-9a-f]{8}")
    removed = []
    with contextlib.suppress(OSError):
        for entry in sorted(target.parent.iterdir()):
            found = pattern.fullmatch(entry.name)
            if not (found and found["host"] == socket.gethostname()
                    and not _running(int(found["pid"])) and entry.is_dir()
                    and not entry.is_symlink()):
                continue
            if found["what"] == "old" and not (target.exists() or target.is_symlink()):
                os.replace(entry, target)  # killed between its two renames: the output it had
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (another user's process: running)
        return True
    return True


def replace_directory(new: Path, target: Path) -> None:
    """Moves the complete directory `new` to `target`. An existing target is renamed aside
    first and removed only after `new` is in place, so an interruption never loses both: a
    SIGTERM / Ctrl-C between the two renames waits for the second (a SIGTERM that reached the
    command earlier stops it before the first), and a killed command's set-aside output is put
    back or removed by the next command writing `target` (`remove_stale_staging`)."""
    interrupts.check_terminated()
    old = target.parent / (f".{target.name}.old-{socket.gethostname()}-{os.getpid()}-"
                           f"{uuid.uuid4().hex[:8]}")
    with interrupts.deferred():
        if not target.exists():
            os.replace(new, target)
            return
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        # (the replaced output goes before a signal that came meanwhile is acted on: fault
        # testing found it left beside the new one, the command exiting 143)
        shutil.rmtree(old, ignore_errors=True)
    if old.exists() or old.is_symlink():  # (the new output is in place; only space is lost)
        print(f"warning: {target} is written, but the output it replaced, set aside as {old}, "
              "could not be removed (permissions?); delete it yourself", file=sys.stderr)


@contextlib.contextmanager
def staged_directory(target: str | Path, kind: str, *, overwrite: bool = False,
                     inputs: Sequence[str | Path] = (), flag: str = "--out",
                     marker: bool = True) -> Iterator[Path]:
    """Yields an empty staging directory to write the `kind` output into; when the block ends
    without an exception it becomes `target` (checked first by `check_target`), otherwise it
    is removed and `target` is left as it was."""
    given, target = target, canonical(target)
    check_target(given, kind, overwrite=overwrite, inputs=inputs, flag=flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename; mkdir follows the umask.
    staging = staging_path(target)
    staging.mkdir()
    try:
        yield staging
        # again: what was added to the target while this command ran is not replaced either
        check_target(given, kind, overwrite=overwrite, inputs=inputs, flag=flag)
        if marker:
            write_marker(staging, kind, inventory=True)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def resumable_staging(target: str | Path, kind: str, key: Mapping[str, Any]) -> Iterator[Path]:
    """`<target>.partial/`, the staging directory of a command that can continue where an
    interrupted call with the same inputs (`key`) stopped: reused when it holds the same key,
    started afresh when it holds another (it is jaxsae's own: its marker says so), refused if
    something else has that name, or while another process works in it (its lock, held for
    the block). `publish`, inside the block, renames it into place. A failure the same call
    would meet again (bad data or settings, divergence) removes it."""
    target = canonical(target)
    partial = partial_path(target)
    key = json.loads(json.dumps(key))

    def marker(directory: Path, *kinds: str) -> dict[str, Any] | None:
        try:
            mark = json.loads((directory / MARKER).read_text())
        except (OSError, ValueError):
            return None
        return mark if isinstance(mark, dict) and mark.get("kind") in kinds else None

    # An interrupted call's staging holds its `kind-partial` marker, or `kind`'s final one if
    # it was stopped while `publish` wrote that (a complete output, its key gone: started
    # afresh; fault testing found it refused by every later call)
    lock = lock_staging(partial, lambda d: marker(d, f"{kind}-partial", kind) is not None,
                        kind, target.name)
    mark = marker(partial, f"{kind}-partial")  # (read under the lock)
    try:
        if mark is None or mark.get("key") != key:  # another call's (or none): afresh
            empty_but_lock(partial)
            write_file(partial / MARKER,
                       json.dumps({"kind": f"{kind}-partial", "key": key}) + "\n")
        yield partial
    except (ConfigError, DataError, NonFiniteError):
        # the same call would fail the same way again: nothing in it to resume from (fault
        # testing: a diverged retraining left OUT.partial behind for good)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        lock.release()


def partial_path(target: Path) -> Path:
    """`<target>.partial`: where a write that can be resumed stages `target`."""
    return target.with_name(target.name + ".partial")


def lock_staging(staging: Path, ours: Callable[[Path], bool], what: str, writing: str, *,
                 error: type[JaxsaeError] = OutputError) -> RunLock:
    """Holds the lock of the staging directory of a write that can be resumed (creating the
    directory), so that a second writer of the same output is refused, naming the process
    that holds it, instead of clearing or mixing into a write in progress; a killed writer's
    is taken over. Refused with `error`: a staging that is a link or a file, or a directory
    without the lock file every writer leaves there (an empty directory is someone's) or that
    `ours` does not recognise as an interrupted jaxsae `what`."""
    lock_file = staging / LOCK_FILE
    if staging.is_symlink() or (staging.exists() and (
            not staging.is_dir() or lock_file.is_symlink() or not lock_file.is_file()
            or not ours(staging))):
        raise error(f"{staging}: exists and is not an interrupted jaxsae {what}; move it away")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        return RunLock(staging, log=lambda _: None, doing=f"writing {writing}").acquire()
    except RunLocked as e:
        raise error(str(e)) from None


def holds_only_a_lock(directory: Path) -> bool:
    """Whether `directory` holds nothing but jaxsae's lock file (if that) and empty
    directories: what a run or a writer's staging leaves before it writes anything (a run's
    config comes after the data is opened, generated or checked)."""
    return not any(p != directory / LOCK_FILE and (p.is_symlink() or not p.is_dir())
                   for p in directory.rglob("*"))


def empty_but_lock(directory: Path) -> None:
    """Removes everything in a staging `directory` but its lock (held by this process)."""
    for entry in directory.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def publish(staging: Path, target: str | Path, kind: str, *, overwrite: bool = False,
            inputs: Sequence[str | Path] = (), flag: str = "--out") -> Path:
    """Renames the complete `staging` directory to `target` (checked by `check_target`)."""
    given, target = target, canonical(target)
    remove_stale_staging(target)
    check_target(given, kind, overwrite=overwrite, inputs=inputs, flag=flag)
    write_marker(staging, kind, inventory=True, leave_out=[LOCK_FILE])
    interrupts.check_terminated()  # (one that came before: the staging stays resumable)
    move_locked_staging(staging, target)
    return target


def move_locked_staging(staging: Path, target: Path) -> None:
    """Renames a resumable write's complete `staging` (`lock_staging`'s, its lock still held)
    to `target`. The lock goes with the directory and is removed from its new place, and no
    signal acts in between: a staging is never without its lock, which a later call would
    not take over (fault testing: killed between removing it and renaming, OUT.partial was
    refused by every later call). A SIGKILL before that removal leaves a `.lock` in the
    output, which no reader minds."""
    with interrupts.deferred():
        replace_directory(staging, target)
        (target / LOCK_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def replacing_file(path: Path) -> Iterator[Path]:
    """A new, empty file beside `path` for the block to write, renamed onto `path` when the
    block ends, removed if it fails. Its name is this call's own, created exclusively: a fixed
    name (`path.partial`) deleted a user's file of that name, or wrote through a link of
    that name into the file it pointed at (fault testing). One a killed call left (this
    host's, its process gone) is removed first."""
    host = socket.gethostname()
    stale = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(host)}-(\d+)-[0-9a-f]{{8}}"
                       r"\.partial")
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            found = stale.fullmatch(entry.name)
            if found and not _running(int(found[1])) and not entry.is_dir():
                entry.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, text: str) -> None:
    with replacing_file(path) as tmp:
        write_file(tmp, text, name=path)


def write_file(path: Path, text: str, *, name: Path | None = None) -> None:
    """`path.write_text(text)`, whose error names the file (`name`, if given) even when it
    comes as the file is closed (a full disk)."""
    with naming(name or path):
        Path(path).write_text(text)


def json_text(value: Any, indent: int | None = 1) -> str:
    """Strict JSON: NaN and inf, which JSON has not, are written as null."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    atomic_write(path, csv_text(rows, columns))


def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits; an undefined value (None) as null, as
    in the JSON beside it."""
    if v is None:
        return "null"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]


def hist_range(values, pad: float = 0.5) -> tuple[float, float] | None:
    """A histogram range for `values` that numpy can cut into bins: their own, widened by
    `pad` each side when they (nearly) coincide (numpy refuses bins narrower than float
    resolution), None for no values."""
    import numpy as np

    values = np.asarray(values, np.float64)
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-6 * max(1.0, abs(lo), abs(hi)):
        return lo - pad, hi + pad
    return lo, hi


def subplots(*grid: int, figsize: tuple[float, float], dpi: float = 100, **kwargs):
    """(figure, axes) as `pyplot.subplots` makes them, for a file: a figure of its own,
    outside pyplot, so that nothing of the caller's matplotlib changes (fault testing: every
    training run switched a notebook's backend to Agg, and its plots stopped showing)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*grid, **kwargs)


def plain_text(text: str) -> str:
    """`text` for a figure, drawn as written: matplotlib reads $...$ as math (and fails on a
    title or run name that is not valid math); control characters, which no font draws (each
    printed a warning), become spaces."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return text.replace("$", r"\$")


def save_figure(fig, path: Path, *, right: float = 1.0) -> None:
    """Writes `fig` as PNG to `path` and closes it; the panels keep left of `right` (a
    fraction of the width: room for a legend beside them)."""
    fig.tight_layout(rect=(0, 0, right, 1))
    with replacing_file(path) as tmp, naming(path):
        fig.savefig(tmp, format="png")


class AppendLog:
    """A line-per-record log (metrics.jsonl) whose lines are written whole or not at all: a
    failed write (disk full) cuts the file back to its last complete line and re-raises."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write_line(self, line: str) -> None:
        data = (line.rstrip("\n") + "\n").encode()
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, os.strerror(28), str(self.path))  # ENOSPC: a short write
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            if e.filename is None:
                e.filename = str(self.path)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
