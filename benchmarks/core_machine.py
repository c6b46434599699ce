"""What ``bench_core.py`` knows of the machine: cores, CPU and RAM, other processes' load, the RSS high-water mark."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path

CONTENDED = 0.25  # cores used by other processes above which a CPU figure counts as contended


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_busy_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (all cores), from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy
    busy = sum(vals[:3]) + sum(vals[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_until_idle(max_wait: float, threshold: float = CONTENDED) -> tuple[float, float | None]:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores over a 1 s sample.

    Returns (seconds waited, last sampled load in cores)."""
    if max_wait <= 0:
        return 0.0, None
    t0 = time.perf_counter()
    load = None
    while True:
        b0 = cpu_busy_seconds()
        if b0 is None:
            return 0.0, None
        time.sleep(1.0)
        load = (cpu_busy_seconds() or b0) - b0
        waited = time.perf_counter() - t0
        if load < threshold or waited >= max_wait:
            return waited, load


def reset_rss_high_water() -> bool:
    """Reset the kernel's RSS high-water mark (and with it ru_maxrss) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
