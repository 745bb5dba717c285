"""The one exception type users see: the CLI prints it as a single line and exits non-zero."""

import errno


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


def one_line(message: str) -> str:
    return " ".join(message.split("\n"))


def describe_os_error(e: OSError) -> str:
    """`cannot write runs/x/metrics.jsonl: No space left on device`."""
    reason = e.strerror or str(e)
    if e.filename is None:
        return one_line(reason)
    verb = {errno.EACCES: "cannot write", errno.EPERM: "cannot write", errno.EROFS: "cannot write",
            errno.ENOSPC: "cannot write", errno.EDQUOT: "cannot write",
            errno.EFBIG: "cannot write", errno.ENOENT: "cannot find"}.get(e.errno, "cannot use")
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return one_line(f"{verb} {where}: {reason}")
