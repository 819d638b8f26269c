"""Ctrl-C and `kill` as answers, not crashes: one line, exit status 130 (SIGINT) or 143 (SIGTERM).

The CLI (`raycell.__main__.main`) turns SIGTERM into `Terminated`, a KeyboardInterrupt, so both
signals unwind the same way: `finally` blocks remove staging folders and locks, atomic writes leave
no half file, and Ray's local processes are stopped. What a re-run does depends on the verb
(`resume_hint`).

Ray Tune handles SIGINT itself (it stops the search and saves its state) and then returns normally,
which would look like a finished search; `graceful` lets a caller see that a signal arrived.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass


class Terminated(KeyboardInterrupt):
    """SIGTERM received (`kill PID`, a scheduler's stop)."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def raise_on_sigterm():
    """Within the block SIGTERM raises `Terminated` in the main thread (no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def exit_status(exc: BaseException) -> int:
    """128 + the signal number: 143 for SIGTERM, 130 for SIGINT (Ctrl-C)."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


# verb -> what a re-run does after an interruption (what each verb keeps: see its module)
_RESUME = {
    "infer": "re-run the same command to resume (finished shards are kept)",
    "embed": "re-run the same command to resume (finished shards are kept)",
    "train": "resume with `raycell train --resume RUN_DIR` (the run folder named above)",
    "tune": "resume with `raycell tune --resume SEARCH_DIR` (finished trials are kept)",
    "experiment": "re-run the same command to resume (finished runs are kept)",
}


def resume_hint(command: str, exc: BaseException | None = None) -> str:
    """The one line printed after an interruption of `command` (`exc`'s own hint if it has one)."""
    if exc is not None and exc.args and isinstance(exc.args[0], str) and exc.args[0]:
        return f"interrupted; {exc.args[0]}"
    again = _RESUME.get(
        command, "re-run the same command to start again (nothing earlier was replaced)"
    )
    return f"interrupted; {again}"


@dataclass
class Caught:
    """The signal `graceful` caught (0: none)."""

    signum: int = 0

    def reraise(self, hint: str = "") -> None:
        """Raise what the signal would have raised, now that the caller stopped cleanly.

        `hint`, when given, replaces `resume_hint`'s generic advice (e.g. names the run folder).
        """
        args = (hint,) if hint else ()
        if self.signum == signal.SIGTERM:
            raise Terminated(*args)
        if self.signum:
            raise KeyboardInterrupt(*args)


@contextlib.contextmanager
def graceful(stop):
    """Within the block, the first SIGINT / SIGTERM calls `stop(signum)` instead of raising.

    A second signal raises at once. Yields a `Caught` that says which signal came (main thread
    only; elsewhere a no-op).
    """
    caught = Caught()
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def _first(signum, frame):
        caught.signum = signum
        again = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
        for s in before:  # a second signal: no more patience
            signal.signal(s, again[s])
        stop(signum)

    for s in before:
        signal.signal(s, _first)
    try:
        yield caught
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def stop_ray_tune(signum: int) -> None:
    """Ask a running Ray Tune search to stop and save its state.

    Through the SIGUSR1 handler Tune installs when its loop starts; before that, stop at once.
    """
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    import logging

    # Tune's "Stop signal received ... Tuner.restore(...)" lines: raycell says it in one line
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
    os.kill(os.getpid(), signal.SIGUSR1)
