"""Render benchmark rows: a terminal table, JSON, CSV, Markdown and an accuracy-vs-latency plot.

Functions here take rows (``edgekd.bench.Row`` or their dicts), return strings or write files
atomically; they never print or exit. matplotlib is imported only by ``plot``.
The table is driven by ``COLUMNS``: one entry per column, shared by the terminal and Markdown.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.errors import MissingExtraError
from ..core.text import clean
from ..core.fsutil import atomic_path, write_json, write_text
from .outputs import check_outputs  # noqa: F401  (the CLI calls it as report.check_outputs)


def records(rows: Sequence[Any]) -> list[dict]:
    """Rows as JSON-ready dicts (the ``bench --json`` contract)."""
    return [row if isinstance(row, dict) else row.to_dict() for row in rows]


# --- formatting of single cells ---------------------------------------------------------------------------

def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _sig(value, digits: int = 3) -> str:
    """``digits`` significant digits without exponent: 0.0221, 1.23, 17.0, 153."""
    if value is None:
        return "-"
    if value == 0 or not math.isfinite(value):
        return format(value, "g")
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def bits_label(row: dict) -> str:
    """W8A8 for quantized rows, fp32 for float ones, '-' when unknown."""
    w, a = row.get("weight_bits"), row.get("act_bits")
    if row.get("format") == "fp32":
        return "fp32"
    if w is None:
        return "-"
    return f"W{w}A{a}" if a is not None else f"W{w}"


def _latency(row: dict, key: str) -> str:
    return _sig((row.get("latency_ms") or {}).get(key))


def _percent(value) -> str:
    return _num(None if value is None else 100 * value, ".2f")


def _pp(row: dict, after: str, before: str) -> str:
    """Percentage points gained (+) or lost (-) between two accuracies of the row, '-' if unknown."""
    a, b = row.get(after), row.get(before)
    return "-" if a is None or b is None else f"{100 * (a - b):+.2f}"


ACCURACY_LEGEND = ("accuracy: teacher (float, PyTorch) -> float (student after KD) -> torch (fake-quant, PyTorch) "
                   "-> acc (runtime); KD pp = float - teacher, quant pp = torch - float, deploy pp = acc - torch")
_PATH_KEYS = ("teacher_accuracy", "student_float_accuracy", "torch_accuracy")


def budget_label(row: dict) -> str:
    """'pass', 'fail: <budgets over the limit>', or '-' when no profile budget applied."""
    budget = row.get("budget")
    if not budget:
        return "-"
    failed = [name for name, v in budget.items() if v["verdict"] != "pass"]
    return "fail: " + ",".join(failed) if failed else "pass"


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict], str]
    numeric: bool = True


COLUMNS: tuple[Column, ...] = (
    Column("bundle", lambda r: str(r.get("bundle")), numeric=False),
    Column("status", lambda r: str(r.get("status")), numeric=False),
    Column("format", lambda r: r.get("format") or "-", numeric=False),
    Column("bits", bits_label, numeric=False),
    Column("batch", lambda r: _num(r.get("batch_size"), "d")),
    Column("size MB", lambda r: _sig(r.get("size_mb"))),
    Column("teacher %", lambda r: _percent(r.get("teacher_accuracy"))),
    Column("float %", lambda r: _percent(r.get("student_float_accuracy"))),
    Column("torch %", lambda r: _percent(r.get("torch_accuracy"))),
    Column("acc %", lambda r: _percent(r.get("accuracy"))),
    Column("KD pp", lambda r: _pp(r, "student_float_accuracy", "teacher_accuracy")),
    Column("quant pp", lambda r: _pp(r, "torch_accuracy", "student_float_accuracy")),
    Column("deploy pp", lambda r: _pp(r, "accuracy", "torch_accuracy")),
    Column("p50 ms", lambda r: _latency(r, "p50")),
    Column("p90 ms", lambda r: _latency(r, "p90")),
    Column("p99 ms", lambda r: _latency(r, "p99")),
    Column("img/s", lambda r: _sig(r.get("throughput_ips"))),
    Column("peak RSS MB", lambda r: _num(r.get("peak_rss_mb"), ".1f")),
    Column("budget", budget_label, numeric=False),
)
SOURCE_COLUMN = Column("source", lambda r: str(r.get("source")), numeric=False)


def columns_for(rows: list[dict], extra: Sequence[Column] = ()) -> tuple[Column, ...]:
    """COLUMNS, plus a source column when estimated rows sit next to measured ones, plus the
    caller's ``extra`` columns (e.g. the sweep's) right after the bundle name."""
    cols = COLUMNS[:1] + tuple(extra) + COLUMNS[1:]
    if any(r.get("source") != "measured" for r in rows):
        at = 2 + len(extra)
        return cols[:at] + (SOURCE_COLUMN,) + cols[at:]
    return cols


def _cells(rows: list[dict], extra: Sequence[Column] = ()) -> tuple[tuple[Column, ...], list[list[str]]]:
    cols = columns_for(rows, extra)
    return cols, [[clean(c.cell(r)) for c in cols] for r in rows]


# --- notes under the table ---------------------------------------------------------------------------------

def notes(rows: Sequence[Any]) -> list[str]:
    """One line per row that has an error or a note, then the environment of the runs."""
    rows = records(rows)
    lines = []
    for r in rows:
        where = f"{r.get('bundle')}" + (f" (batch {r['batch_size']})" if r.get("batch_size") is not None else "")
        if r.get("error"):
            lines.append(f"{where}: {r['status']}: {r['error']}")
        elif r.get("note"):
            lines.append(f"{where}: {r['status']}: {r['note']}")
        elif r.get("status") == "fail":
            lines.append(f"{where}: fail: {over_budget(r)}")
    if any(r.get(k) is not None for r in rows for k in _PATH_KEYS):
        lines.append(ACCURACY_LEGEND)
    lines.extend(sample_lines(rows))
    lines.extend(environment_lines(rows))
    return lines


def sample_lines(rows: list[dict]) -> list[str]:
    """One line per bundle whose torch % and acc % are on a sample of the test split (its eval.npz),
    with the whole split's accuracy through the runtime measured at export."""
    seen, lines = set(), []
    for r in rows:
        source = r.get("accuracy_source") or ""
        if not source.startswith("eval sample") or r.get("bundle") in seen:
            continue
        seen.add(r.get("bundle"))
        full = r.get("accuracy_full")
        lines.append(f"{r.get('bundle')}: torch % and acc % on its {source}; whole test split through the runtime "
                     f"at export: {_percent(full) + '%' if full is not None else 'not measured'}")
    return lines


