"""The federation: coordinator, nodes and the run directory."""

from fedcare.federation.coordinator import Coordinator, EvaluationSummary, RunResult
from fedcare.federation.node import Node, RefusingNode
from fedcare.federation.rundir import RunDirectory

__all__ = ["Coordinator", "EvaluationSummary", "Node", "RefusingNode", "RunDirectory", "RunResult"]
