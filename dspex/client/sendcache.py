"""What one session's worker already holds of this client's code and values (the sender's side).

A session sends a by-value function, class, module global or big closure value the first time a
request uses it and its key after that (:mod:`dspex.client.sessionpickle` writes the pickles, the
worker keeps them in its :class:`dspex.wire.codestore.CodeStore`). This object remembers, per session:

- a key for each object named to the worker, by identity (a strong reference keeps the id
  valid), and code objects by content hash;
- which keys the worker holds, least recently used first;
- for each module global the session's functions read, the client object bound there when it was
  last sent: an unchanged binding is not sent again, a rebound one (a new object) is;
- which source files went with the code (``inspect.getsource`` on the worker);
- the closure cells of the functions it sent (:mod:`dspex.client.sentcells`).

Module globals that were sent are the module state of the session: they stay as long as the
binding does. Everything else (functions and classes not bound as globals, lambdas, big closure
values, code objects) is a cache of at most ``max_entries`` keys: past it the least recently used
are forgotten on both sides (the next request tells the worker) and sent again in full when used
again — a function or class sent again is a new object on the worker.

Which worker runs a call is not known when it is encoded: a ``hint`` session's call runs on
another worker when its own is busy, and later ones on either. What the client took as held may
then hold on the other worker only (a global rebound by a call that ran there). Each change of a
binding gets the next number of the session's binding *version*; a request that relies on held
bindings says the version of the session's bindings it does not carry (:meth:`SendCache.commit`),
and the worker's store refuses it as a miss unless it holds every binding up to that version
(``dspex.wire.codestore.check_held``). The miss says the version the store holds; the request
goes again in full with every binding changed since (:meth:`SendCache.changed_since`), which
brings the store up to date: a worker behind is refused once per change, whichever global its
call reads.

A worker that lacks a key (evicted, a re-pinned ``hint`` session, a restarted worker, a ``none``
pool) answers :class:`dspex.wire.errors.CodeCacheMiss` without running anything; :meth:`missed` then
forgets what was sent and the request goes again in full, once. A miss from a ``none`` pool
(``ephemeral``) turns the cache off for the session: every request is sent in full.
"""

from __future__ import annotations

import contextvars
import itertools
import secrets
import sys
import threading
import types
from collections import OrderedDict
from typing import Any, Protocol

from dspex.client import processwide
from dspex.client.config import DEFAULT_CODE_CACHE
from dspex.client.dspycontext import CALL_LOCAL as _CALL_LOCAL
from dspex.client.dspycontext import SETTINGS as _SETTINGS
from dspex.client.dspycontext import names as _names
from dspex.client.sentcells import CellSent, SentCells

_PINNED_FOREVER = 1 << 30  # namespaces: their key is their module state's identity

_ATOMS = (type(None), bool, int, float, str)


# what a committed request sent that the worker has it only once the request reaches it: its
# bindings ((namespace, name), key) and the keys it told the worker to drop (SendCache.confirm)
Receipt = tuple[tuple[tuple[tuple[str, str], str], ...], tuple[str, ...]]

# the client settings a request sent, by key only: (their (name, id, state) signature, the ext
# sent, the keys it refers to, the values: kept so their ids stay valid)
SettingsSent = tuple[tuple[tuple[str, int, Any], ...], Any, tuple[str, ...], dict[str, Any]]
# a client setting whose state a request sends (dspex.client.sendsettings): (the object, the key
# the request sends it under, the key the worker holds it under when the request sends a change
# made in place since, else None, its state)
Restated = tuple[Any, str, str | None, Any]


class Walk:
    """What :meth:`dspex.client.bindings.Bindings.walk` read for a root: kept per session to check the next request."""

    __slots__ = ("cells", "codes", "reached", "reads", "root", "sizes")

    def __init__(self, root: Any) -> None:
        self.root = root
        self.reads: list[tuple[dict[str, Any], str, tuple[str, str]]] = []  # (globals, name, (nsid, name))
        self.reached: dict[int, Any] = {}  # the functions, classes and modules it walked
        self.sizes: list[tuple[dict[str, Any], int]] = []  # (a user module's dict, its size)
        self.cells: list[tuple[types.CellType, Any]] = []  # (closure cell followed, its content)
        self.codes: list[tuple[types.FunctionType, types.CodeType]] = []  # (held function, its code)


