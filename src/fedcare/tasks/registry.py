"""The task registry: an object mapping task names to installed tasks."""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TypeGuard, cast

from fedcare.errors import ConfigError
from fedcare.tasks.base import Task

__all__ = ["ENTRY_POINT_GROUP", "TaskInfo", "TaskRegistry", "code_sha256"]

#: Installed packages register tasks under this entry point group.
ENTRY_POINT_GROUP = "fedcare.tasks"

TaskFactory = Callable[[], Task]


@dataclass(frozen=True)
class TaskInfo:
    """What a site's policy pins of an installed task: name, version and the SHA-256 of its code."""

    name: str
    version: str
    sha256: str


def code_sha256(kind: type) -> str:
    """SHA-256 over the source files of ``kind`` and its non-standard-library base classes.

    Each file contributes its module name and the SHA-256 of its bytes, in
    sorted module order.
    """
    digests: dict[str, str] = {}
    for base in kind.__mro__:
        module = sys.modules.get(base.__module__)
        if module is None or base.__module__.split(".")[0] in sys.stdlib_module_names or base.__module__ == "builtins":
            continue
        source = inspect.getsourcefile(module)
        if source is None:
            continue
        digests[base.__module__] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    combined = hashlib.sha256()
    for module_name in sorted(digests):
        combined.update(f"{module_name}\x00{digests[module_name]}\n".encode())
    return combined.hexdigest()


def _is_entry_point(factory: object) -> TypeGuard[EntryPoint]:
    """Whether ``factory`` is an entry point still to load.

    Once the ``importlib_metadata`` backport is imported (MLflow imports it),
    ``entry_points()`` yields the backport's ``EntryPoint``, not the standard
    library's.
    """
    return isinstance(factory, EntryPoint) or type(factory).__name__ == "EntryPoint" and hasattr(factory, "load")


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

    def info(self, name: str) -> TaskInfo:
        """The installed task's name, version and code hash, as a site's policy pins them.

        ``sha256`` covers the source of every class the task inherits from
        outside the standard library (for a built-in imaging task:
        ``imaging.py``, ``torch_task.py`` and ``base.py``), so any change to
        the code a site runs changes it.

        Raises
        ------
        ConfigError
            If no task has that name.

        Examples
        --------
        >>> info = TaskRegistry.from_entry_points().info("tabular-logistic")
        >>> info.name, len(info.sha256)
        ('tabular-logistic', 64)
        """
        if name not in self._factories:
            self.get(name)  # raises, listing the installed tasks
        factory = self._factories[name]
        version = ""
        if _is_entry_point(factory):
            dist = factory.dist
            version = dist.version if dist is not None else ""
            factory = factory.load()
        kind = factory if isinstance(factory, type) else type(cast("TaskFactory", factory)())
        if not version:
            from fedcare import __version__

            version = __version__
        return TaskInfo(name=name, version=version, sha256=code_sha256(kind))

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
        if _is_entry_point(factory):
            factory = factory.load()
        task = cast("TaskFactory", factory)()
        if not isinstance(task, Task):
            raise ConfigError(f"task {name!r} does not implement fedcare.tasks.Task", field="plan.task")
        return task
