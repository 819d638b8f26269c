"""One output, one writer: a lock file that a second run into the same output respects.

Every verb that writes an output (a data set, predictions or embeddings, a run folder it resumes,
an exported file) holds `writing(out)` while it writes. The lock is a small JSON file beside the
output, `<parent>/.<name>.raycell-lock`, holding the writer's process id, host, start time and
command; beside rather than inside because the output may not exist yet (ingest builds it in a
staging folder and renames it into place) and a rename must not carry the lock away.

A second writer refuses in one line ("... is being written by pid N since T"). Only a lock whose
process is gone counts as a leftover (a run killed with SIGKILL, a crashed machine) and is taken
over; a live run's lock, and so its staging folders, are never touched. A lock from another host
is never judged stale (its process cannot be seen from here): the message says which file to
delete once that run is known to be over.

Why by hand rather than `fcntl.flock` / the `filelock` package: an advisory lock says nothing about
who holds it (the message must name the pid and since when), and flock is unreliable on NFS, where
cluster outputs often live. A process's start time (Linux `/proc/<pid>/stat`) is recorded too, so
a recycled pid does not keep a dead run's lock alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from raycell.errors import UserError

SUFFIX = ".raycell-lock"


class BusyError(UserError):
    """Another live run is writing the same output."""


@dataclass
class LockInfo:
    """Who holds a lock (what the lock file records)."""

    pid: int
    host: str
    started: str  # local time, ISO 8601, seconds
    command: str
    proc_start: str = ""  # /proc/<pid>/stat start time (Linux), to tell a recycled pid
    token: str = ""  # this holder's random id, so only it removes the file


_held: dict[Path, int] = {}  # lock path -> nesting depth, for this process


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of output `out` (beside it)."""
    out = Path(os.path.realpath(os.path.expanduser(str(out))))
    return out.parent / f".{out.name}{SUFFIX}"


def _proc_start(pid: int) -> str:
    """The start time of `pid` in clock ticks since boot ('' where /proc is not there)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def _alive(info: LockInfo) -> bool:
    """True when the lock's process still runs (always True for another host's lock)."""
    if info.host != socket.gethostname():
        return True
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    now = _proc_start(info.pid)
    return not (info.proc_start and now and now != info.proc_start)


def read_lock(path: Path) -> LockInfo | None:
    """The lock at `path`, or None when there is none (an unreadable file counts as held)."""
    try:
        obj = json.loads(path.read_text())
        return LockInfo(**{k: obj[k] for k in LockInfo.__dataclass_fields__ if k in obj})
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, TypeError, KeyError):
        # half-written by a writer that is creating it right now, or damaged: not ours to judge
        return LockInfo(pid=-1, host="?", started="?", command="?")


def _refusal(out: Path, what: str, info: LockInfo, path: Path) -> BusyError:
    here = info.host == socket.gethostname()
    who = f"pid {info.pid}" + ("" if here else f" on host {info.host}")
    extra = "" if here else f" (if that run is over, delete {path})"
    return BusyError(
        f"{what} {out} is being written by {who} since {info.started} "
        f"({info.command[:80]}); wait for it to finish or choose another "
        f"output{extra}"
    )


def check_free(out: str | os.PathLike, what: str = "--out") -> None:
    """Refuse now when a live run writes `out` (a cheap check before Ray starts; no lock taken)."""
    path = lock_path(out)
    info = read_lock(path)
    if info and path not in _held and info.pid not in (-1, os.getpid()) and _alive(info):
        raise _refusal(Path(out), what, info, path)


@contextlib.contextmanager
def writing(out: str | os.PathLike, what: str = "--out", make_parent: bool = True):
    """Hold the lock of output `out` while the block writes it; re-entrant within one process.

    `make_parent` False: when the folder that would hold the lock does not exist, nothing is
    created and no lock taken (the verb reports the missing input itself, and writes nothing).

    Raises:
        BusyError: a live process (on this host, or any on another) holds it.
    """
    path = lock_path(out)
    if not make_parent and not path.parent.is_dir():
        yield path
        return
    if path in _held:  # this process already holds it (a verb calling another)
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    mine = LockInfo(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        proc_start=_proc_start(os.getpid()),
        token=secrets.token_hex(8),
    )
    _acquire(path, Path(out), what, mine)
    _held[path] = 1
    try:
        yield path
    finally:
        del _held[path]
        if (read_lock(path) or LockInfo(0, "", "", "")).token == mine.token:
            path.unlink(missing_ok=True)


def _acquire(path: Path, out: Path, what: str, mine: LockInfo) -> None:
    """Create the lock file exclusively; a dead holder's file is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(asdict(mine)).encode()
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            info = read_lock(path)
            if info is None:
                continue  # released between the two calls
            if _stale(path, info):
                _take_over(path, info)
                continue
            raise _refusal(out, what, info, path) from None
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return
    raise BusyError(
        f"{what} {out}: could not take the lock {path} (other runs keep taking it); try again"
    )


def _stale(path: Path, info: LockInfo) -> bool:
    """True for a lock whose process is gone.

    An unreadable one counts only once it is a few seconds old: a writer creating it this instant
    leaves it empty for a moment.
    """
    if info.pid == -1:
        try:
            return time.time() - path.stat().st_mtime > 5
        except FileNotFoundError:
            return True
    return info.pid == os.getpid() or not _alive(info)


def _take_over(path: Path, info: LockInfo) -> None:
    """Remove the stale lock `info` at `path`, and only it.

    Moved aside first, then checked: when two runs find the same leftover, the slower one may move
    aside the lock the faster one has just created; it then puts that back.
    """
    aside = path.with_name(f"{path.name}.stale-{secrets.token_hex(4)}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    moved = read_lock(aside)
    if moved is not None and moved.token != info.token:  # a live lock made meanwhile: restore
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)
