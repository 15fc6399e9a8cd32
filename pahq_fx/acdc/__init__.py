"""ACDC circuit discovery on the per-head graph, accelerated by PAHQ."""

from .circuit import Circuit, CircuitEdge, RunStats
from .edges import Edge, EdgeGraph, Receiver, ReceiverKind, Sender
from .metrics import Metric
from .search import Faithfulness, ReceiverDone, discover, evaluate_circuit
from .task import Task

__all__ = [
    "Circuit",
    "CircuitEdge",
    "Edge",
    "EdgeGraph",
    "Faithfulness",
    "Metric",
    "Receiver",
    "ReceiverDone",
    "ReceiverKind",
    "RunStats",
    "Sender",
    "Task",
    "discover",
    "evaluate_circuit",
]
