"""Facts about the machine that affect timings, recorded in every bench row's ``environment``.

Only the standard library: bench on a device imports nothing heavier.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any



def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip().strip("\x00") or None
    except OSError:
        return None


def _command(*argv: str) -> str | None:
    """Output of a diagnostic tool if it is on PATH and answers within 3 s, else None."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=3, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def cpu_model() -> str:
    """CPU name from /proc/cpuinfo ("model name" on x86, "Model" on a Raspberry Pi), the
    device-tree model on other ARM boards, else what ``platform`` knows."""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and value.strip():
            return value.strip()
    return _read("/proc/device-tree/model") or platform.processor() or platform.machine()


# CPU features that decide int8 speed: x86 VNNI/AMX (u8 x s8 dot products without saturation, and
# the int8 speed-up over fp32), ARM's dot-product and int8 matrix-multiply extensions.
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def int8_cpu_flags() -> list[str] | None:
    """Which of INT8_CPU_FLAGS /proc/cpuinfo lists (None where it cannot be read)."""
    text = _read("/proc/cpuinfo")
    if text is None:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [f for f in INT8_CPU_FLAGS if f in flags]


def host_facts() -> dict:
    """Facts about the machine that affect timings. Keys that cannot be read are absent.

    ``cpu_count`` is logical CPUs; ``cpus_usable`` those this process may run on (affinity);
    ``temperature_c`` is thermal zone 0 at the time of the call; ``rpi_throttled`` is the raw
    ``vcgencmd get_throttled`` answer (0x0 = never throttled since boot).
    """
    from .. import __version__

    facts: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "edgekd_version": __version__,
    }
    if hasattr(os, "sched_getaffinity"):
        facts["cpus_usable"] = len(os.sched_getaffinity(0))
    flags = int8_cpu_flags()
    if flags is not None:
        facts["cpu_int8_flags"] = flags
    facts.update(_optional_facts())
    return facts


def _optional_facts() -> dict:
    found = {
        "cpu_governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "rpi_throttled": _command("vcgencmd", "get_throttled"),
        "jetson_release": _read("/etc/nv_tegra_release"),
        "jetson_nvpmodel": _command("nvpmodel", "-q"),
    }
    temp = _read("/sys/class/thermal/thermal_zone0/temp")
    if temp and temp.lstrip("-").isdigit():
        found["temperature_c"] = int(temp) / 1000.0  # the kernel reports millidegrees Celsius
    return {k: v for k, v in found.items() if v is not None}