class EncodedGlobals(Protocol):
    """The module globals a request bound (:class:`dspex.client.bindings.Bindings`)."""

    bindings: dict[tuple[str, str], tuple[Any, str]]
    walks: dict[int, Walk]
    cells_rebound: list[tuple[types.CellType, Any]]


class Encoded(Protocol):
    """What a request's encoding (:class:`dspex.client.sessionpickle.Message`) sent, as
    :meth:`SendCache.commit` records it."""

    new_keys: dict[int, tuple[Any, str]]
    defined: set[str]
    used: set[str]
    namespaces: set[str]
    sources: dict[str, list[str]]
    settings_sent: SettingsSent | None
    restated: list[Restated]
    cells: dict[int, tuple[CellSent, ...]]

    @property
    def globals(self) -> EncodedGlobals: ...


class SendCache:
    """One session's record of what its worker holds (see the module docstring). Thread-safe:
    requests encode concurrently and commit under a lock."""

    def __init__(self, *, keep: bool = True, client_settings: bool = True,
                 max_entries: int | None = None) -> None:
        self.keep = keep  # False: the worker keeps nothing between calls; every request goes in full
        self.client_settings = client_settings  # send the client's DSPy settings with each request
        self.max_entries = max_entries if max_entries is not None else DEFAULT_CODE_CACHE
        self._prefix = secrets.token_hex(4)  # keys never collide with another client's on a shared session id
        self._serial = itertools.count(1)
        self._lock = threading.Lock()
        self.keys: dict[int, tuple[Any, str]] = {}  # id(obj) -> (obj, key)
        self.key_ids: dict[str, int] = {}  # key -> id(obj)
        self.sent: OrderedDict[str, None] = OrderedDict()  # keys the worker holds, least recently used first
        self.bound: dict[tuple[str, str], tuple[Any, str]] = {}  # (namespace, name) -> (object, its key)
        # bindings of requests no reply has shown the worker loaded yet: (namespace, name) -> key
        self.unconfirmed: dict[tuple[str, str], str] = {}
        # (namespace, name) -> (object, key, the binding version that bound it): every binding of
        # the session, kept through a miss (one sent again unchanged keeps its number)
        self.set_at: dict[tuple[str, str], tuple[Any, str, int]] = {}
        self.version = 0  # the number of the session's latest binding change
        # a forked child's ancestors, nearest first: (key prefix, its binding version at the fork)
        self.lineage: list[tuple[str, int]] = []
        self.pins: dict[str, int] = {}  # key -> bindings (or namespaces) that hold it: never evicted
        self.sources: dict[str, list[str]] = {}  # filename -> the linecache lines sent
        self.drops: list[str] = []  # keys forgotten here that the worker still holds
        self.walks: dict[int, Walk] = {}  # id(root) -> what its last walk read: Bindings.walk's shortcut
        # (namespace, name) -> (object, why): a global only its module's walk sends that cannot be pickled
        self.left_out: dict[tuple[str, str], tuple[Any, str]] = {}
        self.codes: dict[str, types.CodeType] = {}  # key of a function sent -> the code it was sent with
        self.last_settings: SettingsSent | None = None  # the client settings sent last, all by key
        self.states: dict[str, Any] = {}  # key -> the state of a client setting the worker holds under it
        self.modules: dict[str, None] = {}  # the user modules whose globals the session's code uses
        # key -> a DSPy LM or module of this client the worker holds: its history entries come back
        self.lms: dict[str, Any] = {}
        self.context_vars: dict[str, Any] = {}  # key -> a ContextVar of the user's code: its value goes per call
        self.cells = SentCells()  # the closure cells of the functions the worker holds
        processwide.register(self)

    def _after_fork(self) -> None:
        """In a forked child that shares the session with its parent: keys of its own from now on
        (one key for two processes' objects would run one's code for the other), and a lock no
        parent thread holds. Its binding versions count on from the parent's at the fork, as its
        own: the worker starts its count at the parent's (``lineage``), so the child's first call
        does not send again every global it inherited (each the parent's value at the fork, over
        the parent's later rebinding)."""
        self.lineage = [(self._prefix, self.version), *self.lineage]
        self._prefix = secrets.token_hex(4)
        self._lock = threading.Lock()

    @property
    def prefix(self) -> str:
        """This client process's prefix of the session's keys: whose binding versions count up
        in one sequence (a forked child's, or another client's on the same session id, are another)."""
        return self._prefix

    @classmethod
    def transient(cls) -> SendCache:
        """For a request outside any session: everything in full, nothing remembered."""
        return cls(keep=False, client_settings=False)

    def new_key(self) -> str:
        return f"{self._prefix}.{next(self._serial)}"

    def key_of(self, obj: Any) -> str:
        """The key that names ``obj`` to the worker: one per client object for the session,
        whichever request encodes it first. Two requests that encode it at once (threads sharing
        the session) name it alike, so the worker keeps one object: under two keys, the later
        binding of a module global would replace the state the earlier call made."""
        if not self.keep:
            return self.new_key()
        oid = id(obj)
        with self._lock:
            hit = self.keys.get(oid)
            if hit is None or hit[0] is not obj:
                hit = self.keys[oid] = (obj, self.new_key())
                self.key_ids[hit[1]] = oid
            return hit[1]

    def commit(self, msg: Encoded, drops_sent: list[str]) -> tuple[Receipt, int, int] | None:
        """``msg`` was encoded in full (and is about to be sent): remember what it sent. Its
        bindings and drops count as the worker's only once :meth:`confirm` says the worker loaded
        the request (the :class:`Receipt` returned): a request that never reaches the worker
        (cancelled or timed out while queued, its send failed) would otherwise leave a rebound
        global at its old value there, while later requests, trusting the binding, send nothing
        of it. Until then later requests send those bindings again, by key.

        Also (the receipt, the binding version the request relies on, the version it brings the
        worker to): the bindings of the session the request does not carry all have a version up
        to the first; a store that holds every binding up to it holds every binding up to the
        second once it has loaded the request."""
        if not self.keep:
            return None
        lm_class = _history_classes() if msg.new_keys else None
        with self._lock:
            for oid, (obj, key) in msg.new_keys.items():
                self.keys.setdefault(oid, (obj, key))
                self.key_ids.setdefault(key, oid)
                if lm_class is not None and key in msg.defined and isinstance(obj, lm_class):
                    self.lms[key] = obj
                elif key in msg.defined and type(obj) is contextvars.ContextVar:
                    self.context_vars[key] = obj
            for key in msg.defined:
                self.sent[key] = None
                self.sent.move_to_end(key)
            for key in msg.used:
                if key in self.sent:
                    self.sent.move_to_end(key)
            for key in msg.namespaces:
                self.pins[key] = _PINNED_FOREVER
            carried = msg.globals.bindings
            reaches = 0
            for where, (obj, key) in carried.items():
                changed = self.set_at.get(where)
                if changed is None or changed[1] != key:
                    self.version += 1
                    changed = self.set_at[where] = (obj, key, self.version)
                reaches = max(reaches, changed[2])
                if where[0].startswith("m:") and where[0][2:] not in self.modules:
                    self.modules[where[0][2:]] = None
                old = self.bound.get(where)
                self.bound[where] = (obj, key)
                self.unconfirmed[where] = key
                self.pins[key] = self.pins.get(key, 0) + 1
                if old is not None:
                    self._unpin(old[1])
            relies = self.version
            if carried:
                relies = max((n for where, (_, _, n) in self.set_at.items() if where not in carried), default=0)
            self.sources.update(msg.sources)
            if len(self.walks) + len(msg.globals.walks) > self.max_entries:
                self.walks.clear()
            self.walks.update(msg.globals.walks)
            if msg.settings_sent is not None:
                self.last_settings = msg.settings_sent
            if msg.cells:
                self.cells.hold(msg.cells)
            for cell, value in msg.globals.cells_rebound:
                self.cells.resent(cell, value)
            for obj, key, was, state in msg.restated:
                self.states[key] = state
                if was is not None:
                    self._rekey(obj, key, was)
            self._evict()
        receipt = tuple((where, key) for where, (_, key) in carried.items()), tuple(drops_sent)
        return receipt, relies, max(relies, reaches)

    def confirm(self, receipt: Receipt) -> None:
        """The worker loaded the request of ``receipt``: its bindings are the session's there,
        and its drops were done (until then every request sends them again: dropping is idempotent,
        and a dropped key is never used again)."""
        bindings, drops = receipt
        with self._lock:
            for where, key in bindings:
                if self.unconfirmed.get(where) == key:
                    del self.unconfirmed[where]
            if drops:
                done = set(drops)
                self.drops = [k for k in self.drops if k not in done]

    def changed_since(self, version: int) -> list[tuple[tuple[str, str], Any]]:
        """The session's bindings set after binding ``version`` ((namespace, name), object): what
        a worker whose store holds every binding up to it lacks."""
        with self._lock:
            return [(where, obj) for where, (obj, _, n) in self.set_at.items() if n > version]

    def pending_drops(self) -> list[str]:
        if not self.drops:
            return []
        with self._lock:
            return list(self.drops)

    def missed(self, ephemeral: bool, failed: Receipt | None = None) -> None:
        """The worker lacked something: assume it holds nothing of this session. The keys of
        bound globals stay (a worker that does hold them keeps its module state when they come
        again), and so do those of requests still being encoded, which name their objects by
        them (key_of). ``failed``: the receipt of a request the worker could not load (a package
        it lacks): its bindings are not the session's, no worker is sent them to catch up (each
        call would fail alike); a call that reads them sends them again."""
        with self._lock:
            for where, key in failed[0] if failed is not None else ():
                changed = self.set_at.get(where)
                if changed is not None and changed[1] == key:
                    del self.set_at[where]
            keep = {key for key, n in self.pins.items() if n > 0} if not ephemeral else set()
            self.keys = {oid: entry for oid, entry in self.keys.items()
                         if entry[1] in keep or (entry[1] not in self.sent and not ephemeral)}
            self.key_ids = {key: oid for oid, (_, key) in self.keys.items()}
            self.lms = {key: obj for key, obj in self.lms.items() if key in self.key_ids}
            self.context_vars = {key: obj for key, obj in self.context_vars.items() if key in self.key_ids}
            self.sent.clear()
            self.bound.clear()
            self.unconfirmed.clear()
            self.pins = {key: n for key, n in self.pins.items() if n >= _PINNED_FOREVER}
            self.sources.clear()
            self.drops.clear()
            self.walks.clear()
            self.cells.clear()
            self.last_settings = None
            self.states.clear()
            if ephemeral:
                self.keep = False
                self.set_at.clear()

    def close(self) -> None:
        """The session ended: let go of everything (the worker dropped its side)."""
        with self._lock:
            self.keys.clear()
            self.key_ids.clear()
            self.sent.clear()
            self.bound.clear()
            self.set_at.clear()
            self.version = 0
            self.unconfirmed.clear()
            self.pins.clear()
            self.sources.clear()
            self.drops.clear()
            self.walks.clear()
            self.cells.clear()
            self.last_settings = None
            self.states.clear()
            self.modules.clear()
            self.lms.clear()
            self.context_vars.clear()

    def _rekey(self, obj: Any, key: str, old: str) -> None:
        """A setting changed in place went to the worker under ``key``: its key from now on (the
        worker's object under ``old`` is that object, updated)."""
        prev = self.keys.get(id(obj))
        if prev is not None:
            self.key_ids.pop(prev[1], None)
        self.keys[id(obj)] = (obj, key)
        self.key_ids[key] = id(obj)
        self.states.pop(old, None)
        lm = self.lms.pop(old, None)
        if lm is not None:
            self.lms[key] = lm
        if old in self.sent and old not in self.pins:  # (a global's binding keeps its key)
            del self.sent[old]
            self.drops.append(old)

    def _unpin(self, key: str) -> None:
        n = self.pins.get(key, 0) - 1
        if n > 0:
            self.pins[key] = n
            return
        self.pins.pop(key, None)
        if key in self.sent and not key.startswith(("c:", "ref:", "imp:", "mod:")):
            self._forget(key)  # a rebound global: the worker need not keep the old value

    def _evict(self) -> None:
        excess = len(self.sent) - self.max_entries
        if excess <= 0:
            return
        victims: list[str] = []
        for key in self.sent:
            if len(victims) >= excess:
                break
            if key not in self.pins:
                victims.append(key)
        for key in victims:
            self._forget(key)

    def _forget(self, key: str) -> None:
        self.sent.pop(key, None)
        oid = self.key_ids.pop(key, None)
        if oid is not None:
            self.keys.pop(oid, None)
        self.lms.pop(key, None)
        self.codes.pop(key, None)
        self.context_vars.pop(key, None)
        self.states.pop(key, None)
        self.drops.append(key)
        self.cells.forget(key)

    def _snapshot(self, held: dict[str, Any]) -> list[tuple[str, Any]]:
        """The items of ``held`` (:attr:`lms`, :attr:`context_vars`) as they are now: another
        thread's request of the session commits new ones while this one is encoded."""
        if not held:
            return []
        with self._lock:
            return list(held.items())

    def context_values(self, msg: Encoded) -> dict[str, tuple[Any, Any]]:
        """{key: (variable, value)} of the user's ContextVars the worker holds once ``msg`` is
        sent, for those set in the calling thread's or task's context: the call runs with them set."""
        if not self.context_vars and not msg.new_keys:  # (every call of code that sets none)
            return {}
        found = {key: var for key, var in self._snapshot(self.context_vars) if key in self.sent or key in msg.defined}
        found.update((key, obj) for obj, key in msg.new_keys.values()
                     if key in msg.defined and type(obj) is contextvars.ContextVar)
        values = {key: (var, var.get(_MISSING)) for key, var in found.items()}
        return {key: item for key, item in values.items() if item[1] is not _MISSING}

    def held_lms(self, msg: Encoded) -> dict[str, Any]:
        """{key: LM or module} of this client's DSPy LMs and modules that the worker holds once
        ``msg`` is sent: whose history entries the call sends back."""
        lms = {key: lm for key, lm in self._snapshot(self.lms) if key in self.sent or key in msg.defined}
        lm_class = _history_classes() if msg.new_keys else None
        if lm_class is not None:
            lms.update((key, obj) for obj, key in msg.new_keys.values()
                       if key in msg.defined and isinstance(obj, lm_class))
        return lms


