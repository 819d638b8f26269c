"""Starting or joining Ray the same way from the CLI, the jobs and the tests."""

from __future__ import annotations

import os
from pathlib import Path

from raycell.errors import ConfigError
from raycell.utils.ray_private import (  # noqa: F401 - the CLI takes keep_native_logs_off_terminal from here
    keep_native_logs_off_terminal,
    quiet_ray_data_console,
    route_raylet_messages,
    session_logs_dir,
)

STATE_API_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients look first

# Ray's public switches for a quieter driver (RAY_TRAIN_ENABLE_PRINT_PATCH=0 also stops every worker
# print appearing twice). Set before Ray starts.
_QUIET_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SCHEDULER_EVENTS": "0",
}


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for a GCS (`host:port`) or Ray Client (`ray://host[:port]`) address.

    None for addresses Ray resolves itself (`auto`, `local`, anything with another scheme).
    """
    default = 6379
    if address.startswith("ray://"):
        address, default = address[len("ray://") :].split("/", 1)[0], 10001
    elif "://" in address or address in ("auto", "local"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or host.endswith(":"):  # no port, or a bare IPv6 address
        host, port = address, str(default)
    host = host.strip("[]")
    if not host:
        return None
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(
            f"ray.address {address!r}: the port {port!r} is not a number "
            "(expected host:port, ray://host:port or auto)"
        ) from None


# HTTP/2 client preface + an empty SETTINGS frame: a gRPC server (Ray's GCS and Ray Client server both are)
# answers with a frame header of its own.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def check_reachable(address: str, timeout_s: float = 5.0, source: str = "ray.address") -> None:
    """Fail fast when nothing that speaks gRPC answers at `address`: Ray's own connect retries forever.

    A TCP connect, then (unless RAY_USE_TLS is set) the HTTP/2 preface every gRPC server answers; a port
    that accepts connections but never answers is caught too. Each step waits at most `timeout_s`.

    Raises:
        ConfigError: naming the address, where it came from and what to do.
    """
    import socket

    hp = _host_port(address)
    if hp is None:
        return
    tls = os.environ.get("RAY_USE_TLS", "0").lower() not in ("", "0", "false")
    why = ""
    try:
        with socket.create_connection(hp, timeout=timeout_s) as sock:
            if not tls:
                sock.settimeout(timeout_s)
                sock.sendall(_H2_PREFACE)
                if not sock.recv(9):
                    why = "the connection was closed without a gRPC answer: not a Ray address"
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
    if why:
        raise ConfigError(
            f"{source} {address}: cannot reach Ray at {hp[0]}:{hp[1]} ({why}; waited up to "
            f"{timeout_s:g} s per step); is Ray running there (`ray start --head`)? Fix "
            "--address / ray.address / RAY_ADDRESS, or leave it empty for a local Ray "
            "(ray.connect_timeout_s sets the wait)"
        )


# Raylet messages that describe Ray's own housekeeping, not the user's job: kept out of the terminal.
_HOUSEKEEPING = ("PYTHON worker processes have been started",)
RAYLET_MESSAGES = "raycell_raylet_messages.log"  # in Ray's log folder (`ray_logs_dir`)


def show_raylet_message(lines: list[str]) -> None:
    """What the terminal shows of a raylet message (Ray's driver would print it whole) when not verbose.

    Every message goes whole to RAYLET_MESSAGES in Ray's log folder; housekeeping ones (the worker
    pool's "N PYTHON worker processes have been started" warnings on busy runs) stop there, any other
    (a worker killed for memory, a task that failed) reaches the terminal as one `[raycell] Ray:` line
    naming the file.
    """
    import sys

    logs = ray_logs_dir()
    where = ""
    if logs is not None:
        with open(logs / RAYLET_MESSAGES, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        where = f" (whole message: {logs / RAYLET_MESSAGES})"
    shown = [x.strip() for x in lines if x.strip()]
    if shown and not any(h in x for h in _HOUSEKEEPING for x in shown):
        print(f"[raycell] Ray: {shown[0][:300]}{where}", file=sys.stderr, flush=True)


def default_local_cpus() -> int:
    """Logical CPUs of a private local Ray when `ray.num_cpus` is 0: max(4, 2 x cores) (see `init_ray`)."""
    return max(4, 2 * (os.cpu_count() or 1))


def init_ray(
    address: str = "",
    num_cpus: int = 0,
    object_store_mb: int = 0,
    progress: bool = True,
    connect_timeout_s: float = 5.0,
    verbose: bool = False,
    start_timeout_s: float = 0.0,
) -> None:
    """Join a cluster (`address`, or RAY_ADDRESS as under `ray job submit`) or start a private local Ray.

    A local Ray gets more logical CPUs than the machine has (max(4, 2 x cores)): Ray Data read tasks need
    CPU slots while train workers hold theirs, and on 2 cores they otherwise starve and `fit()` hangs.
    An address with nothing listening fails within `connect_timeout_s` (ConfigError) instead of hanging.
    A local Ray that does not come up in time on a busy machine is started again until
    `start_timeout_s` has passed (0: `start_wait_s()`, which grows with the machine's load), then
    fails in one line (ConfigError) naming `ray.start_timeout_s`.
    `verbose` False (the CLI's default, `ray.verbose`): the workers' output and Ray's INFO logs stay in
    Ray's log folder (`ray_logs_dir()`, named in each run folder's ray_logs.txt) instead of the terminal.
    """
    import logging

    import ray

    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if not (address or os.environ.get("RAY_ADDRESS")):
        # a private local instance: no token to share with anyone (an explicit value also stops the
        # "Token authentication is enabled" warning); a cluster's own setting is never overridden
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # the driver's own INFO lines ("Started a local Ray instance. View the dashboard at ...") too
    level = logging.INFO if verbose else logging.WARNING
    if not ray.is_initialized():
        source = "ray.address" if address else "RAY_ADDRESS"
        addr = address or os.environ.get("RAY_ADDRESS", "")
        if addr:
            check_reachable(addr, connect_timeout_s, source)
            try:
                ray.init(address=addr, log_to_driver=verbose, logging_level=level)
            except ConnectionError as exc:  # e.g. `auto` with no Ray running on this machine
                raise ConfigError(f"{source} {addr}: {str(exc).splitlines()[0]}") from None
        else:
            kw = {
                "num_cpus": num_cpus or default_local_cpus(),
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
            }
            if object_store_mb:
                kw["object_store_memory"] = object_store_mb << 20

            def start() -> None:
                # address="local": always a private instance. A bare ray.init() would join any `ray
                # start` cluster on this machine (or a stale one named in ray_current_cluster) instead.
                ray.init(
                    address="local",
                    log_to_driver=verbose,
                    logging_level=level,
                    **kw,
                    **own_state_api(),
                )

            _start_local(start, start_timeout_s)
    import ray.data

    if not verbose:
        route_raylet_messages(show_raylet_message)
        # Driver-side INFO lines (Ray Data's per-execution plans and progress logs, Train and Tune
        # status): after `import ray.data`, which configures its loggers; they stay in Ray Data's own
        # log file (ray-data.log in the session logs).
        for name in ("ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Ray Data also logs a failed task's abbreviated trace at ERROR on the console; the error itself
        # reaches the caller as an exception (the CLI prints it in one line), so on the console it is
        # noise. Its file handler keeps the record.
        quiet_ray_data_console()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress


def init_ray_from(section) -> None:
    """`init_ray` with the settings of a config's `ray` section (`ExperimentConfig.ray`), as every
    command starts Ray.
    """
    init_ray(
        section.address,
        section.num_cpus,
        section.object_store_mb,
        section.progress,
        section.connect_timeout_s,
        verbose=section.verbose,
        start_timeout_s=section.start_timeout_s,
    )


def start_wait_s() -> float:
    """How long to keep trying to start a local Ray: 60 s, times the load per core above 1.

    Why: Ray gives its raylet a fixed 30 s to register ("The current node timed out during
    startup"); on a machine whose cores are all busy with other work that is not enough, though
    the start would succeed with a little more time.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return 60.0 * max(1.0, load / (os.cpu_count() or 1))


def free_port() -> int:
    """A TCP port nobody on this machine listens on now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_state_api() -> dict:
    """`ray.init` arguments that point this local Ray's workers at its own State API.

    Why: Ray Train's placement-group cleaner (a worker) asks the State API whether a stopped trial's
    Train controller is dead, and finds the API by looking for Ray instances on the machine. With two
    local Rays running (two raycell commands, a notebook beside a search) that lookup fails ("Found
    multiple active Ray instances"), the cleaner's thread dies, and every trial Tune stops early keeps its
    workers' CPUs reserved until the search hangs. Naming the dashboard's port and handing its address
    to the workers (`RAY_API_SERVER_ADDRESS`, read before any lookup) removes the guess.
    """
    port = free_port()
    return {
        "dashboard_port": port,
        "runtime_env": {"env_vars": {STATE_API_ENV: f"http://127.0.0.1:{port}"}},
    }


def _start_local(start, timeout_s: float = 0.0) -> None:
    """Call `start()` (a local `ray.init`), again after a start-up timeout, until `timeout_s`.

    Raises:
        ConfigError: still timing out after `timeout_s` (0: `start_wait_s()`), naming the key.
    """
    import time

    import ray

    budget = timeout_s or start_wait_s()
    t0 = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            start()
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            text = str(exc)
            if not ("timed out" in text or isinstance(exc, TimeoutError)):
                raise
            try:
                ray.shutdown()  # whatever half-started is stopped before the next try
            except Exception:  # noqa: BLE001 - nothing to stop
                pass
            waited = time.monotonic() - t0
            if waited >= budget:
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                raise ConfigError(
                    f"a local Ray did not start in {waited:.0f} s ({tries} tries; the machine is "
                    f"busy: load {load:.1f} on {os.cpu_count()} cores; Ray said: "
                    f"{text.splitlines()[0][:120]}); raise ray.start_timeout_s (now "
                    f"{timeout_s:g}, 0 = {budget:.0f} s from the load) or try again when the "
                    "machine is less busy"
                ) from None
            print(
                f"[raycell] a local Ray did not start in time (busy machine); trying again "
                f"({waited:.0f} of {budget:.0f} s, ray.start_timeout_s)",
                flush=True,
            )
            time.sleep(min(5.0, budget - waited))  # a breath for the machine before the next try


def single_node() -> bool:
    """True when the running Ray has one live node (a laptop or one machine): its cores are then shared
    between the workers or actors of a job by setting their torch threads.
    """
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")]) == 1


def ray_logs_dir() -> Path | None:
    """This driver's Ray log folder (session logs: every worker's output, Ray Data's log), or None."""
    return session_logs_dir()


def link_ray_logs(run_dir: str | os.PathLike) -> Path | None:
    """Write `<run_dir>/ray_logs.txt`: where Ray keeps this session's logs (what the workers printed).

    A text file, not a symlink: copying a run folder must not copy (or trip over) Ray's live logs.
    """
    from raycell.utils.io import atomic_write_text

    logs = ray_logs_dir()
    if logs is None:
        return None
    f = Path(run_dir) / "ray_logs.txt"
    try:
        atomic_write_text(
            f,
            f"Ray's logs of the session that ran this (every worker's output; Ray Data: "
            f"ray-data.log; they are not copied here):\n{logs}\n",
        )
    except OSError:
        return None
    return f
