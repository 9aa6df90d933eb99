"""The run report: one self-contained HTML page (inline CSS, plots as data URIs, no scripts).

Every string that comes from the log (site names, error texts, plan names) is
escaped: sites and nodes send them over the network.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Iterable, Mapping
from html import escape
from pathlib import Path

from fedcare.report.plots import PLOTS
from fedcare.report.record import RunRecord

__all__ = ["build_report", "write_report"]

#: Columns of the per-site table: (metric, header).
_BINARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("roc_auc", "AUC"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("calibration_error", "calibration error"),
)
_SURVIVAL_COLUMNS: tuple[tuple[str, str], ...] = (("c_index", "C-index"),)

_PLOT_TEXT: dict[str, tuple[str, str]] = {
    "learning_curves": ("Learning curves", "the loss per round (the global training loss, or each site's test log loss under secure aggregation), and the main metric per site and its mean over sites"),
    "roc": ("ROC curves", "ROC curve of each site at the final evaluation, with the chance diagonal"),
    "epsilon": ("Privacy budget", "record-level epsilon spent by each site after each round"),
    "participation": ("Participation", "what each site did in each round"),
    "traffic": ("Traffic", "payload bytes sent to and received from the sites in each round"),
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1a1a1a;line-height:1.45;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.meta{color:#444}.status-completed{color:#007a4d}.status-failed{color:#b33c00}.status-incomplete{color:#946b00}
table{border-collapse:collapse;margin:.5rem 0}th,td{padding:.25rem .6rem;border-bottom:1px solid #e3e3e3;
text-align:right}th:first-child,td:first-child{text-align:left}thead th{background:#f4f4f4}
tfoot td{font-weight:600;border-top:2px solid #999}dl.plan{display:grid;grid-template-columns:max-content auto;
gap:.2rem 1rem}dl.plan dt{font-weight:600}dl.plan dd{margin:0}img.plot{max-width:100%;height:auto;display:block;
margin:.5rem 0}figure{margin:1rem 0}figcaption{color:#555;font-size:.9rem}.note{background:#fff6d6;
padding:.4rem .7rem;border-left:3px solid #e6a800}#problems td{text-align:left}
"""


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _rows(cells: Iterable[Iterable[str]], tag: str = "td") -> str:
    return "".join("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in row) + "</tr>" for row in cells)


def _header(record: RunRecord) -> str:
    import fedcare

    name = escape(record.plan_name or "fedcare run")
    planned = record.rounds_planned if record.rounds_planned is not None else "?"
    started = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.started_at)) if record.started_at is not None else "–"
    )
    status = escape(record.status)
    parts = [
        f"<h1>{name}</h1>",
        '<p class="meta">',
        f"run <code>{escape(record.run_id or 'unknown')}</code> · ",
        f'<strong class="status-{status}">{status}</strong> · ',
        f"{record.rounds_completed} of {planned} rounds · wall time {_duration(record.wall_s)} · ",
        f"started {started} · fedcare {escape(fedcare.__version__)}</p>",
    ]
    parts.extend(f'<p class="note">{escape(note)}</p>' for note in record.notes)
    return "".join(parts)


def _plan_section(record: RunRecord) -> str:
    lines = list(record.plan_summary)
    if not lines:
        known = [("task", record.task), ("dataset", record.dataset), ("strategy", record.strategy)]
        lines = [(label, value) for label, value in known if value]
    if record.data_leaving_sites:
        lines.append(("what left the sites", record.data_leaving_sites))
    if not lines:
        return "<h2>Plan</h2><p>The run directory holds no plan.</p>"
    items = "".join(f"<dt>{escape(label)}</dt><dd>{escape(text)}</dd>" for label, text in lines)
    return f'<h2>Plan and privacy</h2><dl class="plan">{items}</dl>'


