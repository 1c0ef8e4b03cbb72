"""Where a workload's time goes: py-spy sampling the server's worker processes while the workload runs again.

``sample`` attaches ``py-spy record`` (non-blocking: the workers are not paused) to the gunicorn master and its
workers for a few seconds while a workload repeats, after its measured run, so that the measured figures are
not the profiler's. ``summarize`` reads py-spy's collapsed stacks: the share of samples whose innermost Python
frame is in each function (self) and each library (``psycopg``, ``sqlalchemy``, ``fhir_server/search``, ...),
and the share of samples under each function of ours (inclusive). Time spent in C (libpq, OpenSSL, orjson) is
counted in the Python function that called it. Beside the stacks, ``cpu_pct`` splits the machine's CPU over the
same seconds between the server's processes, PostgreSQL's, and everything else (wrk, this harness, py-spy).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import BIN

RATE = 97  # samples per second per thread (prime: no lock-step with periodic work)
TOP = 12


def _executable() -> str | None:
    """py-spy in the virtual environment (make bench-tools puts it there), else on the PATH."""
    return str(BIN / "py-spy") if (BIN / "py-spy").exists() else shutil.which("py-spy")


def available() -> bool:
    return _executable() is not None


def sample(master_pid: int, out: Path, seconds: int, run: Callable[[], Any]) -> dict[str, Any]:
    """Profile the process tree of ``master_pid`` for ``seconds`` while ``run`` (a workload lasting about as long)
    runs; the collapsed stacks go to ``out``, their summary is returned."""
    spy = subprocess.Popen([str(_executable()), "record", "--pid", str(master_pid), "--subprocesses", "--nonblocking", "--function",
                            "--rate", str(RATE), "--duration", str(seconds), "--format", "raw", "--output", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    worker = threading.Thread(target=run)
    before = _cpu(master_pid)
    worker.start()
    log = spy.communicate(timeout=seconds + 120)[0].decode(errors="replace")
    after = _cpu(master_pid)
    worker.join()
    if spy.returncode != 0 or not out.exists():
        return {"error": f"py-spy failed (exit code {spy.returncode}): {log[-500:]}"}
    stacks = out.read_bytes()  # --nonblocking reads a running process: a torn frame name may not be UTF-8
    packed = out.with_name(out.name + ".gz")
    packed.write_bytes(gzip.compress(stacks))  # a twentieth of the size: results/ is kept in the repository
    out.unlink()
    return {**summarize(stacks.decode(errors="replace")), "cpu_pct": _cpu_shares(before, after), "stacks": packed.name}


def _cpu(master_pid: int) -> dict[str, float]:
    """CPU seconds so far: the server's processes (gunicorn master and workers), PostgreSQL's, and the whole
    machine's busy and idle time (from /proc/stat), with the wall clock."""
    tick = os.sysconf("SC_CLK_TCK")
    server = postgres = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process has ended
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        if int(entry.name) == master_pid or int(fields[1]) == master_pid:
            server += seconds
        elif comm == "postgres":
            postgres += seconds
    cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = (cpu[3] + cpu[4]) / tick  # idle, iowait
    return {"server": server, "postgres": postgres, "busy": sum(cpu) / tick - idle, "idle": idle, "wall": time.monotonic()}


def _cpu_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Where the machine's CPU went during the profile, in % of one core (a 2-core machine has 200 %)."""
    d = {k: after[k] - before[k] for k in before}
    wall = d.pop("wall")
    shares = {"server": d["server"], "postgres": d["postgres"], "everything else": d["busy"] - d["server"] - d["postgres"],
              "idle": d["idle"]}
    return {k: round(100 * max(v, 0.0) / wall, 1) for k, v in shares.items()}


def _library(filename: str) -> str:
    """A frame's file, as the library it belongs to: ``fhir_server/search``, ``psycopg``, ``threading``..."""
    path = filename.split(":")[0]
    parts = path.split("/")
    if "fhir_server" in parts:
        i = parts.index("fhir_server")
        return "/".join(parts[i:i + 2]) if len(parts) > i + 2 else "fhir_server"
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].split(".")[0]
    return parts[0] if len(parts) > 1 else path.rsplit(".", 1)[0]  # the standard library: json, threading, ...


def _frame(text: str) -> tuple[str, str]:
    """``name (file:line)`` -> (``name (file)``, file)."""
    name, _, rest = text.partition(" (")
    filename = rest.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({filename})", filename


def summarize(collapsed: str) -> dict[str, Any]:
    own: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf, leaf_file = frames[-1]
        own[leaf] += count
        libraries[_library(leaf_file)] += count
        for name in {name for name, filename in frames if "fhir_server/" in filename}:
            inclusive[name] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(TOP)]

    return {"samples": total, "self_pct": share(own), "library_pct": share(libraries), "ours_inclusive_pct": share(inclusive)}


def markdown(name: str, profile: dict[str, Any]) -> str:
    """A workload's profile, as a few lines for the report."""
    if "error" in profile:
        return f"- {name}: {profile['error']}"
    libs = ", ".join(f"{n} {p}%" for n, p in profile["library_pct"][:8])
    own = ", ".join(f"{n} {p}%" for n, p in profile["self_pct"][:6])
    ours = ", ".join(f"{n} {p}%" for n, p in profile["ours_inclusive_pct"][:6])
    cpu = ", ".join(f"{k} {v}%" for k, v in profile.get("cpu_pct", {}).items())
    return (f"- {name} ({profile['samples']} samples; CPU in % of one core: {cpu})\n  by library: {libs}\n"
            f"  innermost functions: {own}\n  under our functions (inclusive): {ours}")