def over_budget(row: dict) -> str:
    """'size_mb 0.52 > 0.1, min_accuracy 0.85 < 0.9': the failed budgets with value and limit."""
    parts = []
    for name, v in (row.get("budget") or {}).items():
        if v["verdict"] == "pass":
            continue
        sign = "<" if name == "min_accuracy" else ">"
        label = f"latency_ms {v['percentile']}" if name == "latency_ms" else name
        parts.append(f"{label} {_sig(v['value'])} {sign} {v['limit']:g}" if v["value"] is not None
                     else f"{label} not measured")
    return ", ".join(parts)


def environment_lines(rows: list[dict]) -> list[str]:
    """A one-line summary of each distinct runtime environment among the rows."""
    seen, lines = set(), []
    for r in rows:
        env = r.get("environment") or {}
        if "runtime" not in env:
            continue
        threads = env.get("intra_op_threads")
        text = (f"environment: {env.get('cpu_model')}, {env.get('cpu_count')} CPUs, {env['runtime']} "
                f"{env.get(env['runtime'] + '_version', '')}, providers {','.join(env.get('providers_used', []))}, "
                f"threads {'runtime default' if threads == 0 else threads}, python {env.get('python')}, "
                f"{env.get('machine')}")
        extras = [f"{k}={env[k]}" for k in ("cpu_governor", "temperature_c", "rpi_throttled") if k in env]
        if "cpu_int8_flags" in env:
            extras.append("int8 cpu flags " + ("+".join(env["cpu_int8_flags"]) or "none"))
        text += ("; " + ", ".join(extras)) if extras else ""
        if text not in seen:
            seen.add(text)
            lines.append(text)
    return lines


