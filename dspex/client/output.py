"""A call's output on the client, where it would go in-process (like Ray's ``log_to_driver``).

What a call prints, warns or logs on its worker arrives as ``out`` events while it runs
(worker/output.py); :func:`forward` puts its text on this process's ``sys.stdout`` /
``sys.stderr`` as they are at that moment, re-issues its warnings through :mod:`warnings` and
re-emits its log records on this process's logger of the same name. docs/remote-objects.md
(*Output*) tells the rules in full.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from types import FrameType
from typing import Any, TextIO

from dspex.wire.protocol import output_flags

log = logging.getLogger("dspex.client")

# Where the threshold is cached: the root logger's level cache, which logging clears whenever a
# level changes anywhere (setLevel, logging.disable, dictConfig), so the cache is never stale.
_THRESHOLD_KEY = "dspex.log_threshold"
_write_lock = threading.Lock()  # one write per event: lines of concurrent sessions never splice
_categories: dict[tuple[str, str], type[Warning]] = {}
# a place's file -> the name of this process's module of it and the registry of warnings shown there
_places: dict[str, tuple[str | None, dict[Any, Any]]] = {}
Place = tuple[str, int, dict[str, Any]]  # a line of the user's code: its file, line number and module's globals


def log_threshold() -> int:
    """The lowest level any logger of this process is enabled for (1-255)."""
    cache: dict[Any, Any] | None = getattr(logging.root, "_cache", None)
    if cache is not None:
        cached = cache.get(_THRESHOLD_KEY)
        if cached is not None:
            return int(cached)
    manager = logging.root.manager
    level = min([logging.root.level or 1, *(logger.level for logger in list(manager.loggerDict.values())
                                             if isinstance(logger, logging.Logger) and logger.level > 0)])
    level = min(max(level, manager.disable + 1), 0xFF)
    if cache is not None:
        cache[_THRESHOLD_KEY] = level
    return level


def request_flags() -> int:
    """The flags of a request whose output this process takes (with its log threshold)."""
    return output_flags(log_threshold())


def forward(event: Any, session: str = "", worker: str = "", at: Place | None = None) -> None:
    """Put one output event where it goes in-process (see the module docstring). A warning that
    the called library issued at its caller's place shows at ``at``, the line of the call
    (:func:`call_place`), else at the line outside dspex that reads the output now.

    Text that cannot be written (a closed pipe: ``python client.py | head -1``, a closed file)
    raises as the program's own ``print`` raises in-process: the caller cancels the call and gets
    the error, instead of the call running on into a stream nobody reads. A warning or log
    record never raises, as in-process (``showwarning`` and handlers swallow their errors)."""
    if not isinstance(event, dict):
        return
    kind = event.get("stream")
    if kind == "stdout" or kind == "stderr":
        _write(sys.stdout if kind == "stdout" else sys.stderr, str(event.get("text", "")))
        return
    try:
        if kind == "warning":
            _warn(event, at)
        elif kind == "log":
            _emit(event, session, worker)
    except Exception as exc:  # noqa: BLE001 - a failing showwarning or handler: the call goes on
        log.debug("could not forward a call's %s output: %r", kind, exc)


def _write(stream: TextIO | None, text: str) -> None:
    if stream is None or not text:
        return
    with _write_lock:
        try:
            stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(stream, "encoding", None) or "utf-8"
            stream.write(text.encode(encoding, "replace").decode(encoding))
        stream.flush()  # a call runs on while its output shows: a pipe must not hold it back


def _warn(event: dict[str, Any], at: Place | None) -> None:
    category = _category(event.get("category"))
    message = str(event.get("message", event.get("text", "")))
    filename = str(event.get("filename", "<worker>"))
    lineno = int(event.get("lineno") or 0)
    at = (at or call_place()) if event.get("at_call") else None
    try:
        if at is not None:
            filename, lineno, at_globals = at
            module, registry = at_globals.get("__name__"), at_globals.setdefault("__warningregistry__", {})
        else:
            module, registry = _place(filename)
        if module is None:  # (``module=None`` is not "not given": the C implementation matches None)
            warnings.warn_explicit(message, category, filename, lineno, registry=registry)
        else:
            warnings.warn_explicit(message, category, filename, lineno, module=module, registry=registry)
    except Exception:  # noqa: BLE001 - an ``error`` filter: the call ran on past it, so show it
        warnings.showwarning(message, category, filename, lineno)


def call_place() -> Place | None:
    """The line outside dspex that makes or awaits a call now (the line of ``s.run`` in the user's
    code). None when there is none: an asyncio task of dspex's own coroutine (``asyncio.gather``,
    ``wait_for`` and ``create_task`` of ``s.run(...)``, the reader of a cancelled call's output),
    whose stack is the event loop's, so the asyncio client takes it when the call is made."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and (frame.f_globals.get("__name__") or "").partition(".")[0] == "dspex":
        frame = frame.f_back
    if frame is None or (frame.f_globals.get("__name__") or "").startswith("asyncio"):
        return None
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals


def _place(filename: str) -> tuple[str | None, dict[Any, Any]]:
    """The name and the ``__warningregistry__`` of this process's module of ``filename``, as
    in-process, else no name (Python makes one of the path) and a registry kept here. The name is
    what the filters match: a DeprecationWarning of the script's own code shows only under
    ``__main__`` (``default::DeprecationWarning:__main__``), not under its path. The registry is
    where they note the places shown: a warning the script itself showed is not shown again, and
    without one the ``default`` action ("once per place") would show a warning every time a call
    (another session's, or the same program again) sends it."""
    found = _places.get(filename)
    if found is None:
        module = next((m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == filename), None)
        found = (None, {}) if module is None else (module.__name__, vars(module).setdefault("__warningregistry__", {}))
        if len(_places) < 1024:
            _places[filename] = found
    return found


def _category(spec: Any) -> type[Warning]:
    """The warning class of ``[module, qualname]`` when this process has it, else a stand-in
    subclass of UserWarning of the same name (its text reads the same)."""
    if not (isinstance(spec, (list, tuple)) and len(spec) == 2):
        return UserWarning
    module, qualname = str(spec[0]), str(spec[1])
    found = _categories.get((module, qualname))
    if found is not None:
        return found
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, Warning)):
        obj = type(qualname.rsplit(".", 1)[-1], (UserWarning,), {"__module__": module, "__qualname__": qualname})
    if len(_categories) < 256:
        _categories[(module, qualname)] = obj
    return obj  # type: ignore[no-any-return]


def _emit(event: dict[str, Any], session: str, worker: str) -> None:
    name = str(event.get("logger") or "root")
    level = int(event.get("level") or logging.INFO)
    logger = logging.getLogger(name if name != "root" else None)
    if not logger.isEnabledFor(level):
        return
    stack = event.get("stack_info")
    record = logger.makeRecord(name, level, str(event.get("pathname") or "?"), int(event.get("lineno") or 0),
                               str(event.get("message", "")), (), None, event.get("funcName") or None,
                               None, stack if isinstance(stack, str) else None)
    # as the worker's record had them (formatters append exc_text as they append a local exception's)
    for attr, kind in (("exc_text", str), ("created", float), ("process", int), ("threadName", str)):
        if isinstance(event.get(attr), kind):
            setattr(record, attr, event[attr])
    record.msecs = int((record.created - int(record.created)) * 1000) + 0.0
    extra = event.get("extra")
    if isinstance(extra, dict):
        for key, value in extra.items():
            if isinstance(key, str) and key not in record.__dict__:
                setattr(record, key, value)
    record.dspex_session = session
    record.dspex_worker = worker
    logger.handle(record)
