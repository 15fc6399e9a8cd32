"""ACDC circuit discovery on the per-head graph, accelerated by PAHQ."""

from ..metrics import Metric
from .circuit import Circuit, CircuitEdge, RunStats
from .eap import load_circuit
from .edges import Edge, EdgeGraph, Receiver, ReceiverKind, Sender
from .evaluation import Faithfulness, TaskCheck, WeakTaskError, check_task, evaluate_circuit
from .roc import RocPoint, roc_auc, roc_point
from .search import ReceiverDone, discover
from .sweep import Sweep, SweepPoint, sweep
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
    "RocPoint",
    "RunStats",
    "Sender",
    "Sweep",
    "SweepPoint",
    "Task",
    "TaskCheck",
    "WeakTaskError",
    "check_task",
    "discover",
    "evaluate_circuit",
    "load_circuit",
    "roc_auc",
    "roc_point",
    "sweep",
]
