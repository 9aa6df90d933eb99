"""What a site's machine gives to local training: the device, CPU threads and a time budget.

:class:`ComputeSettings` is ``compute:`` in a site's ``node.yaml``.
:func:`resolve_device` turns its ``device`` into a torch device string,
:func:`configure_threads` sizes torch's CPU threads once per process, and
:class:`TimeBudget` is the training hook that stops a round's local training
once its seconds are spent (:func:`time_budget_seconds` picks the budget from
the plan's and the site's). torch is imported only when a device is resolved
or threads are set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pydantic import BaseModel, ConfigDict, Field

from fedcare.errors import ConfigError
from fedcare.tasks.base import TrainHook

__all__ = ["ComputeSettings", "TimeBudget", "configure_threads", "resolve_device", "time_budget_seconds", "usable_cores"]

_FIELD = "node.compute"


class ComputeSettings(BaseModel):
    """What a site's machine can give to local training (``compute:`` in node.yaml).

    Examples
    --------
    >>> ComputeSettings().device
    'auto'
    >>> ComputeSettings(device="cuda:1", threads=4, max_local_seconds=30).max_local_seconds
    30.0
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``auto``: CUDA when present, otherwise the CPU with threads sized to the machine;
    #: or ``cpu``, ``cuda``, ``cuda:N``.
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    #: CPU threads for training; default: sized to the machine (its usable cores).
    threads: int | None = Field(default=None, ge=1)
    #: This site's own cap on one round's local training, in seconds; the lower of this and the
    #: plan's ``local.max_local_seconds`` applies.
    max_local_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)


def resolve_device(settings: ComputeSettings | None) -> str:
    """The torch device string local training runs on: ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` is ``cuda`` when ``torch.cuda.is_available()``, otherwise ``cpu``;
    ``None`` (no settings: simulations, tests) is ``cpu``, so results do not
    depend on the machine.

    Parameters
    ----------
    settings : ComputeSettings or None
        The site's ``compute:`` settings.

    Returns
    -------
    str
        The device.

    Raises
    ------
    ConfigError
        At ``node.compute.device`` if CUDA is asked for and this machine has no
        usable CUDA device, or ``cuda:N`` names a device it does not have.

    Examples
    --------
    >>> resolve_device(None), resolve_device(ComputeSettings(device="cpu"))
    ('cpu', 'cpu')
    >>> import torch
    >>> resolve_device(ComputeSettings()) == ("cuda" if torch.cuda.is_available() else "cpu")
    True
    """
    if settings is None or settings.device == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if settings.device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise ConfigError(
            f"{settings.device!r} was asked for, but this machine has no usable CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
            "set device: auto or cpu, or install a CUDA build of torch and its driver",
            field=f"{_FIELD}.device",
        )
    _, _, index = settings.device.partition(":")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise ConfigError(
            f"{settings.device!r} was asked for, but this machine has {count} CUDA device(s), "
            f"numbered 0 to {count - 1}",
            field=f"{_FIELD}.device",
        )
    return settings.device


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one, else ``os.cpu_count()``.

    Examples
    --------
    >>> usable_cores() >= 1
    True
    """
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(len(affinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def configure_threads(settings: ComputeSettings, *, device: str) -> int | None:
    """Set torch's CPU threads for this process: ``settings.threads``, or the usable cores on the CPU.

    ``torch.set_num_threads`` is process-wide, so a node calls this once, when
    it starts (:func:`~fedcare.deployment.run_node`), never per round; an
    in-process simulation, whose many nodes share one process, does not call it.
    On a CUDA device without ``threads`` set, torch's default is left alone.

    Parameters
    ----------
    settings : ComputeSettings
        The site's ``compute:`` settings.
    device : str
        The device :func:`resolve_device` gave.

    Returns
    -------
    int or None
        The number of threads set, or ``None`` if none was.

    Examples
    --------
    >>> import torch
    >>> before = torch.get_num_threads()
    >>> configure_threads(ComputeSettings(threads=1), device="cpu"), torch.get_num_threads()
    (1, 1)
    >>> configure_threads(ComputeSettings(), device="cuda") is None
    True
    >>> torch.set_num_threads(before)
    """
    if settings.threads is not None:
        threads = settings.threads
    elif device == "cpu":
        threads = usable_cores()
    else:
        return None
    import torch

    torch.set_num_threads(threads)
    return threads


def time_budget_seconds(plan_seconds: float | None, site_seconds: float | None) -> float | None:
    """One round's local time budget: the lower of the plan's and the site's, or ``None`` if neither is set.

    Examples
    --------
    >>> time_budget_seconds(60.0, None), time_budget_seconds(60.0, 20.0), time_budget_seconds(None, None)
    (60.0, 20.0, None)
    """
    budgets = [seconds for seconds in (plan_seconds, site_seconds) if seconds is not None]
    return min(budgets) if budgets else None


class TimeBudget(TrainHook):
    """Stops local training after the optimizer step during which ``seconds`` ran out.

    The clock starts when the hook is made, so make it just before training.
    Training always takes at least one step, and reports the steps it really
    took (:attr:`~fedcare.tasks.base.TrainResult.steps`), which the node
    accounts for (FedNova's normalization, DP-SGD's spend). The hook changes
    no loss and wraps nothing: within the budget, training is exactly what it
    is without it. Tasks that never ask :meth:`should_stop` train every
    planned step.

    Parameters
    ----------
    seconds : float
        The budget, in seconds (> 0).
    clock : callable
        Returns the time in seconds (default ``time.monotonic``).

    Attributes
    ----------
    stopped : bool
        Whether the budget ended training before its planned steps.

    Examples
    --------
    >>> ticks = iter(range(100))
    >>> budget = TimeBudget(2.5, clock=lambda: float(next(ticks)))  # starts at 0, one second a call
    >>> [budget.should_stop() for _ in range(3)], budget.stopped
    ([False, False, True], True)
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ConfigError(f"a time budget must be > 0 seconds, got {seconds}", field="plan.local.max_local_seconds")
        self.seconds = float(seconds)
        self.clock = clock
        self.stopped = False
        self._started = clock()

    @property
    def elapsed_s(self) -> float:
        """Seconds since the hook was made."""
        return self.clock() - self._started

    def should_stop(self) -> bool:
        if self.elapsed_s >= self.seconds:
            self.stopped = True
        return self.stopped