def _metrics_section(record: RunRecord) -> str:
    final = record.final
    if final is None:
        return "<h2>Final evaluation</h2><p>No evaluation was logged yet.</p>"
    survival = record.main_metric == "c_index"
    columns = _SURVIVAL_COLUMNS if survival else _BINARY_COLUMNS
    head = _rows([["site", "test n", *(escape(h) for _, h in columns)]], tag="th")
    order = {site: i for i, site in enumerate(record.sites)}
    sites = sorted(set(final.sites) | set(final.examples), key=lambda s: (order.get(s, len(order)), s))
    body = []
    for site in sites:
        metrics = final.sites.get(site, {})
        n = final.examples.get(site)
        body.append([escape(site), str(n) if n is not None else "–", *(_number(metrics.get(m)) for m, _ in columns)])
    total = sum(final.examples.values())
    foot = [["mean of sites", str(total) if final.examples else "–", *(_number(final.mean.get(m)) for m, _ in columns)]]
    return (
        f"<h2>Final evaluation (round {final.round})</h2>"
        '<table id="site-metrics">'
        f"<thead>{head}</thead><tbody>{_rows(body)}</tbody><tfoot>{_rows(foot)}</tfoot></table>"
        "<p class=\"meta\">Each site evaluates the global model on its own test split; the mean gives every "
        "site the same weight, and the test n of the mean row is the total.</p>"
    )


def _plots_section(record: RunRecord, plots: Mapping[str, bytes | None]) -> str:
    parts = ["<h2>Plots</h2>"]
    for name, png in plots.items():
        if png is None:
            continue
        title, description = _PLOT_TEXT.get(name, (name, name))
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure id="plot-{escape(name)}"><img class="plot" alt="{escape(title)}: {escape(description)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{escape(title)}: {escape(description)}.</figcaption></figure>'
        )
    if len(parts) == 1:
        parts.append("<p>Nothing to plot yet.</p>")
    return "".join(parts)


def _participation_section(record: RunRecord) -> str:
    parts = ["<h2>Participation</h2>"]
    counts = {site: sum(1 for row in record.participation.values() if row.get(site) == "trained") for site in record.sites}
    rounds = len(record.participation)
    summary = ", ".join(f"{escape(site)} {n}/{rounds}" for site, n in counts.items())
    parts.append(f"<p>Rounds trained per site: {summary or '–'}.</p>")
    if not record.problems:
        parts.append("<p>No failures, stragglers or refusals.</p>")
        return "".join(parts)
    rows = []
    for problem in record.problems:
        round_text = "before round 1" if problem.round is None else "feature statistics" if problem.round == 0 else str(problem.round)
        what = problem.state + (f" ({problem.kind})" if problem.kind else "")
        rows.append([escape(round_text), escape(problem.node_id or "unknown"), escape(what),
                     escape(problem.reason) or "–"])  # fmt: skip
    head = _rows([["round", "site", "what", "reason"]], tag="th")
    parts.append(f'<table id="problems"><thead>{head}</thead><tbody>{_rows(rows)}</tbody></table>')
    return "".join(parts)


def _epsilon_section(record: RunRecord) -> str:
    spent = record.final_epsilon()
    site_level = {r: v for r, v in record.site_level_epsilon.items() if math.isfinite(v)}
    if not spent and not site_level:
        return ""
    parts = ["<h2>Privacy budget spent</h2>"]
    if spent:
        planned = record.planned_epsilon
        head = _rows([["site", "epsilon spent", "planned"]], tag="th")
        rows = [[escape(site), _number(value), _number(planned)] for site, value in spent.items()]
        parts.append(f'<table id="epsilon"><thead>{head}</thead><tbody>{_rows(rows)}</tbody></table>')
    if site_level:
        last = max(site_level)
        parts.append(f"<p>Site-level DP: epsilon {_number(site_level[last])} for the federation after round {last}.</p>")
    return "".join(parts)


