"""Rows of a remote bench and how the CLI shows them: the device's bench rows with ``host``,
``remote_path`` and ``stage`` added, error rows naming the host and the stage, the ``host``
column, one footer line per host (governor, temperature, throttling, nvpmodel, clocks)."""

from __future__ import annotations

import posixpath
from typing import Sequence

from ..measure import Row
from ..report import Column
from .plan import BundleRef, Plan
from .ssh import Host

MANIFEST_FIELDS = ("target", "backend", "format", "weight_bits", "act_bits", "torch_accuracy", "teacher_accuracy",
                   "student_float_accuracy")

HOST_COLUMN = Column("host", lambda r: str(r.get("host") or "-"), numeric=False)
TABLE_COLUMNS = (HOST_COLUMN,)  # report.render_table(rows, extra=TABLE_COLUMNS, footer=footer(rows))


def error_row(host: Host, ref: BundleRef, stage: str, message: str, environment: dict | None = None) -> dict:
    row = Row(bundle=ref.name, path=str(ref.local), status="error", error=f"{host.label}: {stage}: {message}",
              environment=dict(environment or {})).to_dict()
    for key in MANIFEST_FIELDS:
        row[key] = (ref.manifest or {}).get(key)
    row.update(host=host.label, remote_path=None, stage=stage)
    return row


def host_rows(host: Host, plan: Plan, root: str, answer: dict) -> list[dict]:
    """The device's rows in bundle order, with host, the local path and the remote one."""
    by_path: dict[str, list[dict]] = {}
    for row in answer.get("rows") or []:
        by_path.setdefault(str(row.get("path")), []).append(row)
    rows = []
    for ref in plan.refs:
        if ref.error is not None:
            rows.append(error_row(host, ref, "bench", ref.error))
            continue
        remote = posixpath.join(root, ref.item.path)
        found = by_path.get(remote) or [error_row(host, ref, "bench", "the device returned no row for this bundle")]
        for row in found:
            row = dict(row)
            if answer.get("clocks") is not None:
                row["environment"] = dict(row.get("environment") or {}, clock_changes=answer["clocks"])
            row.update(path=str(ref.local), host=host.label, remote_path=remote, stage=row.get("stage"))
            rows.append(row)
    return rows


def _short_nvpmodel(text: str | None) -> str | None:
    if not text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    mode = lines[0].split(":", 1)[-1].strip() if lines else text
    return f"{mode} ({lines[-1]})" if len(lines) > 1 and lines[-1].isdigit() else mode


def _clock_text(changes: dict | None) -> str:
    if changes is None:
        return "clocks as found (--set-clocks not given)"
    done = changes.get("applied") or []
    return ("clocks: " + ("; ".join(done) if done else "nothing set")
            + (f"; not set: {'; '.join(changes['failed'])}" if changes.get("failed") else "")
            + ("; restored afterwards" if changes.get("restored") else ""))


def footer(rows: Sequence[dict]) -> list[str]:
    """One line per host: governor, temperature, throttling, nvpmodel and what --set-clocks did."""
    lines, seen = [], set()
    for row in rows:
        host, env = row.get("host"), row.get("environment") or {}
        if host is None or host in seen or "cpu_count" not in env:
            continue
        seen.add(host)
        parts = [f"governor {env.get('cpu_governor', 'n/a')}"]
        if env.get("temperature_c") is not None:
            parts.append(f"{env['temperature_c']:.1f} C")
        if env.get("rpi_throttled"):
            parts.append(env["rpi_throttled"].replace("throttled=", "throttled "))
        if env.get("jetson_nvpmodel"):
            parts.append(f"nvpmodel {_short_nvpmodel(env['jetson_nvpmodel'])}")
        parts.append(_clock_text(env.get("clock_changes")))
        lines.append(f"{host}: " + ", ".join(parts))
    return lines


def warnings(label: str, rows: Sequence[dict], set_clocks: bool) -> list[str]:
    """Notes on settings that make timings unreliable: reported, never changed silently."""
    env = next((r.get("environment") for r in rows if (r.get("environment") or {}).get("cpu_count")), None) or {}
    found = []
    governor = env.get("cpu_governor")
    if governor and governor != "performance":
        found.append(f"{label}: note: the CPU governor is {governor!r}, timings may vary"
                     + ("" if set_clocks else " (--set-clocks uses the profile's governor for the run)"))
    throttled = env.get("rpi_throttled")
    if throttled and not throttled.endswith("=0x0"):
        found.append(f"{label}: note: {throttled}: the Pi was throttled or under-voltage since boot")
    for failure in (env.get("clock_changes") or {}).get("failed") or []:
        found.append(f"{label}: note: clocks not set: {failure}")
    return found


def exit_code(rows: Sequence[dict], strict: bool) -> int:
    """As edgekd.bench.exit_code, for the dict rows bench_remote returns."""
    return 1 if strict and any(r.get("status") != "ok" for r in rows) else 0
