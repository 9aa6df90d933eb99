"""The live dashboard a coordinator serves during a run.

A read-only web page and a small JSON API: the nodes online and their answer
to the plan, the current round and phase, each site's metrics so far, the
privacy budget spent so far and plots of the run. Feed a :class:`LiveState`
from the coordinator's ``on_event`` and serve it with a
:class:`DashboardServer` (or do both with :func:`start_dashboard`). See
``docs/dashboard.md``.
"""

from fedcare.dashboard.server import (
    PLOT_NAMES,
    DashboardServer,
    dashboard_tls_context,
    is_loopback,
    new_token,
    parse_listen,
    start_dashboard,
)
from fedcare.dashboard.state import MAX_FAILURES, LiveState, Phase

__all__ = [
    "MAX_FAILURES",
    "PLOT_NAMES",
    "DashboardServer",
    "LiveState",
    "Phase",
    "dashboard_tls_context",
    "is_loopback",
    "new_token",
    "parse_listen",
    "start_dashboard",
]
