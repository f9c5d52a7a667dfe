"""Memory and CPUs of this machine as bench sees them: peak and resident memory around one bundle
(see edgekd.bench.measure for the definitions), and the CPUs a run may use. Linux /proc where it
exists, ``getrusage`` elsewhere; never torch."""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

MB = 1e6


def _proc_status_mb(key: str) -> float | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in MB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """getrusage ru_maxrss in MB (the kernel reports kilobytes on Linux, bytes on macOS);
    None where the ``resource`` module does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return raw / MB if sys.platform == "darwin" else raw * 1024 / MB


@dataclass
class MemoryProbe:
    """RSS around loading and running one model (see the module docstring)."""

    scope: str = "process"
    rss_before: float | None = None

    def start(self) -> "MemoryProbe":
        gc.collect()
        self.scope = "bundle" if reset_peak_rss() else "process"
        self.rss_before = _proc_status_mb("VmRSS")
        return self

    def result(self) -> dict:
        # clear_refs resets the kernel's VmHWM, not getrusage's ru_maxrss: read the peak that was reset.
        peak = _proc_status_mb("VmHWM") if self.scope == "bundle" else peak_rss_mb()
        rss_after = _proc_status_mb("VmRSS")
        known = self.rss_before is not None
        return {"peak_rss_mb": peak, "peak_rss_scope": self.scope if peak is not None else None,
                "rss_increase_mb": rss_after - self.rss_before if known and rss_after is not None else None,
                "peak_rss_increase_mb": peak - self.rss_before if known and self.scope == "bundle" else None}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_threads(threads: int) -> tuple[int, str | None]:
    """``threads`` cut to the CPUs available here, and a note when it was cut (0: the runtime's choice)."""
    cpus = available_cpus()
    if threads <= cpus:
        return threads, None
    return cpus, f"threads {threads} > the {cpus} CPUs available here: ran with {cpus}"