def _traffic_section(record: RunRecord) -> str:
    totals = record.total_traffic()
    if not totals:
        return ""
    head = _rows([["site", "sent to the site (bytes)", "received from the site (bytes)", "total"]], tag="th")
    rows = [[escape(site), f"{t.down:,}", f"{t.up:,}", _bytes(t.total)] for site, t in totals.items()]
    down = sum(t.down for t in totals.values())
    up = sum(t.up for t in totals.values())
    foot = _rows([["all sites", f"{down:,}", f"{up:,}", _bytes(down + up)]])
    return (
        "<h2>Traffic</h2>"
        f'<table id="traffic"><thead>{head}</thead><tbody>{_rows(rows)}</tbody><tfoot>{foot}</tfoot></table>'
        '<p class="meta">Payload bytes of the jobs and their results, feature statistics and evaluation included.</p>'
        + _traffic_per_round(record)
    )


def _traffic_per_round(record: RunRecord) -> str:
    """Bytes down and up per site in each round (round 0: feature statistics), folded away."""
    sites = sorted({site for counts in record.traffic.values() for site in counts})
    head = _rows([["round", *(f"{escape(s)} down / up" for s in sites)]], tag="th")
    rows = [
        [str(number), *(
            f"{_bytes(counts[s].down)} / {_bytes(counts[s].up)}" if s in counts else "–" for s in sites
        )]
        for number, counts in sorted(record.traffic.items())
    ]  # fmt: skip
    return (
        "<details><summary>Bytes down / up per site and round</summary>"
        f'<table id="traffic-rounds"><thead>{head}</thead><tbody>{_rows(rows)}</tbody></table></details>'
    )


def build_report(record: RunRecord) -> str:
    """The run report as one self-contained HTML document.

    Parameters
    ----------
    record : RunRecord

    Returns
    -------
    str
        HTML with inline CSS and the plots of :data:`~fedcare.report.plots.PLOTS`
        as ``data:`` URIs; it references no external resource and runs no script.

    Examples
    --------
    >>> record = RunRecord.from_events(
    ...     [{"event": "run_start", "run_id": "r1", "nodes": ["<b>a</b>"], "rounds": 1, "first_round": 1}])
    >>> page = build_report(record)
    >>> page.startswith("<!DOCTYPE html>"), "&lt;b&gt;a&lt;/b&gt;" in page, "<b>a</b>" in page
    (True, True, False)
    """
    plots = {name: plot(record) for name, plot in PLOTS.items()}
    title = escape(f"{record.plan_name or 'fedcare run'} – run report")
    body = "".join(
        (
            _header(record),
            _plan_section(record),
            _metrics_section(record),
            _plots_section(record, plots),
            _participation_section(record),
            _epsilon_section(record),
            _traffic_section(record),
        )
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def write_report(run_dir: str | Path, *, record: RunRecord | None = None) -> Path:
    """Build the report of a run directory and write it atomically to ``run_dir/report.html``.

    Parameters
    ----------
    run_dir : str or Path
        The run directory.
    record : RunRecord, optional
        The run, when the caller has folded it already; read from ``run_dir`` otherwise.

    Returns
    -------
    Path
        The report written.

    Raises
    ------
    DataError
        If the run directory or its ``metrics.jsonl`` is missing, or the log is
        malformed before its last line.

    Examples
    --------
    >>> import tempfile
    >>> from fedcare.federation.rundir import RunDirectory
    >>> run = RunDirectory(tempfile.mkdtemp())
    >>> run.log_event({"time": 0.0, "event": "run_start", "run_id": "r1", "nodes": ["a"], "rounds": 2, "first_round": 1})
    >>> write_report(run.path).name
    'report.html'
    """
    from fedcare.federation.rundir import atomic_write

    path = Path(run_dir)
    folded = record if record is not None else RunRecord.from_run_dir(path)
    target = path / "report.html"
    atomic_write(target, build_report(folded).encode("utf-8"))
    return target
