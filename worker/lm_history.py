"""The LM history entries a call records in the client's LMs and modules, sent back with its reply.

In-process, every LM call appends an entry to the LM's ``history``, to DSPy's global history
(``dspy.inspect_history()``) and to the ``history`` of each module the call was made in. Through a
session the client's LM or module is a copy on the worker (sent once per session, by key: a
setting or a module global, and each LM and module inside one's value), so the client's own would
record nothing. A request names the keys of the client's LMs and modules the session holds
(context ``"history"``); while the call runs, each entry DSPy records in one of those copies is
logged here, in call order, and the reply carries
the log (:func:`encoded`) for the client to record in its own (``lm.update_history``: DSPy's own
bounds, and its global history). A thread the call left running that records after the reply (DSPy's
``streamify(..., async_streaming=False)`` producer finishing its LM call after the consumer left
early) logs into the session's late entries, which the session's next call carries first, as a late
thread's output goes with the next call. An LM or module the session made itself has no client key: its
history stays on the worker, but its entries go to the client's global history too (key None), as
in-process ``dspy.inspect_history()`` shows every call of the program, when the call is the
client's program: it runs with one of the client's LMs (configured on the client, the session
configured none) or records in one of its LMs or modules (:attr:`CallLog.reached`). A call of the
session's own objects alone (a ref call of a ``s.put`` Predict under the session's LM) sends
nothing back: its reply carries no history, which costs the client nothing to read.

DSPy records through ``dspy.clients.base_lm.record_history`` (``BaseLM.update_history``, and
modules that imported the function by name): :func:`install` wraps it.
"""

from __future__ import annotations

import contextvars
import pickle
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from dspex.wire import codec
from dspex.wire.errors import EncodeError

# bytes of history one reply carries at most: the newest entries that fit (in-process, the
# newest are also the ones DSPy's bounded history keeps)
REPLY_CAP = 8 * 1024 * 1024
_DEFAULT_MAX_ENTRIES = 10_000  # dspy.clients.base_lm.MAX_HISTORY_SIZE, when DSPy does not say


class CallLog:
    """The history entries one call recorded in the client's LMs and modules: ``(key, entry)`` in
    order."""

    __slots__ = ("ended", "entries", "from_late", "late", "lms", "reached", "taken")

    def __init__(self, lms: dict[int, tuple[Any, Any]], max_entries: int, reached: bool = False,
                 late: deque[tuple[Any, Any]] | None = None) -> None:
        self.lms = lms  # id(worker LM or module) -> (that object, the client's key for it)
        self.late: deque[tuple[Any, Any]] = deque() if late is None else late  # the session's (stop)
        self.from_late: list[tuple[Any, Any]] = []  # late entries of earlier calls this reply carries
        self.taken = 0  # entries the reply took (take): those logged after go to a later reply
        self.ended = False  # the call ended: its threads' entries are the session's late ones
        self.entries: deque[tuple[Any, Any]] = deque(maxlen=max_entries)
        # the call is the client's program (it runs with a client's LM, or recorded in one of its
        # LMs or modules): the entries of the session's own LMs (key None) go back too
        self.reached = reached

    def record(self, owner: Any, entry: Any) -> bool:
        """Log ``entry`` for ``owner`` if it is a client's (True)."""
        hit = self.lms.get(id(owner))
        if hit is not None and hit[0] is owner:
            self.reached = True
            self.add(hit[1], entry)
            return True
        return False

    def add(self, key: Any, entry: Any) -> None:
        if not self.ended:
            self.entries.append((key, entry))
        elif key is not None or self.reached:  # as take() would have sent it
            self.late.append((key, entry))

    def take(self) -> list[tuple[Any, Any]]:
        """The entries the reply carries: the session's late ones (taken out of the session's
        log: they are this call's now, sorted already: :meth:`add`), then the call's own, those of
        the session's own LMs only if :attr:`reached`. What the call's threads log after this goes
        with a later reply (:func:`stop`)."""
        while self.late:
            self.from_late.append(self.late.popleft())
        self.taken = len(self.entries)
        own = list(self.entries)
        return [*self.from_late, *(own if self.reached else [(key, entry) for key, entry in own if key is not None])]


_current: contextvars.ContextVar[CallLog | None] = contextvars.ContextVar("dspex_lm_history", default=None)
_max_entries = _DEFAULT_MAX_ENTRIES
_settings: Any = None  # DSPy's settings (install)


