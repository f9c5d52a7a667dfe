"""Choosing among a sweep's cells: the Pareto set (accuracy, latency, size), the best under the
profile's budgets, and the spread of accuracy over seeds. Plain functions over bench rows (dicts)."""

from __future__ import annotations

from typing import Sequence

RUNNABLE = ("ok", "fail")  # bench statuses that carry measurements


def _point(row: dict) -> tuple[float, float, float] | None:
    """(accuracy, p50 ms, size MB) of a measured row, or None when one is unknown."""
    acc, size = row.get("accuracy"), row.get("size_mb")
    p50 = (row.get("latency_ms") or {}).get("p50")
    if row.get("status") not in RUNNABLE or None in (acc, size, p50):
        return None
    return acc, p50, size


def dominates(a: tuple, b: tuple) -> bool:
    """a = (accuracy, latency, size) is at least as good as b everywhere and better somewhere."""
    no_worse = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
    return no_worse and a != b


def pareto_front(rows: Sequence[dict], batch_size: int | None = None) -> list[dict]:
    """Measured rows (at ``batch_size`` when given) that no other such row dominates on higher
    accuracy, lower p50 latency and smaller size; in the input order."""
    points = [(r, _point(r)) for r in rows if batch_size is None or r.get("batch_size") == batch_size]
    points = [(r, p) for r, p in points if p is not None]
    return [r for r, p in points if not any(dominates(q, p) for _, q in points)]


def best_under_budget(rows: Sequence[dict]) -> dict | None:
    """The ``ok`` row (every budget of the profile passed) with the highest accuracy; ties go to
    the lower p50 latency, then the smaller model. None when no row meets the budgets."""
    ok = [(r, _point(r)) for r in rows if r.get("status") == "ok"]
    ok = [(r, p) for r, p in ok if p is not None]
    if not ok:
        return None
    return min(ok, key=lambda rp: (-rp[1][0], rp[1][1], rp[1][2]))[0]




def spread(rows: Sequence[dict], batch_size: int | None = None) -> list[dict]:
    """Accuracy over seeds per (bits, method): mean, min, max and the number of seeds, from the
    measured rows at ``batch_size``, in the rows' order."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("status") in RUNNABLE and r.get("accuracy") is not None \
                and (batch_size is None or r.get("batch_size") == batch_size):
            groups.setdefault((r.get("requested_bits"), r.get("method")), []).append(r["accuracy"])
    return [{"bits": b, "method": m, "seeds": len(v), "mean": sum(v) / len(v), "min": min(v), "max": max(v)}
            for (b, m), v in groups.items()]
