"""What raycell relies on beneath Ray's public API (raycell/utils/ray_private.py), checked against the
installed Ray: each test fails by name when a Ray upgrade changes what the module depends on.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raycell.errors import ConfigError, user_errors
from raycell.utils import ray_private as P

ROOT = Path(__file__).resolve().parents[1]


def test_rays_error_listener_prints_raylet_messages_through_the_printer_raycell_replaces(
    monkeypatch, capsys
):
    """Ray's own listener, fed one raylet message, hands it to the sink; a worker's line still
    reaches Ray's printer (and the terminal)."""
    import ray._private.worker as w

    assert "print_to_stdstream" in w.listen_error_messages.__code__.co_names, (
        "Ray's error listener no longer looks up print_to_stdstream at each message: "
        "route_raylet_messages has no effect"
    )
    rays = P._RAY_PRINT if w.print_to_stdstream is P._printer else w.print_to_stdstream
    assert list(inspect.signature(rays).parameters) == ["data", "ignore_prefix"]
    for obj, name in ((w, "print_to_stdstream"), (P, "_RAY_PRINT"), (P, "_RAYLET_SINK")):
        monkeypatch.setattr(obj, name, getattr(obj, name))  # restored after the test
    got: list[list[str]] = []
    P.route_raylet_messages(got.append)
    P.route_raylet_messages(got.append)  # a second init_ray: Ray's printer is still the one kept
    assert w.print_to_stdstream is P._printer and P._RAY_PRINT is rays

    stopped = threading.Event()

    class Subscriber:  # stands in for the GCS: one message, then nothing
        def __init__(self):
            self.polls = 0

        def subscribe(self):
            pass

        def poll(self):
            self.polls += 1
            if self.polls == 1:
                return None, {"job_id": None, "error_message": "Task was killed (out of memory)."}
            stopped.set()
            return None, None

    driver = SimpleNamespace(
        gcs_error_subscriber=Subscriber(), current_job_id=SimpleNamespace(binary=lambda: b"job")
    )
    w.listen_error_messages(driver, stopped)
    assert got == [["Task was killed (out of memory)."]]
    assert capsys.readouterr().out == ""

    w.print_to_stdstream({"lines": ["hello from a worker"], "pid": 4242, "is_err": False}, False)
    assert "hello from a worker" in capsys.readouterr().out and got == [got[0]]


def test_native_ray_log_lines_are_dropped_and_everything_else_reaches_the_terminal(tmp_path):
    r, w = os.pipe()
    out_path = tmp_path / "term"
    term = os.open(out_path, os.O_WRONLY | os.O_CREAT)
    t = threading.Thread(target=P.forward_native, args=(r, term))
    t.start()
    native = (
        b"[2026-12-01 23:28:34,874 E 21956 21956] core_worker.cc:2465: Actor with class name: "
        b"'MapWorker(MapBatches(_ModelActor))' has constructor arguments in the object store\n"
    )
    # a native line split across writes, a progress bar without a newline, a traceback, a user's [bracket]
    for chunk in (
        native[:20],
        native[20:],
        b"infer:  50%|#####     | 3/6\r",
        b"infer: 100%|##########| 6/6\n",
        b"Traceback (most recent call last):\n  ValueError: bad row 3\n",
        b"[raycell] note\n",
        b"[2] no newline at the end",
    ):
        os.write(w, chunk)
    os.close(w)
    t.join(timeout=60)
    assert not t.is_alive()
    os.close(term)
    got = out_path.read_bytes()
    assert b"core_worker.cc" not in got
    assert got == (
        b"infer:  50%|#####     | 3/6\rinfer: 100%|##########| 6/6\n"
        b"Traceback (most recent call last):\n  ValueError: bad row 3\n[raycell] note\n"
        b"[2] no newline at the end"
    )


