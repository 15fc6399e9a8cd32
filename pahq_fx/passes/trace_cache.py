"""A disk cache of traced graphs: a process that traces a model traced before (same modeling code, config, parameter
layout, example shape and library versions) skips ``torch.export``, which is most of a run's setup on small models
and more on models whose recurrences the export unrolls (docs/performance.md, where a first discovery's setup goes).

A traced graph does not depend on the weights' values (the export runs on fake tensors), so an entry holds the graph
node by node, its own constants, and the model's parameters and buffers by name only; loading binds them to the model
at hand. The trace uses an entry only after it reproduces the model's own logits on the example; anything else (a
missing, unreadable or stale entry) reads as a miss and the model is traced afresh. Only Hugging Face-style models (a config
that serialises itself) without hooks or an instance-level ``forward`` are cached: for other modules the key could
not see everything the graph depends on.

``PAHQ_FX_TRACE_CACHE``: the cache directory (default ``$XDG_CACHE_HOME/pahq_fx/traces``, else
``~/.cache/pahq_fx/traces``), or ``off``.

An entry holds pickled objects (the graph's code generator among them), and unpickling can run code. So the cache
runs nothing it did not write: every entry carries an HMAC-SHA256 of its name and content under a secret key of
the user's own (``PAHQ_FX_TRACE_KEY``, default ``$XDG_CONFIG_HOME/pahq_fx/trace_cache.key``, else
``~/.config/pahq_fx/trace_cache.key``; 32 random bytes, mode 0600, created on first use), and an entry whose HMAC
does not verify is never unpickled: it is set aside as ``<entry>.pt.rejected``, a warning names it, and the model
is traced afresh. The directory is created with mode 0700; a directory (or key) that belongs to another user or
that others can write is not used at all (a warning, and every trace is cold).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import io
import json
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..atomic import write_bytes
from ..ir.graph_utils import attribute

ENV = "PAHQ_FX_TRACE_CACHE"
KEY_ENV = "PAHQ_FX_TRACE_KEY"
# The entry format. Entries pickle this module's classes by path (pahq_fx.passes.trace_cache since format 3), and
# the format is part of every key, so an entry of an older format is never looked up.
_MAGIC = b"pahq_fx trace cache entry/3\n"
_MAC_BYTES = 32
_warned: set[str] = set()


def cache_dir() -> Path | None:
    """Where entries live, or None when the cache is off."""
    setting = os.environ.get(ENV, "")
    if setting.lower() in {"off", "0", "false", "no"}:
        return None
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pahq_fx" / "traces"


def key_path() -> Path:
    """The file of the user's secret key that authenticates entries."""
    setting = os.environ.get(KEY_ENV, "")
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "pahq_fx" / "trace_cache.key"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


def _private(path: Path, what: str) -> bool:
    """Whether ``path`` (an existing file or folder) is this user's and writable by nobody else; warns once if not."""
    if not hasattr(os, "getuid"):  # no owners to check (Windows): the folder's own permissions decide
        return True
    info = os.stat(path)
    problem = (
        f"belongs to another user (uid {info.st_uid})"
        if info.st_uid != os.getuid()
        else "is writable by other users"
        if info.st_mode & 0o022
        else ""
    )
    if problem:
        _warn_once(
            f"pahq_fx: the trace cache's {what} {path} {problem}, so the cache is not used and every model is "
            f"traced afresh; point {ENV} at a folder of your own, or set it to 'off'"
        )
    return not problem


def _usable_dir() -> Path | None:
    """The cache directory, created with mode 0700, when it is this user's own; None when off or not private."""
    directory = cache_dir()
    if directory is None:
        return None
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return directory if directory.is_dir() and _private(directory, "folder") else None
    except OSError:
        return None


def _secret() -> bytes | None:
    """The user's key (made on first use), or None where it cannot be made or is not private."""
    path = key_path()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(handle, "wb") as file:
                file.write(secrets.token_bytes(32))
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(handle, "rb") as file:
            if hasattr(os, "getuid"):
                info = os.fstat(file.fileno())
                if info.st_uid != os.getuid() or info.st_mode & 0o077:
                    _warn_once(
                        f"pahq_fx: the trace cache's key {path} is not private to this user (it must be "
                        "yours with mode 0600), so the cache is not used; delete it to make a new one"
                    )
                    return None
            key = file.read()
    except OSError:
        return None
    return key if len(key) >= 32 else None


