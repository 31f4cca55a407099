"""Checkpoints of a durable session: the worker's side (build after a call, restore before one).

A checkpoint is the session's state as one pickle, the *skeleton*, plus *blobs* held in numbered
slots (worker/checkpoint_pickler.py): the objects behind the session's refs (same ids), its
namespace module, the DSPy settings it configured (its LM, adapter, callbacks; not DSPy's
per-call ``trace``), its LM history, and its by-value code (dspex.wire.codestore: the objects under
the client's keys, one module per user module with its globals, the client's bindings, source
files). Everything goes by value with cloudpickle, so a DSPy module comes back with its demos,
signature, instructions and every attribute of its own (``dump_state`` would lose the fields'
types, the demos' values' types, the module's own attributes and its constructor arguments); the
signature classes DSPy makes go as their spec, rebuilt by DSPy's ``make_signature``.

:class:`Tracker` keeps, per session, what the broker already holds: a build pickles the skeleton
(the part that must be looked at every time; it excludes history entries and code, which are
slots), and sends nothing when its digest and the slots are unchanged (the fingerprint), else the
skeleton and only the new blobs. History entries are pickled once each, when they appear.

What cannot be pickled (an open file, a socket, a lock, a generator) is left out, per root (a
ref's object, a namespace name, a setting, a code object, a user module's global), and reported
once as :class:`NotDurable`; the checkpoint records why, so after a move that ref raises
``RefNotFound`` saying so (code the client sent is sent again: ``CodeCacheMiss``).

Skeleton frame: ``MAGIC``, format version (1 byte), header length (u32), msgpack header, pickle.
The header names the Python, cloudpickle and DSPy versions that wrote it (pickled code and DSPy
objects are only exact on the same ones), the session, the seed size and module slots, the
digest of the pickle and of the blob set: :func:`restore` refuses anything else with
``CheckpointRefused``.
"""

from __future__ import annotations

import heapq
import io
import struct
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import cloudpickle
import msgpack

from dspex.wire import byvalue, classes
from dspex.wire.sessiondir import FileData
from worker import checkpoint_pickler as cp
from worker import namespace
from worker.checkpoint_history import HistoryEntries
from worker.checkpoint_slots import (
    CODE,
    DYNAMIC_BASE,
    ENTRY,
    FILE,
    GLOBAL,
    MODULE,
    SIGNATURE,
    Slots,
)
from worker.refs import SessionState, type_name

MAGIC = b"DXCK"
FORMAT_VERSION = 1
HEAD = struct.Struct("<4sBI")
_MODULE_KEYS = frozenset({"__builtins__", "__name__", "__file__", "__doc__", "__loader__", "__spec__", "__package__"})
_TRANSIENT_SETTINGS = frozenset({"trace"})  # DSPy's per-call trace: rebuilt empty
LOST_MEMORY = 1000  # not-durable records carried from checkpoint to checkpoint
_GLOBALS_PER_BUILD = 64  # classes / functions by name a build notes for seeding
# what a restore puts in a namespace first, in this order (classes rank 1 whatever their metaclass)
_CODE_RANK = {types.ModuleType: 0, type: 1, types.FunctionType: 2, types.BuiltinFunctionType: 2}
DEFAULT_HISTORY_LIMIT = 200  # the worker's --lm-history default


T = TypeVar("T")

_versions: dict[str, str] = {}


def versions() -> dict[str, str]:
    """The versions a checkpoint is exact for (asked per build: computed once dspy is imported)."""
    if _versions.get("dspy"):
        return _versions
    dspy = sys.modules.get("dspy")
    found = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "cloudpickle": cloudpickle.__version__,
             "dspy": str(getattr(dspy, "__version__", "")) if dspy is not None else ""}
    if found["dspy"]:
        _versions.update(found)
    return found


@dataclass(frozen=True)
class NotDurable:
    """A root of the session that a checkpoint leaves out."""

    section: str  # "ref", "name" or "setting"
    key: str  # the ref id, the name, the setting's key
    type_name: str
    reason: str

    @property
    def what(self) -> str:
        if self.section == "ref":
            return f"ref {self.key[:8]}"
        return f"global {self.key}" if self.section == "global" else f"{self.section} {self.key!r}"

    def message(self) -> str:
        after = {"ref": "that ref raises RefNotFound", "name": "that name is unbound",
                 "setting": "that setting is unset", "global": "that global is unbound",
                 "code": "the client sends it again"}.get(self.section, "it is gone")
        return (f"{self.what} ({self.type_name}) is not durable: {self.reason}. It stays usable here; "
                f"after the session moves to another worker, {after}")


