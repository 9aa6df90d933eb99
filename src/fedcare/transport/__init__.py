"""Transports: how jobs and results move between the coordinator and the nodes."""

from fedcare.transport.base import NodeChannel, NodeRunner, Transport
from fedcare.transport.inproc import InProcTransport

__all__ = ["InProcTransport", "NodeChannel", "NodeRunner", "Transport"]