def test_ray_datas_console_handler_is_found_by_its_name():
    import ray.data  # noqa: F401 - configures the ray.data logger

    handlers = {h.name: h for h in logging.getLogger("ray.data").handlers}
    assert P.RAY_DATA_CONSOLE in handlers, f"Ray Data's handlers are now {sorted(handlers)}"
    console = handlers[P.RAY_DATA_CONSOLE]
    level = console.level
    try:
        P.quiet_ray_data_console()
        assert console.level == logging.CRITICAL
        assert all(
            h.level < logging.CRITICAL for n, h in handlers.items() if n != P.RAY_DATA_CONSOLE
        )
    finally:
        console.setLevel(level)


def test_ray_trains_fit_installs_its_sigint_handler_through_the_hook_raycell_replaces():
    from ray.train.torch import TorchTrainer

    run = TorchTrainer._initialize_and_run_controller
    assert "_register_sigint_handler" in run.__code__.co_names, (
        "Ray Train no longer registers its SIGINT handler through _register_sigint_handler: "
        "replace_train_sigint_handler has no effect"
    )
    hook = inspect.signature(TorchTrainer._register_sigint_handler)
    assert list(hook.parameters) == ["self", "controller"]
    got = []
    trainer = TorchTrainer.__new__(TorchTrainer)  # the hook is looked up on the instance
    P.replace_train_sigint_handler(trainer, got.append)
    trainer._register_sigint_handler("controller")
    assert got == ["controller"]


def test_rays_launcher_checks_run_offline_and_refuse_what_ray_refuses():
    assert {"aws", "gcp", "azure"} <= set(P.launcher_provider_types())
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    P.validate_launcher_config(cfg)
    cfg["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type. must be one of .available_node_types"):
        P.validate_launcher_config(cfg)


def test_user_error_in_the_local_chain_is_found_and_others_are_not():
    try:
        try:
            raise ConfigError("data.path /x: no dataset.json")
        except ConfigError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        found = P.user_error_in(outer, user_errors())
    assert isinstance(found, ConfigError) and str(found) == "data.path /x: no dataset.json"
    assert P.user_error_in(RuntimeError("a bug"), user_errors()) is None


@pytest.mark.ray
def test_through_ray_data_a_user_error_returns_as_itself_and_native_lines_keep_their_form(
    ray_local, capfd
):
    """Ray Data (raise_original_map_exception) hands back the UDF's exception as RayTaskError.cause,
    its message extended by retry notes: user_error_in gives the one line back. The actor pool's
    harmless native ERROR line reaches fd 2 in the form the terminal filter drops."""
    import ray.data

    class Refuses:  # defined here: Ray pickles it by value (workers cannot import this test module)
        """Raises a user error, as the predictor does for a cell without a Z row."""

        def __call__(self, batch):
            raise ConfigError("cell 'c7' has no row in the inferred Z")

    ctx = ray.data.DataContext.get_current()
    before = ctx.raise_original_map_exception
    ctx.raise_original_map_exception = True
    try:
        with pytest.raises(Exception) as info:
            ray.data.range(4).map_batches(
                Refuses, compute=ray.data.ActorPoolStrategy(size=1)
            ).materialize()
    finally:
        ctx.raise_original_map_exception = before
    found = P.user_error_in(info.value, user_errors())
    assert type(found) is ConfigError and str(found) == "cell 'c7' has no row in the inferred Z"

    logs = P.session_logs_dir()
    assert logs is not None and logs.is_dir() and any(logs.glob("raylet*.out"))
    # The driver's core worker writes its lines to its log file and copies the ERROR ones to fd 2,
    # where the terminal filter (if an earlier command in this process installed it) drops them:
    # the form is checked on both copies.
    err = capfd.readouterr().err
    driver_log = b"".join(p.read_bytes() for p in logs.glob("python-core-driver-*.log"))
    native = [
        ln for ln in (err.encode() + b"\n" + driver_log).splitlines() if P.NATIVE_LINE.match(ln)
    ]
    assert native, (
        "no line of Ray's native logging in the driver's log or on stderr (did Ray change their "
        f"form? then revisit keep_native_logs_off_terminal): {err[-2000:]}"
    )
