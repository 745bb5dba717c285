"""One training process per run directory: an exclusive lock on `<run_dir>/.lock`.

The lock is an `fcntl.flock` on the file, which the operating system drops when its holder
dies, however it dies; the file itself says who holds it (pid, host, since when), for the
message a second process prints. A lock file naming a process that is gone is a stale lock:
it is taken over with a warning; a file of that name that is not a jaxsae lock record (a
user's own `.lock`) is refused and left as it is. The file is emptied on release; it is
deleted only by its holder (`discard`), before it lets go, and a process that gets the lock
checks that the file it locked is still the one at that path (else it tries again): a process
that had opened the file before the deletion cannot hold a lock on a file nobody else can
find while a third process locks the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from jaxsae.errors import JaxsaeError

LOCK_FILE = ".lock"


class RunLocked(JaxsaeError):
    """The lock cannot be taken: another process is training in this run directory, or its
    lock file is not jaxsae's."""


class RunLock:
    def __init__(self, run_dir: Path, log=print, *, doing: str = "training"):
        """`doing`: what the holder does in the directory, for the refusal's message."""
        self.path = Path(run_dir) / LOCK_FILE
        self._fd = -1
        self._log = log
        self._doing = doing
        self.created = False
        """Whether this lock's acquire created the file (its holder then deletes it when it
        lets go, `discard`: a run, finished or refused, keeps no `.lock` it did not have)."""
        self._times: DirectoryTimes | None = None  # (the directory's, around the file's make)

    def _open(self) -> tuple[int, bool]:
        """The lock file and whether this process got its lock (else another holds it), its
        creation noted in `created`; retried while the path no longer names the file locked
        (its holder deleted it meanwhile: `discard`)."""
        while True:
            before = _stat(self.path.parent)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o666)
                self.created = True
                self._times = DirectoryTimes.since(self.path.parent, before)
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
                except FileNotFoundError:  # (deleted between the two opens)
                    continue
                except OSError as e:  # a link or a directory of that name: not ours to write
                    if e.errno not in (errno.ELOOP, errno.EISDIR):
                        raise
                    raise RunLocked(f"{self.path}: cannot be used as the lock file "
                                    f"({e.strerror}); move it away") from None
                self.created = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return fd, False
            if _same_file(fd, self.path):
                return fd, True
            os.close(fd)  # locked after its holder deleted it: the path names another now

    def acquire(self) -> RunLock:
        fd, locked = self._open()
        if not locked:
            record = _live_record(fd)
            os.close(fd)
            if record is not None and not _is_record(record):  # (a user's file, locked by
                # some other program: not a jaxsae process training)
                raise RunLocked(f"{self.path}: exists and is not a jaxsae lock file; move it "
                                "away (jaxsae writes its lock there)")
            if record is None:
                record = {}
            # what the holder says it does (fault testing: an export's lock refused a train
            # as "training here")
            doing = record["doing"] if isinstance(record.get("doing"), str) else self._doing
            if record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
                # (fault testing, a library user: "another process" named its own pid)
                raise RunLocked(f"{self.path.parent}: this process is already {doing} here "
                                "(one not finished or closed: a ShardWriter not closed, "
                                "say)") from None
            raise RunLocked(f"{self.path.parent}: another jaxsae process is {doing} here "
                            f"({_describe(record)}); wait for it to finish or stop "
                            "it") from None
        previous = _read(fd)
        if previous is not None and not _is_record(previous):
            os.close(fd)
            raise RunLocked(f"{self.path}: exists and is not a jaxsae lock file; move it away "
                            "(jaxsae writes its lock there)")
        if previous:
            self._log(f"{self.path.parent}: taking over a stale lock ({_describe(previous)}, "
                      "no longer running)")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "doing": self._doing}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as e:  # (a full disk: name the file)
            os.close(fd)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def discard(self) -> None:
        """Deletes the lock file, then releases the lock (only its holder may delete it; one
        that waited on it finds the path gone and makes a new one)."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            if _same_file(self._fd, self.path):
                untouched = self.created and self._times is not None and self._times.untouched()
                self.path.unlink()
                if untouched:  # nothing but the lock file came and went: the directory's
                    # times as they were (fault testing: a refused command moved an existing
                    # run to the top of `ls -t`)
                    self._times.restore()
        self.release()

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = -1

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def live_holder(directory: Path) -> str | None:
    """Who holds `directory`'s lock now ("pid 12 on host, since ..."), or None when nobody
    does: a check before costly work that would end refused by `acquire` (the lock is tested,
    never taken, and nothing is created)."""
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _describe(_read(fd))
    finally:
        os.close(fd)  # (drops the shared lock, if it was taken)
    return None


@dataclass(frozen=True)
class DirectoryTimes:
    """A directory's times before an entry was made in it, and its mtime just after: what
    made the entry and removes it again (a refused command) restores them when nothing else
    changed there meanwhile (the mtime is still the one just after), so `ls -t` and backup
    tools see nothing happened."""
    directory: Path
    before: os.stat_result
    after_ns: int

    @classmethod
    def since(cls, directory: Path, before: os.stat_result | None) -> DirectoryTimes | None:
        """Called just after the make, with the directory's stat from just before it."""
        after = _stat(directory)
        return cls(directory, before, after.st_mtime_ns) if before and after else None

    def untouched(self) -> bool:
        """Whether nothing else changed in the directory since (checked before the removal,
        which changes its mtime itself)."""
        now = _stat(self.directory)
        return now is not None and now.st_mtime_ns == self.after_ns

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.directory, ns=(self.before.st_atime_ns, self.before.st_mtime_ns))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _live_record(fd: int) -> dict | None:
    """The record of the process holding the lock on `fd`. A holder that has just taken over
    a stale lock may not have written its own yet (fault testing: the refusal named the dead
    process): the file is read again for up to a second while it names a process of this
    host that is gone."""
    info = _read(fd)
    for _ in range(20):
        if not (info is not None and _is_record(info) and info["host"] == socket.gethostname()
                and not _alive(info["pid"])):
            break
        time.sleep(0.05)
        info = _read(fd)
    return info


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (another user's process)
        return True
    return True


def _read(fd: int) -> dict | None:
    """The lock file's record; None for an empty file (a released lock, or one just made);
    {"unreadable": True} for content that is not a JSON object."""
    try:
        data = os.pread(fd, 4096, 0)
        if not data.strip():
            return None
        info = json.loads(data.decode())
    except (OSError, ValueError):
        return {"unreadable": True}
    return info if isinstance(info, dict) else {"unreadable": True}


def _is_record(info: dict) -> bool:
    """Whether a lock file's content is what `acquire` writes."""
    return (isinstance(info.get("pid"), int) and isinstance(info.get("host"), str)
            and isinstance(info.get("since"), str))


def _describe(info: dict | None) -> str:
    if not info or info.get("unreadable"):
        return "holder unknown"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since "
            f"{info.get('since', '?')}")
