"""Everything raycell does beneath Ray's public API, in one place.

Ray has no public option for these, so each reaches into Ray's private modules or relies on
behaviour Ray does not document. `tests/test_ray_private.py` checks each against the installed Ray
(the attribute exists with the expected signature, Ray's own code still calls it, the text or
format still looks the same), so a Ray upgrade that changes one fails there by name instead of
silently bringing Ray's noise back to the terminal or losing an error's one line.

- `route_raylet_messages`: the driver's error listener prints raylet messages (worker-pool
  warnings, tasks killed for memory) whatever `log_to_driver` says.
- `keep_native_logs_off_terminal`: a driver's C++ core worker copies its ERROR lines to fd 2.
- `quiet_ray_data_console`: Ray Data's console handler is found by the name its default logging
  config gives it.
- `session_logs_dir`: the session's log folder has no public accessor.
- `user_error_in`: a user error raised in a Ray Data UDF comes back wrapped, its message annotated.
- `replace_train_sigint_handler`: Ray Train's Ctrl-C handler lets `fit()` return as if finished.
- `launcher_provider_types`, `validate_launcher_config`: the cluster launcher's own offline checks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

# ------------------------------------------------------------------------------------------------
# raylet messages

_RAY_PRINT: Callable | None = None  # Ray's own printer, kept when route_raylet_messages replaces it
_RAYLET_SINK: Callable[[list[str]], None] | None = None


def _printer(data: dict, ignore_prefix: bool) -> None:
    """Stands in for `ray._private.worker.print_to_stdstream`: raylet messages go to the sink."""
    if data.get("pid") == "raylet" and _RAYLET_SINK is not None:
        return _RAYLET_SINK([str(x) for x in data.get("lines", [])])
    return _RAY_PRINT(data, ignore_prefix)


def route_raylet_messages(sink: Callable[[list[str]], None]) -> None:
    """Send the raylet's messages to `sink(lines)` instead of the terminal; other streams unchanged.

    In Ray 2.60 the driver's error listener (`ray._private.worker.listen_error_messages`) prints
    them with the module-level `print_to_stdstream` whatever `log_to_driver` says, and no option
    turns that off; it looks the name up at every message, so replacing it redirects them. Once per
    process (a second call only changes the sink).
    """
    global _RAY_PRINT, _RAYLET_SINK
    import ray._private.worker as w

    _RAYLET_SINK = sink
    if w.print_to_stdstream is not _printer:
        _RAY_PRINT = w.print_to_stdstream
        w.print_to_stdstream = _printer


# ------------------------------------------------------------------------------------------------
# Ray's C++ log lines on the driver's stderr

# A line of Ray's C++ logging: "[2026-12-01 23:28:34,874 E 21956 21956] core_worker.cc:2465: ..."
NATIVE_LINE = re.compile(
    rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] [\w./-]+\.(cc|h):\d+:"
)
_native_filter_on = False


def forward_native(read_fd: int, term_fd: int) -> None:
    """Copy what arrives on `read_fd` to `term_fd`, except whole lines of Ray's C++ logging.

    A partial line is held only while it can still become such a line, so progress bars (carriage
    returns, no newline) pass at once.
    """
    buf = b""
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        out = b"".join(x + b"\n" for x in lines if not NATIVE_LINE.match(x))
        maybe_native = buf[:1] == b"[" and (len(buf) == 1 or buf[1:2].isdigit()) and len(buf) < 4096
        if buf and not maybe_native:
            out, buf = out + buf, b""
        if out:
            os.write(term_fd, out)
    if buf and not NATIVE_LINE.match(buf):
        os.write(term_fd, buf)


def keep_native_logs_off_terminal() -> None:
    """Drop the lines Ray's C++ core writes to this process's stderr; everything else still shows.

    A Ray driver's core worker logs to python-core-driver-*.log in Ray's log folder and also copies
    its ERROR lines to fd 2; no option stops the copy (RAY_BACKEND_LOG_LEVEL would drop them from the
    file too). The one a user meets on every Ray Data actor pool (`raycell infer`, `embed`) is
    harmless ("Actor ... has constructor arguments in the object store and max_restarts > 0").
    Those lines stay in that file; fd 2 goes through a pipe whose reader thread forwards everything
    else (Python tracebacks, warnings, progress bars). Fatal-signal tracebacks go straight to the
    terminal (faulthandler). Call after Ray has started (its own processes keep the real stderr);
    once per process.
    """
    import atexit
    import faulthandler
    import sys
    import threading

    global _native_filter_on
    if _native_filter_on:
        return
    _native_filter_on = True
    sys.stderr.flush()
    term = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    t = threading.Thread(target=forward_native, args=(r, term), name="raycell-stderr", daemon=True)
    t.start()
    faulthandler.enable(file=os.fdopen(os.dup(term), "w"), all_threads=True)

    def _restore() -> (
        None
    ):  # fd 2 back to the terminal; the pipe then ends and the thread drains it
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(term, 2)
        t.join(timeout=5)

    atexit.register(_restore)


# ------------------------------------------------------------------------------------------------
# Ray Data's console handler

RAY_DATA_CONSOLE = "console"  # the handler's name in Ray Data's default logging config


def quiet_ray_data_console() -> None:
    """Ray Data's console handler shows CRITICAL records only; its file handler (ray-data.log) all.

    Python logging has no per-destination level on a logger, so the handler is found by the name
    Ray Data's default config (`ray.data._internal.logging.DEFAULT_CONFIG`) gives it. Call after
    `import ray.data`, which configures the logger.
    """
    import logging

    for h in logging.getLogger("ray.data").handlers:
        if getattr(h, "name", "") == RAY_DATA_CONSOLE:
            h.setLevel(logging.CRITICAL)


# ------------------------------------------------------------------------------------------------
# the session's log folder


def session_logs_dir() -> Path | None:
    """This driver's Ray log folder (every worker's output, Ray Data's log), or None without Ray."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public accessor for the session folder
        return Path(node.get_logs_dir_path()) if ray.is_initialized() and node is not None else None
    except Exception:  # noqa: BLE001 - only a convenience link
        return None