def _mac(secret: bytes, entry: str, payload: bytes) -> bytes:
    return hmac.new(secret, entry.encode() + b"\0" + payload, hashlib.sha256).digest()


def _cacheable(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if not hasattr(config, "to_json_string"):
        return False
    hooks = torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
    return not hooks and not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.modules())


def _source_digest(cls: type) -> str:
    """The source files of the model's class and its bases, and of the trace and this cache: edited modeling code,
    or a change to what the trace does or what an entry holds, is a new key."""
    digest = hashlib.sha256()
    for module in ("trace_cache.py", "trace.py", "causal_attention.py"):
        digest.update(Path(__file__).with_name(module).read_bytes())
    for base in cls.__mro__:
        try:
            source = inspect.getsourcefile(base)
            if source is None:
                raise OSError(f"no source file for {base.__qualname__}")
            digest.update(Path(source).read_bytes())
        except (TypeError, OSError):  # a builtin base, or a class defined in a notebook: named by its qualname only
            digest.update(base.__qualname__.encode())
    return digest.hexdigest()


def key(model: nn.Module, example: torch.Tensor, dynamic: tuple[int, ...]) -> str | None:
    """The entry's name for this model, example and trace mode; None where the model is not cached."""
    if cache_dir() is None or not _cacheable(model) or _usable_dir() is None:
        return None
    import transformers

    from .. import __version__

    holders = _first_holders(model)  # tied weights name their first holder
    layout = [
        (name, tuple(t.shape), str(t.dtype), str(t.device), holders[t.untyped_storage().data_ptr()])
        for name, t in _named_tensors(model)
    ]
    config = model.config
    parts = [
        _MAGIC,
        __version__,
        torch.__version__,
        transformers.__version__,
        type(model).__module__,
        type(model).__qualname__,
        _source_digest(type(model)),
        _config_fields(config),
        getattr(config, "_attn_implementation", None),
        layout,
        tuple(example.shape),
        str(example.dtype),
        str(example.device),
        dynamic,
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _config_fields(config: Any) -> str:
    """The config as the key sees it: every field but the folder it was loaded from, which the trace does not depend
    on. So the checkpoints of one training run, saved in folders of their own, share one entry."""
    fields = json.loads(config.to_json_string(use_diff=False))
    fields.pop("_name_or_path", None)
    return json.dumps(fields, sort_keys=True)


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` under every name it has (tied weights under each)."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _first_holders(model: nn.Module) -> dict[int, str]:
    """The first name of each of ``model``'s storages."""
    return {t.untyped_storage().data_ptr(): name for name, t in reversed(_named_tensors(model))}


@dataclass(frozen=True)
class _NodeRef:
    name: str


@dataclass(frozen=True)
class _OpRef:
    """An ATen operator overload by name (the overload objects themselves do not pickle)."""

    namespace: str
    name: str
    overload: str

    def resolve(self) -> torch._ops.OpOverload:
        return getattr(getattr(getattr(torch.ops, self.namespace), self.name), self.overload)


def _portable_target(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target._schema.name.split("::")
        return _OpRef(namespace, name, target._overloadname)
    return target


def _node_ref(node: fx.Node) -> Any:
    """A node as a record names it (typed Any: fx types what ``map_arg`` returns as graph arguments)."""
    return _NodeRef(node.name)


def _graph_records(graph: fx.Graph) -> list[tuple]:
    """The graph node by node, nodes named rather than referenced: exactly the graph, rebuilt by :func:`_graph_of`
    (FX's own pickling re-traces the generated code instead, which folds every computation that does not depend on
    the input into a constant: a different graph)."""
    return [
        (
            n.op,
            n.name,
            _portable_target(n.target),
            fx.node.map_arg(n.args, _node_ref),
            fx.node.map_arg(n.kwargs, _node_ref),
        )
        for n in graph.nodes
    ]


def _graph_of(records: list[tuple], codegen: Any) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}

    def node_of(value: Any) -> Any:
        return nodes[value.name] if isinstance(value, _NodeRef) else value

    for op, name, target, args, kwargs in records:
        target = target.resolve() if isinstance(target, _OpRef) else target
        args, kwargs = fx.node.map_aggregate((args, kwargs), node_of)
        nodes[name] = graph.create_node(op, target, args, kwargs, name=name)
    graph._codegen = codegen
    return graph


def store(gm: fx.GraphModule, model: nn.Module, entry: str, dynamic: tuple[int, ...]) -> None:
    """Write ``gm`` (a traced graph of ``model``) as ``entry``, signed with the user's key; a graph that cannot be
    written is simply not cached."""
    directory, secret = _usable_dir(), _secret()
    if directory is None or secret is None:
        return
    owners = _first_holders(model)
    tensors = {n.target: attribute(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    aliases = {
        t: owners[v.untyped_storage().data_ptr()]
        for t, v in tensors.items()
        if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() in owners
    }
    constants = {t: v for t, v in tensors.items() if t not in aliases}
    buffer = io.BytesIO()
    try:
        torch.save(
            {
                "graph": _graph_records(gm.graph),
                "codegen": gm.graph._codegen,
                "aliases": aliases,
                "constants": constants,
                "dynamic": dynamic,
            },
            buffer,
        )
        payload = buffer.getvalue()
        write_bytes(directory / f"{entry}.pt", _MAGIC + _mac(secret, entry, payload) + payload, mode=0o600)
    # Any exception: pickling a graph runs the __reduce__ of whatever the model's trace holds (constants, codegen).
    # The graph is then not cached, and the warning says why.
    except Exception as error:
        _warn_once(f"pahq_fx: trace cache: the trace of {type(model).__name__} was not cached ({type(error).__name__}: {error})")


def load(model: nn.Module, example: torch.Tensor, entry: str) -> tuple[fx.GraphModule, tuple[int, ...]] | None:
    """(graph, dynamic dimensions) of ``entry`` bound to ``model``'s tensors (on ``example``'s device), if it exists,
    was written by this user's pahq_fx (its HMAC verifies: nothing else is unpickled) and reads; None otherwise. The
    caller checks the graph against the model before using it."""
    directory = _usable_dir()
    path = None if directory is None else directory / f"{entry}.pt"
    if path is None or not path.exists():
        return None
    secret = _secret()
    if secret is None:
        return None
    try:
        content = path.read_bytes()
    except OSError:
        return None
    header = len(_MAGIC) + _MAC_BYTES
    payload = content[header:]
    if not (
        content.startswith(_MAGIC)
        and len(content) > header
        and hmac.compare_digest(content[len(_MAGIC) : header], _mac(secret, entry, payload))
    ):
        _reject(path)
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = torch.load(io.BytesIO(payload), map_location=example.device, weights_only=False)
        tensors = dict(_named_tensors(model))
        root = {**saved["constants"], **{t: tensors[name] for t, name in saved["aliases"].items()}}
        return fx.GraphModule(root, _graph_of(saved["graph"], saved["codegen"])), tuple(saved["dynamic"])
    # Any exception: unpickling an entry runs the __setstate__ of what it holds (signed by this user, so never foreign).
    # It is then a miss, the model is traced afresh, and the warning says why.
    except Exception as error:
        _warn_once(f"pahq_fx: trace cache: entry {entry} could not be loaded ({type(error).__name__}: {error}); tracing afresh")
        return None


def _reject(path: Path) -> None:
    """Set aside an entry that this user's pahq_fx did not write (never unpickled), and say so."""
    aside, earlier = path.with_name(path.name + ".rejected"), 0
    while aside.exists():  # an earlier planted entry stays evidence too
        earlier += 1
        aside = path.with_name(f"{path.name}.rejected.{earlier}")
    try:
        os.replace(path, aside)
    except OSError:
        aside = path
    _warn_once(
        f"pahq_fx: ignored the trace cache entry {path}: it was not written by your pahq_fx (its signature does "
        f"not verify), so it was not loaded; it is kept as {aside} for inspection, and the model is traced afresh"
    )
