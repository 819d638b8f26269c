"""The one base class of the errors a user can fix (bad config, input, path), imported by every layer.

Each stage defines its own subclass next to the code that raises it (`ConfigError`, `ShardError`,
`IngestError`, ...); `raycell.__main__.main` prints any `UserError` (or a `FileNotFoundError`, which
file helpers raise for a missing input) as one line `raycell: error: ...` and exits with status 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """An error the user can fix; the message names the file, row or key and what to do."""


class ConfigError(UserError, ValueError):
    """A config file or override names a key that does not exist, or a value that is wrong or out of range."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as one line with exit status 2."""
    return (UserError, FileNotFoundError)


# errno -> (what happened, what to do): conditions of the machine, not bugs; reported in one line
_AGAIN = "then re-run the same command"
_WRITABLE = "choose a folder you can write to (--out), or fix its permissions"
_ENVIRONMENT = {
    errno.ENOSPC: (
        "no space left on the device",
        f"free space there, or choose an output on a disk with room; {_AGAIN}",
    ),
    errno.EDQUOT: (
        "disk quota exceeded",
        f"free space within your quota, or choose an output elsewhere; {_AGAIN}",
    ),
    errno.EROFS: ("read-only file system", "choose an output folder on a writable disk (--out)"),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("operation not permitted", _WRITABLE),
}
_ERRNO_TEXT = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
}


class EnvironmentProblem(UserError, OSError):
    """The machine refused a write (full, read-only, not yours) or ran out of memory: one line."""


def environment_problem(exc: BaseException) -> EnvironmentProblem | None:
    """The disk, permission or memory problem behind `exc` as one line (naming the folder), else None.

    Looks through the exception chain (an OSError, or one wrapped by a library such as h5py, or by
    Ray, where only the remote traceback text crosses the process boundary).
    """
    import os
    import re

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code, path = None, None
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT:
            code, path = e.errno, e.filename
        else:
            text = str(e)
            m = re.search(r"\[Errno (\d+)\] [^:\n]*(?:: '([^'\n]+)')?", text)
            if m and int(m.group(1)) in _ENVIRONMENT:
                code, path = int(m.group(1)), m.group(2)
            else:
                hit = [n for t, n in _ERRNO_TEXT.items() if t in text]
                if hit and isinstance(e, OSError | RuntimeError):  # h5py: errno only in the text
                    code = hit[0]
                    f = re.search(r"(?:filename|name) = '([^']+)'", text)
                    path = f.group(1) if f else None
        memory = _memory_kill(e)
        if memory:
            return EnvironmentProblem(memory)
        if code is not None:
            what, todo = _ENVIRONMENT[code]
            where = ""
            if path:
                path = str(path)
                folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
                where = f" at {folder}"
            return EnvironmentProblem(
                f"{what}{where}: {todo} (what was finished is kept; nothing half-written is used)"
            )
        e = e.__cause__ or e.__context__
    return None


def _memory_kill(e: BaseException) -> str:
    """One line for a worker Ray stopped because the machine ran out of memory, else "".

    Ray's `OutOfMemoryError` reaches the driver as itself or as text inside a task, Train or Tune
    error (only the message crosses the process boundary), so both are looked for.
    """
    import re

    text = str(e)
    if type(e).__name__ != "OutOfMemoryError" and not (
        "OutOfMemoryError" in text or "running low on memory" in text
    ):
        return ""
    used = re.search(r"was ([\d.]+)\s*GB(?: used)? / ([\d.]+)\s*GB", text)
    at = f" ({used.group(1)} GB of {used.group(2)} GB in use)" if used else ""
    return (
        f"Ray stopped a worker because the machine ran out of memory{at}: lower data.batch_size, "
        "data.shuffle_buffer or scaling.num_workers (or tune.max_concurrent_trials), or run on a machine "
        f"with more memory; {_AGAIN} (what was finished is kept; nothing half-written is used)"
    )
