"""The run report: ``report.html`` in every run directory, and the plots the dashboard shows.

Fold a run's events with :class:`RunRecord`, draw its plots with the
functions of :data:`PLOTS`, and render one self-contained page with
:func:`build_report`; :func:`write_report` does all three for a run directory.

Examples
--------
>>> import tempfile
>>> from fedcare.federation.rundir import RunDirectory
>>> run = RunDirectory(tempfile.mkdtemp())
>>> run.log_event({"time": 0.0, "event": "run_start", "run_id": "r1", "nodes": ["a"], "rounds": 1, "first_round": 1})
>>> RunRecord.from_run_dir(run.path).status
'incomplete'
>>> sorted(PLOTS)
['epsilon', 'learning_curves', 'participation', 'roc', 'traffic']
"""

from fedcare.report.html import build_report, write_report
from fedcare.report.plots import PLOTS
from fedcare.report.record import PARTICIPATION_STATES, FinalEvaluation, Participation, Problem, RunRecord, RunStatus, Traffic

__all__ = [
    "PARTICIPATION_STATES",
    "PLOTS",
    "FinalEvaluation",
    "Participation",
    "Problem",
    "RunRecord",
    "RunStatus",
    "Traffic",
    "build_report",
    "write_report",
]