@dataclass
class Checkpoint:
    """One build's changes, in the order the broker applies them."""

    session: str
    seq: int
    skeleton: bytes
    set_slots: list[int]
    blobs: list[bytes]
    clear_slots: list[int]
    full: bool  # the broker drops every slot it holds for the session first
    size: int  # bytes the broker holds for the session once applied
    partial: bool = False  # it leaves out objects the session holds here (a move would lose them)

    def meta(self) -> dict[str, Any]:
        return {"session": self.session, "seq": self.seq, "set": self.set_slots, "clear": self.clear_slots,
                "full": self.full, "size": self.size, "partial": self.partial}


_SECTIONS = {"refs": "ref", "ns": "name", "settings": "setting", "code": "code", "globals": "global"}
SESSION_NS = "ns"  # the module slot of the session's own namespace (others: the code store's nsids)



def naming_unbound(state: SessionState, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, user code of ``state``: a NameError it meets for a name a move left unbound
    (it could not be pickled) gets a note saying so, as a ref left out says why in RefNotFound."""
    try:
        return fn(*args)
    except NameError as exc:
        _note_unbound(state, exc)
        namespace.note_unsent(state, exc)
        raise
    except AttributeError as exc:
        namespace.note_unsent(state, exc)
        raise


def _note_unbound(state: SessionState, exc: NameError) -> None:
    tracker = state.checkpoint
    tb = exc.__traceback__
    if tracker is None or tb is None or not exc.name:
        return
    while tb.tb_next is not None:
        tb = tb.tb_next
    scope = tb.tb_frame.f_globals
    session_module = state.module is not None and scope is state.module.__dict__
    why = tracker.left_out(exc.name, str(scope.get("__name__", "")), session_module)
    if why is not None:
        exc.add_note(f"dspex: {why.what} ({why.type_name}) was not durable ({why.reason}): it was left out "
                     "when the session moved to this worker")


def module_dicts(state: SessionState) -> dict[str, dict[str, Any]]:
    """Namespace id -> module dict of every module the session holds."""
    out = {nsid: mod.__dict__ for nsid, mod in state.code.modules.items()}
    if state.module is not None:
        out[SESSION_NS] = state.module.__dict__
    return out


def session_roots(state: SessionState, excluded: dict[int, tuple[Any, NotDurable]]) -> list[tuple[str, Any, Any]]:
    """(section, key, object) of everything the session holds, but what is ``excluded`` (not
    durable: id -> (the object, why))."""
    roots: list[tuple[str, Any, Any]] = [("refs", rid, obj) for rid, obj in list(state.refs.items())]
    module = state.module
    if module is not None:
        roots.extend(("ns", name, value) for name, value in list(module.__dict__.items())
                     if name not in _MODULE_KEYS)
    roots.extend(("settings", key, value) for key, value in list(state.dspy_settings.items())
                 if key not in _TRANSIENT_SETTINGS)
    code = state.code
    roots.extend(("code", key, obj) for key, obj in list(code.objects.items()))
    for nsid, mod in list(code.modules.items()):
        roots.extend(("globals", (nsid, name), value) for name, value in list(mod.__dict__.items())
                     if name != "__builtins__")
    if not excluded:
        return roots
    return [r for r in roots if id(r[2]) not in excluded or excluded[id(r[2])][0] is not r[2]]


def session_root(state: SessionState, roots: list[tuple[str, Any, Any]], lost: dict[str, NotDurable]) -> dict[str, Any]:
    """What a checkpoint's skeleton pickles: the ``roots`` by section, and what restores them
    (the session module's lines, the LM history, what was ``lost``, the code's bindings...)."""
    # "fill" first: the modules, classes and functions of each namespace are put in place
    # before anything else is loaded, so a __setstate__ or __reduce__ of the session's own
    # code that reads a global of its module finds it there
    root: dict[str, Any] = {"fill": [], "refs": {}, "ns": {}, "settings": {}, "code": {}, "globals": {}}
    code_like: dict[int, tuple[dict[str, Any], list[tuple[int, str, Any]]]] = {}
    for section, key, obj in roots:
        if section == "globals":
            root["globals"].setdefault(key[0], {})[key[1]] = obj
            target, name = state.code.modules[key[0]].__dict__, key[1]
        else:
            root[section][key] = obj
            if section != "ns" or state.module is None:
                continue
            target, name = state.module.__dict__, key
        rank = _CODE_RANK.get(type(obj))
        if rank is None and isinstance(obj, type):
            rank = 1
        if rank is not None:
            code_like.setdefault(id(target), (target, []))[1].append((rank, name, obj))
    root["fill"] = [cp.Fill(target, {name: obj for _rank, name, obj in sorted(items, key=lambda t: t[0])})
                    for target, items in code_like.values()]
    code = state.code
    root["ns_lines"] = namespace.session_lines(state) if state.module is not None else None
    root["history"] = state.lm_history
    root["lost"] = [(v.section, v.key, v.type_name, v.reason) for v in lost.values()]
    root["bound"] = code.bound
    root["versions"] = code.versions
    root["stamps"] = code.stamps
    root["sources"] = code.sources
    root["unsent"] = code.unsent
    root["class_files"] = {key: file for key, obj in code.objects.items()
                           if isinstance(obj, type) and (file := classes.class_file(obj)) is not None}
    return root


class Tracker:
    """What the broker holds of one durable session, and the builds that bring it up to date."""

    def __init__(self, session: str, history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        self.session = session
        self.history_limit = history_limit  # entries of each LM / module history a checkpoint keeps
        self.seq = 0
        self.slots = Slots()
        self.history = HistoryEntries(self.slots, add_blob=self._add_blob, drop=self._drop)
        self._last_digest = b""
        self._set: dict[int, bytes] = {}  # blob slots made since the last checkpoint sent
        self._clear: set[int] = set()  # slots the broker holds that are gone
        self._used: set[int] = set()  # dynamic slots (and inline objects) the pickle under way met
        self._inline: dict[int, Any] = {}  # code / signatures that cannot be blobs (written inline)
        self._excluded: dict[int, tuple[Any, NotDurable]] = {}  # id(root object) -> (it, why)
        self._lost: dict[str, NotDurable] = {}  # carried by every checkpoint (after a move too)
        self._modules: dict[str, int] = {}  # namespace id -> its module dict's slot
        self._new_globals: dict[int, Any] = {}  # classes / functions by name the last pickle met
        self._globals: dict[int, str] = {}  # seeded global slot -> "module:qualname"
        self._sent = False  # the broker holds a checkpoint of this tracker's (or the restored one)
        self._seed_size = 0

    # -- building ---------------------------------------------------------------------------
    def build(self, state: SessionState, *, full: bool = False) -> tuple[Checkpoint | None, list[NotDurable]]:
        """The checkpoint to send after a call (None: nothing changed) and what was newly found
        not durable. ``full``: the broker holds nothing usable of this session (after its own
        restart): everything is sent again. Raises what pickling raises when the session as a
        whole cannot be pickled though each of its roots can."""
        if full:
            self._resend_all()
        self._sync_modules(state)
        self.history.sync(state.lm_history)
        newly: list[NotDurable] = []
        try:
            data = self._pickle(state)
        except Exception:  # noqa: BLE001 - some root cannot be pickled: find which
            newly = self._find_not_durable(state, session_roots(state, self._excluded))
            data = self._pickle(state)
        if self._seed_globals():  # first met: pickled again with them seeded, as every later build will
            data = self._pickle(state)
        for i in [i for i in self.slots.dynamic if i not in self._used]:
            self._drop(i)  # code or a signature the session no longer holds
        for key in [k for k in self._inline if k not in self._used]:
            del self._inline[key]
        dig = cp.digest(data)
        if self._sent and not self._set and not self._clear and dig == self._last_digest:
            return None, newly
        frame = self._frame(data, dig)
        self.seq += 1
        self._last_digest = dig
        set_slots = sorted(self._set)
        checkpoint = Checkpoint(self.session, self.seq, frame, set_slots, [self._set[i] for i in set_slots],
                                sorted(self._clear), not self._sent, len(frame) + self.slots.blob_bytes,
                                bool(self._excluded))
        self._set.clear()
        self._clear.clear()
        self._sent = True
        return checkpoint, newly

    def _seed_globals(self) -> bool:
        """Classes and functions the pickle wrote by name become seeded slots (a restore imports
        them by that name): the next pickles refer to them without a Python call. True if any
        did."""
        before = len(self._globals)
        for obj in self._new_globals.values():
            name = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"
            try:
                found = byvalue.resolve_name(name)
            except Exception:  # noqa: BLE001 - not importable by this name after all: pickled as before
                found = None
            if found is obj:
                self._globals[self.slots.alloc(obj, GLOBAL)] = name
        self._new_globals.clear()
        return len(self._globals) > before

    def _resend_all(self) -> None:
        self._clear.clear()
        self._set.clear()
        self._sent = False
        self._last_digest = b""
        for i in list(self.slots.blobs):
            try:  # pickled again, its size may differ: the size a checkpoint claims counts the new one
                self._add_blob(i, cp.dumps_blob(self.slots.objects[i]))
            except Exception:  # noqa: BLE001 - it pickled before; if it no longer does, it goes inline
                obj = self.slots.objects[i]
                if self.slots.kinds[i] == ENTRY:
                    self.history.entries.pop(id(obj), None)
                    self.history.inline[id(obj)] = obj
                self.slots.clear(i)
                self._set.pop(i, None)

    def _drop(self, i: int) -> None:
        if i in self.slots.blobs and self._set.pop(i, None) is None:
            self._clear.add(i)  # the broker holds it
        self.slots.clear(i)

    def _sync_modules(self, state: SessionState) -> None:
        """A slot per module dict of the session: its namespace and its code's modules."""
        wanted = module_dicts(state)
        for nsid, i in list(self._modules.items()):
            if wanted.get(nsid) is not self.slots.objects[i]:
                self.slots.clear(i)
                del self._modules[nsid]
        for nsid, namespace_ in wanted.items():
            if nsid not in self._modules:
                self._modules[nsid] = self.slots.alloc(namespace_, MODULE)


    def _add_blob(self, i: int, blob: bytes) -> None:
        self.slots.set_blob(i, blob)
        self._set[i] = blob
        self._clear.discard(i)

    def _slot_for(self, obj: Any, kind: str) -> int | None:
        """The blob slot of a code object or signature class the pickler met (None: inline); a
        class or function importable by name (``kind`` global) is noted, to be seeded from the
        next build on (it has no blob: a restore imports it)."""
        if kind == GLOBAL:
            if id(obj) not in self.slots.of and len(self._new_globals) < _GLOBALS_PER_BUILD:
                self._new_globals[id(obj)] = obj
            return None
        slots = self.slots
        i = slots.of.get(id(obj))
        if i is not None and slots.kinds[i] == kind:
            if kind != SIGNATURE or slots.versions.get(i) == cp.signature_version(obj):
                self._used.add(i)
                return i
            self._drop(i)  # changed in place (instructions, a prefix): a new blob
        if id(obj) in self._inline:
            self._used.add(id(obj))
            return None
        try:
            blob = cp.dumps_blob(obj)
        except Exception:  # noqa: BLE001 - needs the session's own classes (or fails: inline names the root)
            self._inline[id(obj)] = obj
            self._used.add(id(obj))
            return None
        i = slots.alloc(obj, kind)
        if kind == SIGNATURE:
            slots.versions[i] = cp.signature_version(obj)
        self._add_blob(i, blob)
        self._used.add(i)
        return i

    def _module_dicts(self) -> dict[int, dict[str, Any]]:
        return {id(self.slots.objects[i]): self.slots.objects[i] for i in self._modules.values()}

    def _pickle(self, state: SessionState) -> bytes:
        """The skeleton: the session but what is excluded, which goes with the lost."""
        lost = dict(self._lost)
        for _obj, why in self._excluded.values():
            lost[why.what] = why
        root = session_root(state, session_roots(state, self._excluded), lost)
        self._used.clear()
        buf = io.BytesIO()
        self._seed_size = self.slots.seed_size
        cp.SkeletonPickler(buf, self.slots.seed, self._module_dicts(), self._slot_for, self.history_limit,
                           root["history"]).dump(root)
        return buf.getvalue()

    def _find_not_durable(self, state: SessionState, roots: list[tuple[str, Any, Any]]) -> list[NotDurable]:
        """Pickle each root alone; exclude those that fail. Only after a whole build failed."""
        module_dicts = self._module_dicts()

        def dump(obj: Any) -> None:
            cp.SkeletonPickler(io.BytesIO(), self.slots.seed, module_dicts, self._slot_for, self.history_limit).dump(obj)

        newly = []
        for section, key, obj in roots:
            try:
                dump(obj)
            except Exception as exc:  # noqa: BLE001 - any failure to pickle is the reason
                label = f"{key[1]} of {state.code.modules[key[0]].__name__}" if section == "globals" else str(key)
                reason = f"{type(exc).__name__}: {exc}{_where(obj, dump)}"
                why = NotDurable(_SECTIONS[section], label, type_name(obj), reason[:500])
                self._excluded[id(obj)] = (obj, why)
                newly.append(why)
        return newly

    def _frame(self, data: bytes, dig: bytes) -> bytes:
        modules = [[i, nsid, self.slots.objects[i].get("__name__")] for nsid, i in self._modules.items()]
        modules.extend([i, "global", name] for i, name in self._globals.items())
        header: bytes = msgpack.packb({**versions(), "session": self.session, "seed": self._seed_size,
                                "modules": modules, "digest": dig,
                                "blobs": [len(self.slots.blobs), self.slots.set_digest()]})
        return HEAD.pack(MAGIC, FORMAT_VERSION, len(header)) + header + data

    def released(self, objects: list[Any]) -> None:
        """Objects released from the session: their not-durable records go."""
        for obj in objects:
            held = self._excluded.get(id(obj))
            if held is not None and held[0] is obj:
                del self._excluded[id(obj)]

    def left_out(self, name: str, module_name: str, session_module: bool) -> NotDurable | None:
        """The record of ``name`` of the module ``module_name`` (the session's namespace when
        ``session_module``) if a move left it unbound: a NameError for it says why."""
        return self._lost.get(f"name {name!r}" if session_module else f"global {name} of {module_name}")

    @classmethod
    def adopt(cls, state: SessionState, objects: dict[int, Any], module_slots: dict[int, tuple[str, str]],
              held: dict[int, bytes | memoryview], seq: int, lost: list[NotDurable],
              history_limit: int) -> Tracker:
        """The tracker of a restored session (worker/checkpoint_restore.py): the broker holds
        exactly what it sent, so the next build sends only what the next call changes."""
        tracker = cls(state.id, history_limit)
        tracker.seq = seq
        tracker._sent = True
        for why in lost:
            tracker._lost[why.what] = why
        table = tracker.slots
        seeded = [i for i in (*held, *module_slots) if i < DYNAMIC_BASE]
        for _ in range(max(seeded, default=-1) + 1):
            table.grow()
        for i, data in held.items():
            obj = objects[i]
            kind = (ENTRY if i < DYNAMIC_BASE else CODE if isinstance(obj, types.CodeType)
                    else FILE if isinstance(obj, FileData) else SIGNATURE)
            table.put(i, obj, kind)
            table.set_blob(i, data)
            if kind == ENTRY:
                tracker.history.entries[id(obj)] = i
            elif kind == SIGNATURE:
                table.versions[i] = cp.signature_version(obj)
        dicts = module_dicts(state)
        for i, (nsid, name) in module_slots.items():
            if nsid == "global":
                table.put(i, byvalue.resolve_name(name), GLOBAL)
                tracker._globals[i] = name
            elif nsid in dicts:
                table.put(i, dicts[nsid], MODULE)
                tracker._modules[nsid] = i
        table.free = [i for i in range(table.seed_size) if i not in table.objects]
        dynamic = [i for i in held if i >= DYNAMIC_BASE]
        table.next_dynamic = max(dynamic, default=DYNAMIC_BASE - 1) + 1
        table.free_dynamic = [i for i in range(DYNAMIC_BASE, table.next_dynamic) if i not in table.objects]
        heapq.heapify(table.free)
        return tracker


def _where(obj: Any, dump: Callable[[Any], None]) -> str:
    """Where inside ``obj`` the part is that fails to pickle alone (`` at ._loop (an asyncio
    event loop's type)``), for a reason that names it: the error pickle gives names only the
    innermost type (``'_contextvars.Context'``). Parts of the standard library's objects are
    not looked into (their privates say nothing to a user). Only after a root failed."""
    path = ""
    for _ in range(4):
        for label, part in _parts(obj):
            try:
                dump(part)
            except Exception:  # noqa: BLE001 - this part is (or holds) what fails
                path, obj = path + label, part
                break
        else:
            break
        module = type(obj).__module__.partition(".")[0]
        if not isinstance(obj, (dict, list, tuple)) and module in sys.stdlib_module_names:
            break
    return f" at {path} ({type_name(obj)})" if path else ""


def _parts(obj: Any) -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in list(obj.items())[:200]]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj[:200])]
    attributes = getattr(obj, "__dict__", None)
    return [(f".{k}", v) for k, v in list(attributes.items())[:200]] if isinstance(attributes, dict) else []
