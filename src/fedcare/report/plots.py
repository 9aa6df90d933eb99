"""The report's plots, one function per plot, each ``(record) -> PNG bytes or None``.

Figures are drawn on :class:`matplotlib.figure.Figure` with the Agg canvas,
never through ``pyplot``: no global figure manager, so the live dashboard may
call these from several HTTP server threads at once. Colours come from the
Okabe-Ito palette, which stays distinguishable with the common forms of colour
blindness.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fedcare.metrics import ROC_FPR_GRID
from fedcare.report.record import PARTICIPATION_STATES, RunRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLOTS",
    "PALETTE",
    "PARTICIPATION_COLOURS",
    "epsilon_plot",
    "learning_curves_plot",
    "participation_plot",
    "roc_plot",
    "traffic_plot",
]

#: Okabe-Ito colours for sites, in order (black is kept for the mean of sites).
PALETTE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")

#: One colour per participation state.
PARTICIPATION_COLOURS: dict[str, str] = {
    "trained": "#009E73",
    "failed": "#D55E00",
    "late": "#E69F00",
    "not selected": "#E6E6E6",
    "refused": "#CC79A7",
    "pending": "#56B4E9",
}

#: Letters drawn in the participation grid, so no state is told by colour alone.
_MARKS = {"failed": "F", "late": "L", "refused": "R", "pending": "P"}

_LINESTYLES = ("-", "--", ":", "-.")
_DPI = 100
_METRIC_LABELS = {"accuracy": "accuracy", "c_index": "C-index"}


def _colour(index: int) -> str:
    """Colour of the ``index``-th site."""
    return PALETTE[index % len(PALETTE)]


def _dashes(index: int) -> str:
    """Line style of the ``index``-th site: solid for the first palette round, then dashed, ..."""
    return _LINESTYLES[(index // len(PALETTE)) % len(_LINESTYLES)]


def _integer_ticks(axes: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


_IMPORT_LOCK = threading.Lock()


def _load_matplotlib() -> None:
    """Import the parts of matplotlib the plots use, one thread at a time.

    Threads that import matplotlib's submodules for the first time at once
    (the dashboard's HTTP threads, when a browser asks for every plot as the
    page opens) can trip Python's import deadlock detection; the import that
    loses fails halfway, and matplotlib stays broken for the whole process
    (its ``cbook`` keeps the half-made package). Under the lock only one
    thread imports; afterwards each call only looks the modules up.
    """
    with _IMPORT_LOCK:
        import matplotlib.backends.backend_agg
        import matplotlib.colors
        import matplotlib.figure
        import matplotlib.patches
        import matplotlib.ticker  # noqa: F401


def _figure(width_in: float, height_in: float) -> Figure:
    _load_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    return figure


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # attaches itself to the figure: no pyplot, no global figure manager
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _finite(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def _legend(axes: Axes, count: int) -> None:
    axes.legend(fontsize="small", ncols=2 if count > 6 else 1, frameon=False)


def learning_curves_plot(record: RunRecord) -> bytes | None:
    """Global training loss per round, and the main metric per site and their mean.

    The main metric is accuracy, or the C-index for survival tasks
    (:attr:`RunRecord.main_metric`), over the evaluated rounds.

    Parameters
    ----------
    record : RunRecord

    Returns
    -------
    bytes or None
        A PNG; None when the log holds neither losses nor evaluations.

    Examples
    --------
    >>> record = RunRecord.from_events([
    ...     {"event": "round_end", "round": 1, "nodes_ok": ["a"], "train_loss": 0.7},
    ...     {"event": "evaluation", "round": 1, "sites": {"a": {"accuracy": 0.8}}, "mean": {"accuracy": 0.8}}])
    >>> learning_curves_plot(record)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    >>> learning_curves_plot(RunRecord.from_events([])) is None
    True
    """
    rounds = [r for r, loss in record.train_loss.items() if math.isfinite(loss)]
    metric = record.main_metric
    evaluated = sorted(record.evaluations)
    has_metric = any(math.isfinite(m.get(metric, math.nan)) for sites in record.evaluations.values() for m in sites.values())
    if not rounds and not has_metric:
        return None
    figure = _figure(9.0, 3.4)
    loss_axes, metric_axes = figure.subplots(1, 2)
    test_loss = any(math.isfinite(m.get("log_loss", math.nan)) for sites in record.evaluations.values() for m in sites.values())
    if rounds:
        loss_axes.plot(rounds, [record.train_loss[r] for r in rounds], marker="o", markersize=3, color="#000000")
        loss_axes.set_title("global training loss", fontsize="medium")
        loss_axes.set_ylabel("loss (example-weighted mean)")
    elif test_loss:
        # Under secure aggregation each site's training loss stays at the site: show the test loss instead.
        _per_site_lines(loss_axes, record, "log_loss", evaluated)
        loss_axes.set_title("test log loss per site (training loss stays at the sites)", fontsize="medium")
        loss_axes.set_ylabel("log loss")
    else:
        loss_axes.text(0.5, 0.5, "training loss not reported\n(secure aggregation keeps each\nsite's loss at the site)",
                       ha="center", va="center", transform=loss_axes.transAxes, color="#555555")  # fmt: skip
        loss_axes.set_xticks([])
        loss_axes.set_yticks([])
        loss_axes.set_title("global training loss", fontsize="medium")
        loss_axes.set_ylabel("loss (example-weighted mean)")
    loss_axes.set_xlabel("round")
    loss_axes.grid(alpha=0.3)
    label = _METRIC_LABELS.get(metric, metric)
    if has_metric:
        _per_site_lines(metric_axes, record, metric, evaluated)
        _legend(metric_axes, len(record.sites) + 1)
    metric_axes.set_title(f"{label} per site (test split)", fontsize="medium")
    metric_axes.set_xlabel("round")
    metric_axes.set_ylabel(f"{label} (0-1)")
    metric_axes.grid(alpha=0.3)
    for axes in (loss_axes, metric_axes):
        _integer_ticks(axes)
    return _png(figure)


def _per_site_lines(axes: Any, record: RunRecord, metric: str, evaluated: list[int]) -> None:
    """One line per site of ``metric`` over the evaluated rounds, and the mean of sites in black."""
    for index, site in enumerate(record.sites):
        points = [(r, record.evaluations[r][site].get(metric, math.nan)) for r in evaluated if site in record.evaluations[r]]
        points = [(r, v) for r, v in points if math.isfinite(v)]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=site, color=_colour(index), linestyle=_dashes(index))
    mean = [(r, record.evaluation_mean.get(r, {}).get(metric, math.nan)) for r in evaluated]
    mean = [(r, v) for r, v in mean if math.isfinite(v)]
    if mean:
        xs, ys = zip(*mean, strict=True)
        axes.plot(xs, ys, color="#000000", linewidth=2.2, label="mean of sites")


def roc_plot(record: RunRecord) -> bytes | None:
    """Each site's ROC curve at the final evaluation, with the chance diagonal.

    Parameters
    ----------
    record : RunRecord

    Returns
    -------
    bytes or None
        A PNG; None when no site reported a ROC curve (multiclass and survival tasks).

    Examples
    --------
    >>> roc_plot(RunRecord.from_events([])) is None
    True
    """
    final = record.final
    if final is None:
        return None
    curves = {site: tpr for site, tpr in final.roc.items() if _finite(tpr)}
    if not curves:
        return None
    figure = _figure(4.6, 4.2)
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="chance")
    order = {site: i for i, site in enumerate(record.sites)}
    for site in sorted(curves, key=lambda s: order.get(s, len(order))):
        points = [(f, t) for f, t in zip(ROC_FPR_GRID, curves[site], strict=True) if math.isfinite(t)]
        xs, ys = zip(*points, strict=True)
        auc = final.sites.get(site, {}).get("roc_auc", math.nan)
        name = f"{site} (AUC {auc:.2f})" if math.isfinite(auc) else site
        axes.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.3, label=name, color=_colour(order.get(site, 0)), linestyle=_dashes(order.get(site, 0)))
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_aspect("equal")
    axes.set_xlabel("false-positive rate (1 - specificity)")
    axes.set_ylabel("true-positive rate (sensitivity)")
    axes.set_title(f"ROC per site, round {final.round}", fontsize="medium")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", frameon=False, loc="lower right")
    return _png(figure)


def epsilon_plot(record: RunRecord) -> bytes | None:
    """Record-level epsilon spent by each site after each round, against the planned budget.

    With site-level DP, the federation's epsilon after each round is drawn too.

    Parameters
    ----------
    record : RunRecord

    Returns
    -------
    bytes or None
        A PNG; None when the run spent no epsilon (differential privacy off).

    Examples
    --------
    >>> epsilon_plot(RunRecord.from_events([])) is None
    True
    """
    series = {site: rounds for site, rounds in record.epsilon.items() if _finite(list(rounds.values()))}
    site_level = {r: v for r, v in record.site_level_epsilon.items() if math.isfinite(v)}
    if not series and not site_level:
        return None
    figure = _figure(6.0, 3.4)
    axes = figure.subplots()
    order = {site: i for i, site in enumerate(record.sites)}
    for site in sorted(series, key=lambda s: order.get(s, len(order))):
        points = [(r, v) for r, v in series[site].items() if math.isfinite(v)]
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=site, color=_colour(order.get(site, 0)), linestyle=_dashes(order.get(site, 0)))
    if site_level:
        axes.plot(list(site_level), list(site_level.values()), color="#000000", marker="s", markersize=3,
                  label="site-level (federation)")  # fmt: skip
    planned = record.planned_epsilon
    if planned is not None and series:
        axes.axhline(planned, color="#D55E00", linestyle="--", linewidth=1, label=f"planned budget ({planned:g})")
    axes.set_xlabel("round")
    axes.set_ylabel("epsilon spent (cumulative)")
    axes.set_title("privacy budget spent", fontsize="medium")
    axes.set_ylim(bottom=0)
    _integer_ticks(axes)
    axes.grid(alpha=0.3)
    _legend(axes, len(series) + 2)
    return _png(figure)


def participation_plot(record: RunRecord) -> bytes | None:
    """Which site did what in each round: a sites x rounds grid, one colour per state.

    Parameters
    ----------
    record : RunRecord

    Returns
    -------
    bytes or None
        A PNG; None before the first round started.

    Examples
    --------
    >>> participation_plot(RunRecord.from_events([])) is None
    True
    """
    if not record.participation or not record.sites:
        return None
    import numpy as np
    _load_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rounds = sorted(record.participation)
    sites = list(record.sites)
    index = {state: i for i, state in enumerate(PARTICIPATION_STATES)}
    grid = np.full((len(sites), len(rounds)), index["not selected"], dtype=np.int64)
    for column, number in enumerate(rounds):
        for row, site in enumerate(sites):
            grid[row, column] = index[record.participation[number].get(site, "not selected")]
    colours = ListedColormap([PARTICIPATION_COLOURS[s] for s in PARTICIPATION_STATES])
    width = min(11.0, 3.0 + 0.28 * len(rounds))
    figure = _figure(max(width, 6.0), 1.2 + 0.35 * len(sites))
    axes = figure.subplots()
    axes.imshow(grid, cmap=colours, vmin=-0.5, vmax=len(PARTICIPATION_STATES) - 0.5, aspect="auto", interpolation="nearest")
    axes.set_yticks(range(len(sites)), labels=sites)
    step = max(1, len(rounds) // 20)
    axes.set_xticks(range(0, len(rounds), step), labels=[str(r) for r in rounds[::step]])
    axes.set_xticks(np.arange(-0.5, len(rounds), 1), minor=True)
    axes.set_yticks(np.arange(-0.5, len(sites), 1), minor=True)
    axes.grid(which="minor", color="#FFFFFF", linewidth=1.5)
    axes.tick_params(which="minor", length=0)
    axes.set_xlabel("round")
    axes.set_title("participation", fontsize="medium")
    marked = len(rounds) <= 40  # a letter in each cell that is neither trained nor unselected, beside the colour
    if marked:
        for (row, column), value in np.ndenumerate(grid):
            mark = _MARKS.get(PARTICIPATION_STATES[value])
            if mark:
                axes.text(column, row, mark, ha="center", va="center", fontsize="small", color="#000000")
    shown = [s for s in PARTICIPATION_STATES if (grid == index[s]).any()]
    handles = [
        Patch(facecolor=PARTICIPATION_COLOURS[s], edgecolor="#777777",
              label=f"{s} ({_MARKS[s]})" if marked and s in _MARKS else s)
        for s in shown
    ]  # fmt: skip
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _png(figure)


def _bytes_per_round(record: RunRecord) -> tuple[list[int], list[int], list[int]]:
    rounds = sorted(record.traffic)
    down = [sum(t.down for t in record.traffic[r].values()) for r in rounds]
    up = [sum(t.up for t in record.traffic[r].values()) for r in rounds]
    return rounds, down, up


def traffic_plot(record: RunRecord) -> bytes | None:
    """Payload bytes sent to and received from the sites in each round (all sites together).

    Round 0 is the federated feature statistics; a round's evaluation counts
    toward it. The y axis is logarithmic when the rounds differ a hundredfold.

    Parameters
    ----------
    record : RunRecord

    Returns
    -------
    bytes or None
        A PNG; None when the log holds no byte counts.

    Examples
    --------
    >>> traffic_plot(RunRecord.from_events([])) is None
    True
    """
    rounds, down, up = _bytes_per_round(record)
    if not rounds or not any(down) and not any(up):
        return None
    import numpy as np

    figure = _figure(7.5, 3.4)
    axes = figure.subplots()
    x = np.arange(len(rounds))
    axes.bar(x - 0.2, down, width=0.4, color="#0072B2", label="to the sites (down)")
    axes.bar(x + 0.2, up, width=0.4, color="#E69F00", label="from the sites (up)")
    positive = [v for v in (*down, *up) if v > 0]
    if positive and max(positive) > 100 * min(positive):
        axes.set_yscale("log")
    step = max(1, len(rounds) // 20)
    axes.set_xticks(x[::step], labels=[str(r) for r in rounds[::step]])
    axes.set_xlabel("round (0: feature statistics)" if 0 in rounds else "round")
    axes.set_ylabel("payload (bytes)")
    axes.set_title("traffic per round, all sites", fontsize="medium")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _png(figure)


#: The report's plots by name, in the order the report shows them.
#: Read-only: a caller wanting other plots builds its own mapping.
PLOTS: Mapping[str, Callable[[RunRecord], bytes | None]] = MappingProxyType({
    "learning_curves": learning_curves_plot,
    "roc": roc_plot,
    "epsilon": epsilon_plot,
    "participation": participation_plot,
    "traffic": traffic_plot,
})
