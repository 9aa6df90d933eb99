"""Tasks: models and training recipes installed at each site, registered by name."""

from fedcare.tasks.base import DataSpec, SiteData, Split, Task, TrainHook, TrainResult
from fedcare.tasks.compute import ComputeSettings, TimeBudget
from fedcare.tasks.hooks import ControlVariateCorrection, ProximalTerm
from fedcare.tasks.registry import ENTRY_POINT_GROUP, TaskRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "ComputeSettings",
    "ControlVariateCorrection",
    "DataSpec",
    "ProximalTerm",
    "SiteData",
    "Split",
    "Task",
    "TaskRegistry",
    "TimeBudget",
    "TrainHook",
    "TrainResult",
]