# ------------------------------------------------------------------------------------------------
# user errors raised inside Ray Data


def user_error_in(exc: BaseException, user: tuple[type, ...]) -> BaseException | None:
    """The exception of one of the `user` classes inside a Ray failure, with its one-line message.

    Local execution keeps it in the `__cause__`/`__context__` chain. Across processes Ray gives a
    `RayTaskError` whose `cause` is the worker's exception (with
    `DataContext.raise_original_map_exception` set, else Ray Data's `UserCodeException` whose own
    cause is lost in pickling); Ray Data appends its retry notes ("Failed to apply UDF transform
    after 1/1 attempts ...") on new lines of the message, so the error is rebuilt from its first.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError's
        for found in (e, cause):
            if isinstance(found, user) and not type(found).__module__.startswith("ray."):
                lines = str(found).splitlines()
                if len(lines) <= 1:
                    return found
                return type(found)(lines[0])
        e = e.__cause__ or e.__context__ or (cause if isinstance(cause, BaseException) else None)
    return None


# ------------------------------------------------------------------------------------------------
# Ray Train's SIGINT handler


def replace_train_sigint_handler(trainer, register: Callable[[object], None]) -> None:
    """Have `trainer.fit()` call `register(controller)` instead of installing Ray Train's handler.

    Ray Train V2's `DataParallelTrainer._initialize_and_run_controller` calls
    `self._register_sigint_handler(controller)` (main thread only) once the run's controller actor
    exists; its handler aborts the run and then lets `fit` return as if it had finished. No public
    option replaces it.
    """
    trainer._register_sigint_handler = register


# ------------------------------------------------------------------------------------------------
# the cluster launcher's offline checks


def launcher_provider_types() -> list[str]:
    """The node provider types Ray's cluster launcher knows (`provider.type`), `external` aside."""
    from ray.autoscaler._private.providers import _DEFAULT_CONFIGS

    return sorted(_DEFAULT_CONFIGS)


def validate_launcher_config(cfg: dict) -> None:
    """Ray's own offline checks of a launcher config: provider defaults from local files, then
    docker and node-type checks (`ray up` runs the same; no cloud call). Raises what Ray raises.
    """
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    log = logging.getLogger("ray.autoscaler._private.util")  # its INFO lines are not findings
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        validate_config(prepare_config(cfg))
    finally:
        log.setLevel(level)