def client_dspy_settings() -> tuple[dict[str, Any], list[str]]:
    """What this process configured of DSPy (``dspy.configure`` / ``dspy.context``) that differs
    from DSPy's defaults, and the names among them that the ``dspy.context`` blocks of the calling
    thread or task hold: those a block named (:data:`_named`), and those it holds at another value
    than the configuration's (a block entered where names are not known: a thread of DSPy's
    ``ParallelExecutor``). In-process such a block wins over any ``dspy.configure``, the session's
    own included. Nothing when DSPy was never imported here."""
    module = sys.modules.get(_SETTINGS)
    if module is None:
        return {}, []
    try:
        config = module.main_thread_config
        overrides = module.thread_local_overrides.get()
        defaults = module.DEFAULT_CONFIG
    except AttributeError:  # another DSPy layout: send nothing rather than guess
        return {}, []
    pinned: list[str] = []
    if overrides:
        pinned = [k for k, v in overrides.items() if k not in _CALL_LOCAL and config.get(k, _MISSING) is not v]
        named = _names()
        if named:
            pinned += [k for k in named if k in overrides and k not in pinned]
        config = {**config, **overrides}
    out = {}
    for k, v in config.items():
        default = defaults.get(k, _MISSING)
        if k in pinned or (v is not default and k not in _CALL_LOCAL and _differs(v, default)):
            out[k] = v
    return out, pinned