def install() -> None:
    """Wrap DSPy's ``record_history`` (once per process; DSPy imported)."""
    global _max_entries, _settings
    base_lm: Any = sys.modules.get("dspy.clients.base_lm")
    if base_lm is None or getattr(base_lm.record_history, "_dspex", False):
        return
    original: Callable[[Any, Any], None] = base_lm.record_history
    _max_entries = int(getattr(base_lm, "MAX_HISTORY_SIZE", _DEFAULT_MAX_ENTRIES))
    settings = _settings = base_lm.settings

    def record_history(client: Any, entry: Any) -> None:
        original(client, entry)
        log = _current.get()
        if log is not None and not settings.disable_history:
            if not log.record(client, entry):  # an LM the session made (lm.copy() in BestOfN, Refine)
                log.add(None, entry)  # the client's global history only
            for owner in settings.caller_modules or ():  # as DSPy records it in each
                log.record(owner, entry)

    record_history._dspex = True  # type: ignore[attr-defined]
    for name, module in list(sys.modules.items()):
        if name.startswith("dspy") and getattr(module, "record_history", None) is original:
            setattr(module, "record_history", record_history)  # noqa: B010 - a module global, not an attribute mypy knows


def start(keys: Any, objects: dict[str, Any],
          late: deque[tuple[Any, Any]]) -> tuple[CallLog, contextvars.Token[Any]] | None:
    """Log the entries of the client's LMs and modules named by ``keys`` (held in ``objects``) for this call
    (and the threads it starts: worker.threads), and the session's ``late`` ones (:func:`stop`);
    None when the request named none the session holds. The call's settings are in place: whether it runs with a
    client's LM is read here."""
    if not isinstance(keys, list):
        return None
    lms = {}
    for key in keys:
        obj = objects.get(key) if isinstance(key, str) else None
        if obj is not None:
            lms[id(obj)] = (obj, key)
    if not lms:
        return None
    lm = getattr(_settings, "lm", None) if _settings is not None else None
    hit = lms.get(id(lm)) if lm is not None else None
    log = CallLog(lms, _max_entries, reached=hit is not None and hit[0] is lm, late=late)
    return log, _current.set(log)


def stop(started: tuple[CallLog, contextvars.Token[Any]]) -> None:
    """The call ended (its reply made): what its threads record from now on goes to the session's
    late entries, with what they recorded since the reply took the log."""
    log = started[0]
    log.ended = True
    for key, entry in list(log.entries)[log.taken:]:
        log.add(key, entry)  # (now ended: to the late entries, by the rule take() sends by)
    _current.reset(started[1])


def extras(log: CallLog, cap: int = REPLY_CAP) -> dict[str, Any]:
    """The reply's part of the log: a list of ``[key, entry]`` as ``"history"`` (a plain pickle:
    entries hold importable objects, a provider's response, whose class the client imports) or,
    when that cannot be, ``"history_codec"`` (one codec body: by value, a field that cannot be
    encoded as its ``repr``); ``"history_left"``: the oldest entries left out to stay under ``cap``.
    Nothing when the log has no entry to send (:meth:`CallLog.take`)."""
    taken = log.take()
    entries = [[k, e] for k, e in taken]
    if not entries:
        return {}
    try:
        data = pickle.dumps(entries, pickle.HIGHEST_PROTOCOL)
        if len(data) <= cap:
            return {"history": data}
    except Exception:  # noqa: BLE001 - a session's own class, something unpicklable: by value below
        pass
    body, left = encoded(taken, cap)
    return {"history_codec": body, "history_left": left} if left else {"history_codec": body}


def encoded(entries: list[tuple[Any, Any]], cap: int = REPLY_CAP) -> tuple[bytes, int]:
    """(``(key, entry)`` items as one codec body: a list of ``[key, entry]``, entries left out over
    ``cap``). Entries go by value (a provider response with its class); a field that cannot be
    encoded goes as its ``repr``."""
    try:
        body = _body([[k, e] for k, e in entries])
        if body is not None and len(body) <= cap:
            return body, 0
    except EncodeError:
        pass
    parts: list[bytes] = []  # one entry at a time, newest first, until the cap
    size = 0
    for key, entry in reversed(entries):
        part = _entry_body(key, entry)
        if part is None or size + len(part) > cap:
            break
        parts.append(part)
        size += len(part)
    parts.reverse()
    return _list_of(parts), len(entries) - len(parts)


def _body(value: Any) -> bytes | None:
    frames = codec.encode(value, policy=codec.Policy.ALL)
    return bytes(frames[0]) if len(frames) == 1 else None  # array frames: only in a field, handled below


def _entry_body(key: Any, entry: Any) -> bytes | None:
    try:
        body = _body([key, entry])
        if body is not None:
            return body
    except EncodeError:
        pass
    if not isinstance(entry, dict):
        return None
    fields = {}
    for name, value in entry.items():
        try:
            fields[name] = value if _body(value) is not None else repr(value)
        except EncodeError:
            fields[name] = repr(value)
    try:
        return _body([key, fields])
    except EncodeError:
        return None


def _list_of(parts: list[bytes]) -> bytes:
    """A msgpack array of already packed items."""
    return bytes(msgpack.Packer().pack_array_header(len(parts))) + b"".join(parts)