# --- renderers -------------------------------------------------------------------------------------------

def render_table(rows: Sequence[Any], extra: Sequence[Column] = (), footer: Sequence[str] = ()) -> str:
    """A plain-text table (numbers right-aligned) followed by the notes and ``footer`` lines."""
    cols, body = _cells(records(rows), extra)
    widths = [max([len(c.header)] + [len(line[i]) for line in body]) for i, c in enumerate(cols)]

    def fmt(cells):
        return "  ".join(s.rjust(w) if c.numeric else s.ljust(w) for c, s, w in zip(cols, cells, widths)).rstrip()

    lines = [fmt([c.header for c in cols]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in body]
    below = [clean(line) for line in list(footer) + notes(rows)]
    return "\n".join(lines + ([""] + below if below else [])) + "\n"


def _md_escape(text: str) -> str:
    """One Markdown table cell or list item: cleaned (``clean``), backslashes and pipes escaped (a
    pipe would start a new cell), ``<`` as an entity (no HTML)."""
    return clean(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def render_markdown(rows: Sequence[Any], extra: Sequence[Column] = (), footer: Sequence[str] = ()) -> str:
    """A GitHub-flavoured Markdown table, then ``footer`` and the notes as a bullet list."""
    cols, body = _cells(records(rows), extra)
    lines = ["| " + " | ".join(c.header for c in cols) + " |",
             "|" + "|".join("---:" if c.numeric else ":---" for c in cols) + "|"]
    lines += ["| " + " | ".join(_md_escape(s) for s in line) + " |" for line in body]
    below = list(footer) + notes(rows)
    if below:
        lines += [""] + [f"- {_md_escape(n)}" for n in below]
    return "\n".join(lines) + "\n"


def flatten(row: dict, prefix: str = "") -> dict:
    """Nested dicts become dotted keys (``latency_ms.p50``, ``budget.size_mb.verdict``); lists
    become ';'-joined strings; None becomes an empty cell."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ";".join(str(v) for v in value)
        else:
            flat[name] = "" if value is None else value
    return flat


def _csv_safe(value):
    """A text cell a spreadsheet would run as a formula (=, +, @, -x, tab, CR first) gets a leading
    apostrophe; numbers and other text are kept as they are (the csv module quotes line breaks)."""
    if isinstance(value, str) and value and (value[0] in "=+@\t\r"
                                             or (value[0] == "-" and value[1:2] not in ("", ".", *"0123456789"))):
        return "'" + value
    return value


def render_csv(rows: Sequence[Any]) -> str:
    """One flattened line per row (CRLF-terminated); the header is the union of keys in first-seen
    order. Text that a spreadsheet would evaluate is neutralised (``_csv_safe``)."""
    flat = [{k: _csv_safe(v) for k, v in flatten(r).items()} for r in records(rows)]
    header: dict[str, None] = {}
    for r in flat:
        header.update(dict.fromkeys(r))
    out = io.StringIO()
    # CRLF line ends (RFC 4180, the csv module's default): a field holding a CR or an LF is then quoted
    writer = csv.DictWriter(out, fieldnames=list(header), restval="", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()


def write_outputs(rows: Sequence[Any], json_path=None, csv_path=None, markdown_path=None,
                  extra: Sequence[Column] = (), footer: Sequence[str] = ()) -> list[Path]:
    """Write each requested file atomically; return the paths written (``extra`` columns and
    ``footer`` lines go to the Markdown table, as in ``render_markdown``)."""
    written = []
    if json_path:
        write_json(json_path, records(rows))
        written.append(Path(json_path))
    if csv_path:
        write_text(csv_path, render_csv(rows))
        written.append(Path(csv_path))
    if markdown_path:
        write_text(markdown_path, render_markdown(rows, extra, footer))
        written.append(Path(markdown_path))
    return written


# --- plot --------------------------------------------------------------------------------------------------

def check_plot_available() -> None:
    """Raise MissingExtraError unless matplotlib can be imported (checked before benchmarking)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtraError("matplotlib", "plot", "--plot")


def _plain(text: str) -> str:
    """Text matplotlib draws as written: cleaned (``clean``), ``$`` escaped (no mathtext)."""
    return clean(text).replace("$", "\\$")


def _marker_area(size_mb: float | None) -> float:
    """Marker area in points^2 growing with model size: 40 + 60 * sqrt(MB), so 1 MB -> 100."""
    return 40.0 + 60.0 * (size_mb or 0.0) ** 0.5


def _budget_lines(ax, budgets) -> None:
    if budgets is None:
        return
    if budgets.latency_ms is not None:
        ax.axvline(budgets.latency_ms, color="tab:red", linestyle="--",
                   label=f"latency budget: {budgets.latency_percentile} <= {budgets.latency_ms:g} ms")
    if budgets.min_accuracy is not None:
        ax.axhline(budgets.min_accuracy, color="tab:purple", linestyle=":",
                   label=f"accuracy budget: >= {budgets.min_accuracy:g}")


def _front_line(ax, front) -> None:
    points = [((r.get("latency_ms") or {}).get("p50"), r.get("accuracy")) for r in records(front or ())]
    points = sorted(p for p in points if None not in p)
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], color="0.4", linewidth=1, zorder=0,
                label="Pareto set (accuracy, latency, size)")


