"""Bench: time bundles through their runtime, judge them against a profile's budgets, report.

``measure`` (timing, accuracy, memory, rows), ``budgets`` (verdicts), ``report`` (tables, JSON,
CSV, Markdown, plot). Needs only numpy and the bundle's runtime: never torch.
"""

from ..bundle import BundleError, resolve_bundles  # noqa: F401
from .budgets import BUDGET_CHECKS, apply_budgets, judge  # noqa: F401
from .measure import (MB, MemoryProbe, Row, bench_bundle, bench_bundles, exit_code, latency_stats,  # noqa: F401
                      peak_rss_mb, reset_peak_rss, resolve_settings, throughput_ips, time_runs, top1_accuracy)
