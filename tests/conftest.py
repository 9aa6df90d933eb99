"""Settings for the whole test session.

``make test`` runs the suite in two passes: first every test that is not
``serial``, on one worker process per core (pytest-xdist, one test file per
worker at a time, so a module's fixtures are built once), then the ``serial``
tests one after another with the machine to themselves. Serial are the tests
that start real deployments (a coordinator and nodes as processes), drive a
browser or Ray, or whose assertions depend on wall-clock time (deadlines,
heartbeats, throttled links, time budgets, "takes at most" ratios): sharing
the cores with another test could make them late for reasons of the test
machine, not of fedcare. A plain ``pytest`` runs everything in one process.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

#: Test files and folders (relative to the repository root) whose tests are marked ``serial``.
SERIAL: tuple[str, ...] = (
    "tests/browser/",
    "tests/dashboard/",
    "tests/deployment/",
    "tests/faults/",
    "tests/load/",
    "tests/scale/",
    "tests/transport/",
    "tests/federation/test_buffered.py",
    "tests/federation/test_coordinator.py",
    "tests/report/test_real_runs.py",
    "tests/robustness/test_bad_input_federation.py",
    "tests/robustness/test_bad_input_grpc.py",
    "tests/test_benchmark_tasks.py",
    "tests/test_cli.py",
    "tests/test_cli_modes.py",
    "tests/test_cli_report_dashboard.py",
    "tests/test_compute.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath
    for item in items:
        try:
            where = item.path.relative_to(root).as_posix()
        except ValueError:  # outside the repository: nothing of ours
            continue
        if where.startswith(SERIAL):
            item.add_marker(pytest.mark.serial)


@pytest.fixture
def console_columns(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Set the width the CLI's Rich consoles draw at (``COLUMNS`` is read when they are created).

    The consoles are module globals, made when their module is first imported:
    an ``env={"COLUMNS": ...}`` given to ``CliRunner.invoke`` reaches them only
    if nothing imported the module before, which depends on test order.
    """
    from fedcare import cli_audit, cli_common, cli_data

    def set_columns(columns: int) -> None:
        for console in (cli_common.console, cli_audit._console, cli_data._console):
            monkeypatch.setattr(console, "width", columns)

    return set_columns
