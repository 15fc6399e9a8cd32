"""ACDC circuit discovery on the per-head graph, accelerated by PAHQ."""

from .circuit import Circuit, CircuitEdge, RunStats
from .edges import Edge, EdgeGraph, Receiver, ReceiverKind, Sender
from .evaluation import Faithfulness, TaskCheck, WeakTaskError, check_task, evaluate_circuit
from .metrics import Metric
from .search import ReceiverDone, discover
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
    "TaskCheck",
    "WeakTaskError",
    "check_task",
    "discover",
    "evaluate_circuit",
]
