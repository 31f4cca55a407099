"""Objects a worker keeps for its sessions, named by refs, counted against a per-session quota.

Each session owns its refs; a session that reaches its quota gets ``RefQuotaExceeded`` and
nothing of any other session is ever evicted to make room (a shared LRU let one session's
evaluation loop evict another session's program).
"""

from __future__ import annotations

import reprlib
import secrets
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from dspex.wire.codestore import CodeStore
from dspex.wire.errors import RefNotFound, RefQuotaExceeded
from dspex.wire.ref import Ref
from worker.session_loop import SessionLoop
from worker.sink import LateOutput

DEFAULT_REF_QUOTA = 100_000
# How many released ref ids we remember to explain a stale ref. Keyed by hash(ref id), an int,
# not the 32-char str, and bounded: a worker that opens and closes sessions for days must not
# grow by what it remembers.
_GONE_MEMORY = 10_000

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200


@dataclass
class SessionState:
    """Everything one session owns on this worker."""

    id: str
    refs: dict[str, Any] = field(default_factory=dict)
    ref_of_object: dict[int, str] = field(default_factory=dict)
    dspy_settings: dict[str, Any] = field(default_factory=dict)
    dspy_defaults: dict[str, Any] | None = None  # its own copies of DSPy's mutable defaults (worker.dspy_settings)
    lm_history: list[Any] = field(default_factory=list)  # what dspy.inspect_history() shows this session
    module: ModuleType | None = None  # the session's own module (worker.namespace), made on first use
    code: CodeStore = field(default_factory=CodeStore)  # by-value code and module state the client sent
    checkpoint: Any = None  # a durable session's worker.checkpoint.Tracker (what the broker holds of it)
    late_output: LateOutput = field(default_factory=LateOutput)  # what its calls' threads wrote after them
    # the LM history entries its calls' threads recorded in the client's LMs after them (worker.lm_history),
    # bounded as DSPy bounds an LM's history
    late_history: deque[tuple[Any, Any]] = field(default_factory=lambda: deque(maxlen=10_000))
    loop: SessionLoop = field(default_factory=SessionLoop)  # its calls' awaitables run on it (its asyncio loop is lazy)
    warning_filters: list[Any] | None = None  # its own warnings.filters, once its code changed them (worker.warnfilters)


def type_name(obj: Any) -> str:
    cls = type(obj)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


class RefTable:
    """The sessions of this worker and their refs; each session holds at most ``quota`` refs."""

    def __init__(self, pool: str, worker: str, quota: int = DEFAULT_REF_QUOTA) -> None:
        self.pool = pool
        self.worker = worker
        self.quota = quota
        self.sessions: dict[str, SessionState] = {}
        self._count = 0
        self._gone: OrderedDict[int, str] = OrderedDict()  # hash(ref id) -> why it is gone
        self._lock = threading.RLock()  # calls of different sessions may run in threads
        self.on_session_closed: list[Any] = []  # callbacks(state): drop the session's module etc.

    def session(self, session_id: str) -> SessionState:
        with self._lock:
            state = self.sessions.get(session_id)
            if state is None:
                state = self.sessions[session_id] = SessionState(session_id)
        return state

    def put(self, session: SessionState, obj: Any, made: list[str] | None = None) -> Ref:
        """The ref of ``obj`` in ``session`` (the same one while it is held); ids of new refs are
        appended to ``made``."""
        with self._lock:
            ref_id = session.ref_of_object.get(id(obj))
            if ref_id is None or ref_id not in session.refs:
                if len(session.refs) >= self.quota:
                    raise RefQuotaExceeded(
                        f"session {session.id[:8]} holds {len(session.refs)} refs, its quota; release refs "
                        f"(ref.release(), session.release(...)) or close the session",
                        session=session.id, quota=self.quota)
                ref_id = secrets.token_hex(16)  # 128 bits: refs are unguessable
                session.refs[ref_id] = obj
                session.ref_of_object[id(obj)] = ref_id
                self._count += 1
                if made is not None:
                    made.append(ref_id)
        try:
            text = _REPR.repr(obj)  # bounded: a huge or deep object must not cost a full repr
        except Exception as exc:  # noqa: BLE001 - a broken __repr__ must not break the call
            text = f"<unrepresentable: {type(exc).__name__}>"
        return Ref(ref_id, session.id, self.pool, self.worker, type_name(obj), text[:200])

    def get(self, session: SessionState, ref: Ref) -> Any:
        if ref.session != session.id:
            raise RefNotFound(
                f"ref {ref.id[:8]} belongs to session {ref.session[:8]}, not to this session {session.id[:8]}: a "
                "ref works only in the session that made it (use it there, or pass a copy of its value)", ref=ref.id,
            )
        with self._lock:
            try:
                return session.refs[ref.id]
            except KeyError:
                why = self._gone.get(hash(ref.id))
                if why is None and ref.worker != self.worker:
                    why = f"it was made by worker {ref.worker[:8]}, not this one ({self.worker[:8]})"
                    if session.checkpoint is not None:  # durable: its refs moved here with it
                        why += (", and is not in its session's checkpoint (released, or made by a call whose "
                                "effects were lost with its worker)")
                raise RefNotFound(f"ref {ref.id[:8]} ({ref.type_name}) is gone: {why or 'unknown ref'}",
                                  ref=ref.id) from None

    def release(self, session: SessionState, ref_id: str, why: str = "released") -> bool:
        with self._lock:
            if ref_id not in session.refs:
                return False  # unknown, already gone, or another session's: nothing to do
            obj = session.refs.pop(ref_id)
            session.ref_of_object.pop(id(obj), None)
            self._count -= 1
            self._forget(ref_id, why)
        if session.checkpoint is not None:
            session.checkpoint.released([obj])
        return True

    def release_session(self, session_id: str, why: str = "its session was closed") -> int:
        with self._lock:
            state = self.sessions.pop(session_id, None)
            if state is None:
                return 0
            for ref_id in state.refs:
                self._forget(ref_id, why)
            self._count -= len(state.refs)
        for callback in self.on_session_closed:
            callback(state)
        n = len(state.refs)
        state.refs.clear()
        state.ref_of_object.clear()
        return n

    def adopt(self, session: SessionState, gone: dict[str, str]) -> None:
        """``session`` was restored with its refs (worker/checkpoint.py): count them, and
        remember why the ones ``gone`` (ref id -> why) did not come."""
        with self._lock:
            self._count += len(session.refs)
            for ref_id, why in gone.items():
                self._forget(ref_id, why)

    def _forget(self, ref_id: str, why: str) -> None:
        self._gone[hash(ref_id)] = why
        if len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)

    @property
    def count(self) -> int:
        """Refs held by all sessions of this worker."""
        return self._count
