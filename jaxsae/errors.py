"""The one exception type users see: the CLI prints it as a single line and exits non-zero."""

import contextlib
import errno
import re
import shutil
from collections.abc import Iterator


class JaxsaeError(Exception):
    """Bad input (config, data, flags, files). The message names the culprit."""


class ConfigError(JaxsaeError):
    """A config key is unknown, has the wrong type, or an impossible value."""


class DataError(JaxsaeError):
    """A data directory, manifest or shard does not match the format."""


class ExportError(JaxsaeError):
    """A directory is not a valid SAE export (SAELens or sparsify), or cannot be written as
    one."""


class NonFiniteError(JaxsaeError):
    """Training produced a non-finite loss or gradient."""


def require_at_least(*checks: tuple[str, int | None, int]) -> None:
    """Each (flag, value, low): a value below `low` is bad input naming the flag (None: unset)."""
    for flag, value, low in checks:
        if value is not None and value < low:
            raise JaxsaeError(f"{flag} must be at least {low}, got {value}")


def require_at_most(*checks: tuple[str, int | None, int]) -> None:
    """Each (flag, value, high): a value above `high` is bad input naming the flag (None:
    unset)."""
    for flag, value, high in checks:
        if value is not None and value > high:
            raise JaxsaeError(f"{flag} must be at most {high}, got {value}")


def refuse_past_float32(sums: dict[str, object], data: str, too_large: str, *,
                        out: object = None, peak: float | None = None) -> None:
    """Refuses, in one line naming them, sums of float32 blocks that passed float32's range
    (inf, or NaN from inf - inf): what they would give is no measurement. `too_large`: what
    is too large to do what (in float32); `peak`: the largest token norm read."""
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore"):
        overflowed = [k for k, v in sums.items()
                      if not np.all(np.isfinite(np.asarray(v, np.float64)))]
    if overflowed:
        largest = "" if peak is None else f"; the largest token norm read is {peak:.3g}"
        written = "" if out is None else f"; nothing was written to {out}"
        raise JaxsaeError(f"{data}: the block sums {', '.join(overflowed)} pass float32's range "
                          f"(3.4e38{largest}): {too_large} in float32{written}")


def one_line(message: str) -> str:
    return " ".join(message.split("\n"))


@contextlib.contextmanager
def naming(path) -> Iterator[None]:
    """An OSError of the block that names no file is given `path`'s name: a buffered write
    fails when its file is closed (a full disk), with an error naming nothing (fault testing:
    "error: No space left on device", and no file named)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or isinstance(e, shutil.Error):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def describe_os_error(e: OSError) -> str:
    """`cannot write runs/x/metrics.jsonl: No space left on device`."""
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        # a copy of a directory: a list of (source, destination, reason); the first said
        _, target, why = e.args[0][0]
        found = re.match(r"\[Errno (\d+)\] ([^:]*)", str(why))
        if found:
            return describe_os_error(OSError(int(found[1]), found[2], str(target)))
        return one_line(f"cannot write {target}: {why}")
    reason = e.strerror or str(e)
    if e.filename is None:
        return one_line(reason)
    verb = {errno.EACCES: "cannot write", errno.EPERM: "cannot write", errno.EROFS: "cannot write",
            errno.ENOSPC: "cannot write", errno.EDQUOT: "cannot write",
            errno.EFBIG: "cannot write", errno.ENOENT: "cannot find"}.get(e.errno, "cannot use")
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return one_line(f"{verb} {where}: {reason}")
