"""Helpers the benchmark scripts share: ivr-bridge processes, /proc readings, percentiles."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    args: list[str], env: dict[str, str] | None = None, log: Path | None = None, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """`python -m ivr_bridge ARGS` in the repository (or in `cwd`, another checkout, whose
    package is then the one imported), output to `log` (appended) or nowhere.
    `env` is laid over this process's environment, less any of the bridge's own settings in the
    shell, so a run is the same wherever it is started."""
    from ivr_bridge.settings import OWN_PREFIX, Settings

    own = Settings.variable_names()
    base = {k: v for k, v in os.environ.items() if not (k.startswith(OWN_PREFIX) or k in own)}
    cmd = [sys.executable, "-m", "ivr_bridge", *args]
    if log is None:
        return subprocess.Popen(cmd, env={**base, **(env or {})}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=cwd)  # fmt: skip
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, env={**base, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 40) -> None:
    """SIGTERM (the bridge drains), then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def status_kib(pid: int, key: str) -> int:
    """A memory line of /proc/PID/status (VmRSS, VmHWM...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def percentiles(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """Nearest-rank min, p50, p95, p99 and max of `values`, with their count as "n"."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], digits)

    return {
        "n": len(ordered),
        "min": round(ordered[0], digits),
        "p50": at(0.5),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(ordered[-1], digits),
    }