def plot(rows: Sequence[Any], path, budgets=None, title: str | None = None, front: Sequence[Any] | None = None) -> Path:
    """Accuracy (runtime) vs p50 latency per call, one marker per measured row, marker area
    growing with model size (see ``_marker_area``), dashed lines at the profile's budgets, and a
    grey line through the ``front`` rows (a sweep's Pareto set) when given; each marker is
    labelled with its bits, and the latency axis is logarithmic when values span over 20x.
    Circles are measured rows, triangles estimated ones. Written atomically as PNG."""
    check_plot_available()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs: list[float] = []
    for r in records(rows):
        p50, acc = (r.get("latency_ms") or {}).get("p50"), r.get("accuracy")
        if p50 is None or acc is None:
            continue
        label = _plain(f"{r['bundle']} b{r.get('batch_size')} ({bits_label(r)}, {_sig(r.get('size_mb'))} MB)")
        ax.scatter([p50], [acc], s=_marker_area(r.get("size_mb")), alpha=0.7, label=label,
                   marker="^" if r.get("source") == "estimated" else "o")
        ax.annotate(bits_label(r), (p50, acc), textcoords="offset points", xytext=(6, 6), fontsize="small")
        xs.append(p50)
    _budget_lines(ax, budgets)
    _front_line(ax, front)
    if budgets is not None and budgets.latency_ms is not None:
        xs.append(budgets.latency_ms)
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:  # e.g. 0.05 ms models next to a 5 ms budget
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 0.1 0.2 0.5 1 2 5 ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # not 10^-1
        ax.xaxis.set_minor_formatter(NullFormatter())  # matplotlib's minor labels collide here
    ax.set_xlabel("p50 latency per call (ms)")
    ax.set_ylabel("top-1 accuracy through the runtime")
    ax.set_title(_plain(title or "edgekd bench: accuracy vs latency (marker area ~ model size)"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": "edgekd (matplotlib)"})
    return Path(path)
