"""The task registry: an object mapping task names to installed tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points

from fedcare.errors import ConfigError
from fedcare.tasks.base import Task

__all__ = ["ENTRY_POINT_GROUP", "TaskRegistry"]

#: Installed packages register tasks under this entry point group.
ENTRY_POINT_GROUP = "fedcare.tasks"

TaskFactory = Callable[[], Task]


class TaskRegistry:
    """Tasks a site or coordinator can run, by name.

    The registry is a plain object passed to whoever needs it; there is no
    global registry. Entry points are loaded only when their task is asked for.

    Parameters
    ----------
    factories : iterable of (str, callable)
        ``(name, factory)`` pairs; a factory returns a new :class:`Task`.

    Examples
    --------
    >>> from fedcare.tasks.tabular import LogisticTask
    >>> registry = TaskRegistry([("tabular-logistic", LogisticTask)])
    >>> registry.names()
    ['tabular-logistic']
    >>> registry.get("tabular-logistc")
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: plan.task: unknown task 'tabular-logistc'; installed tasks: tabular-logistic
    """

    def __init__(self, factories: Iterable[tuple[str, TaskFactory | EntryPoint]] = ()) -> None:
        self._factories: dict[str, TaskFactory | EntryPoint] = {}
        for name, factory in factories:
            self.register(name, factory)

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP) -> TaskRegistry:
        """Build a registry of every task installed under ``group``."""
        return cls((ep.name, ep) for ep in entry_points(group=group))

    def register(self, name: str, factory: TaskFactory | EntryPoint) -> None:
        """Add a task; a second task under the same name is refused.

        Raises
        ------
        ConfigError
            If ``name`` is already registered.
        """
        if name in self._factories:
            raise ConfigError(f"a task named {name!r} is already registered", field="task")
        self._factories[name] = factory

    def names(self) -> list[str]:
        """Registered task names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str) -> Task:
        """Return a new instance of the task registered as ``name``.

        Raises
        ------
        ConfigError
            If no task has that name; the message lists the installed ones.
        """
        try:
            factory = self._factories[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(
                f"unknown task {name!r}; installed tasks: {known}", field="plan.task"
            ) from None
        if isinstance(factory, EntryPoint):
            factory = factory.load()
        task = factory()
        if not isinstance(task, Task):
            raise ConfigError(f"task {name!r} does not implement fedcare.tasks.Task", field="plan.task")
        return task
