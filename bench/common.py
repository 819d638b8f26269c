"""What every benchmark script shares: the machine record, CPU seconds of a process tree, tables, the JSON.

Ratios are only meaningful within one run on one machine, so each script records where it ran (cores,
RAM, load average at the start) beside its numbers, and `run_all.py` compares them with the goals.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine() -> dict:
    """Cores, RAM, load average and software versions, taken when called (call it at the start)."""
    ram = None
    try:
        with open("/proc/meminfo") as f:
            ram = round(int(f.readline().split()[1]) / 2**20, 1)  # MemTotal kB -> GiB
    except OSError:
        pass
    info = {
        "cores": os.cpu_count(),
        "ram_gib": ram,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    from importlib.metadata import PackageNotFoundError, version

    for pkg in (
        "torch",
        "ray",
        "pyarrow",
    ):  # from the installed metadata: importing torch takes seconds
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return info


def _proc_stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, user + system seconds) of a live process from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process, its finished children and every live descendant.

    Ray's workers, raylet and object store and a DataLoader's worker processes are all descendants of
    the driver, so (CPU seconds over a window) / (wall seconds) is the number of cores a loader used.
    Outside Linux only this process and its finished children are counted.
    """
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    if not os.path.isdir("/proc"):
        return total
    children: dict[int, list[tuple[int, float]]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            st = _proc_stat(pid)
            if st:
                children.setdefault(st[0], []).append((int(pid), st[1]))
    todo = [os.getpid()]
    while todo:
        for pid, cpu in children.get(todo.pop(), []):
            total += cpu
            todo.append(pid)
    return total


class Window:
    """Wall and process-tree CPU seconds between `start()` and `stop()`; `cores` = CPU s / wall s."""

    def start(self) -> "Window":
        self.t0, self.c0 = time.perf_counter(), tree_cpu_seconds()
        return self

    def stop(self) -> "Window":
        self.wall = time.perf_counter() - self.t0
        self.cpu = tree_cpu_seconds() - self.c0
        self.cores = self.cpu / self.wall if self.wall > 0 else float("nan")
        return self


def ratio(a: float | None, b: float | None) -> float | None:
    """A / b, None when either is missing or b is 0 (a row that did not run has no ratio)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v, digits: int = 2) -> str:
    """A table cell: numbers rounded (thousands separated when large), None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return str(v)


def print_table(title: str, headers: list[str], rows: list[list]) -> str:
    """Print (and return) a plain-text table with right-aligned columns after the first."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]

    def line(r):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    text = "\n".join(
        [title, line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]
    )
    print("\n" + text, flush=True)
    return text


def out_path(arg: str | None, name: str) -> Path:
    """`--out`: a .json file as given, a folder (<folder>/<date>_<name>.json), or the results folder."""
    p = Path(arg) if arg else RESULTS
    if p.suffix == ".json":
        return p
    return p / f"{time.strftime('%Y%m%d')}_{name}.json"


def write_result(path: Path, result: dict) -> Path:
    """Write a benchmark's JSON atomically (the command that produced it included)."""
    from raycell.utils.io import atomic_write_json

    result.setdefault("command", " ".join(["python", *sys.argv]))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    print(f"wrote {path}", flush=True)
    return path