def _history_classes() -> tuple[type, ...] | None:
    """The DSPy classes whose objects keep a history of LM calls (``BaseLM``, and ``Module``:
    DSPy records a call in each module it was made in) when DSPy is imported here, else None."""
    lm = getattr(sys.modules.get("dspy.clients.base_lm"), "BaseLM", None)
    module = getattr(sys.modules.get("dspy.primitives.module"), "Module", None)
    classes = tuple(c for c in (lm, module) if isinstance(c, type))
    return classes or None


def client_usage_tracker() -> Any:
    """The ``dspy.track_usage()`` tracker of the calling thread or task (None without one): what a
    session's call spends on LMs is added to it, as in-process."""
    module = sys.modules.get("dspy.dsp.utils.settings")
    if module is None:
        return None
    try:
        return module.thread_local_overrides.get().get("usage_tracker")
    except AttributeError:
        return None


def add_usage(tracker: Any, usage: Any) -> None:
    """Add what a call's LM calls used on the worker (``{lm: [entry, ...]}``) to ``tracker``, as a
    nested ``dspy.track_usage()`` block rolls its entries up into its parent's."""
    if isinstance(usage, dict):
        for lm, entries in usage.items():
            if isinstance(entries, list):
                tracker.usage_data[lm].extend(entries)


_MISSING = object()


def _differs(value: Any, default: Any) -> bool:
    if value is default:
        return False
    if type(value) is type(default) and isinstance(value, _ATOMS):
        return bool(value != default)
    return not (type(value) is list and type(default) is list and not value and not default)


def held_key(cache: SendCache, obj: Any) -> str | None:
    """The key the session's worker holds ``obj`` by (the client object's identity), if it does."""
    hit = cache.keys.get(id(obj))
    return hit[1] if hit is not None and hit[0] is obj and hit[1] in cache.sent else None
