"""Budgets: a device profile's limits on latency, size, memory and accuracy, judged per bench row."""

from __future__ import annotations

from typing import Callable

from ..catalog import Budgets


def _latency_value(row, budgets: Budgets) -> float | None:
    return (row.latency_ms or {}).get(budgets.latency_percentile)


# budget name -> (value of the row, "max": value <= limit passes | "min": value >= limit passes)
BUDGET_CHECKS: dict[str, tuple[Callable[[object, Budgets], float | None], str]] = {
    "latency_ms": (_latency_value, "max"),
    "size_mb": (lambda row, b: row.size_mb, "max"),
    "peak_rss_mb": (lambda row, b: row.peak_rss_mb, "max"),
    "min_accuracy": (lambda row, b: row.accuracy, "min"),
}


def judge(row, budgets: Budgets) -> dict:
    """{budget: {"limit", "value", "verdict"}} for each budget the profile sets.

    The latency budget applies to the row's per-call latency at ``latency_percentile``: every
    image of a batch waits for the whole batch. A value that could not be measured fails."""
    verdicts = {}
    for name, (value_of, kind) in BUDGET_CHECKS.items():
        limit = getattr(budgets, name)
        if limit is None:
            continue
        value = value_of(row, budgets)
        ok = value is not None and (value <= limit if kind == "max" else value >= limit)
        verdicts[name] = {"limit": limit, "value": value, "verdict": "pass" if ok else "fail"}
        if name == "latency_ms":
            verdicts[name]["percentile"] = budgets.latency_percentile
    return verdicts


def apply_budgets(row, budgets: Budgets | None):
    """Attach verdicts to a measured row; an ``ok`` row over any budget becomes ``fail``."""
    if budgets is None or row.status not in ("ok", "fail"):
        return row
    row.budget = judge(row, budgets)
    if any(v["verdict"] == "fail" for v in row.budget.values()):
        row.status = "fail"
    return row
