"""The history entries a session's call recorded in copies of this client's LMs and modules,
recorded here through DSPy's own rules, as in-process (docs/remote-objects.md, *The LM history*);
and what its LMs used, added to the caller's ``dspy.track_usage()`` tracker.
"""

from __future__ import annotations

import logging
import pickle
import sys
from typing import Any

from dspex.wire import codec

log = logging.getLogger("dspex.client")


def record_history(lms: dict[str, Any], extras: dict[str, Any]) -> None:
    """Record the entries of a reply's ``extras`` (``[[key, entry], ...]``: ``"history"``, a
    pickle, or ``"history_codec"``, a codec body) in the LMs and modules of ``lms`` (key -> LM
    or module; None: DSPy's global history only)."""
    left = extras.get("history_left")
    try:
        blob = extras.get("history")
        # a pickle from the session's worker, which runs this client's code anyway
        entries = pickle.loads(blob) if isinstance(blob, bytes) else codec.decode([extras["history_codec"]])
    except Exception as exc:  # noqa: BLE001 - history is a by-product: an entry this client cannot load is left out
        log.warning("the LM history of a call could not be read here (%s: %s); it stays on the worker",
                    type(exc).__name__, exc)
        return
    if left:
        log.warning("%s LM history entries of a call stayed on the worker (a reply carries at most 8 MiB of them)",
                    left)
    if not isinstance(entries, list):
        return
    for item in entries:
        if not (isinstance(item, list) and len(item) == 2):
            continue
        owner = lms.get(item[0]) if isinstance(item[0], str) else None
        update = getattr(owner, "update_history", None)
        if item[0] is None:  # an LM of the session's: DSPy's global history only
            _record_globally(item[1])
        elif callable(update):  # an LM
            update(item[1])
        elif owner is not None:
            _record_in_module(owner, item[1])


def _record_globally(entry: Any) -> None:
    """What DSPy's ``record_history`` does for its global history."""
    from dspy.clients import base_lm

    if base_lm.settings.disable_history:
        return
    if len(base_lm.GLOBAL_HISTORY) >= base_lm.MAX_HISTORY_SIZE:
        base_lm.GLOBAL_HISTORY.pop(0)
    base_lm.GLOBAL_HISTORY.append(entry)


def _record_in_module(module: Any, entry: Any) -> None:
    """What DSPy's ``record_history`` does for each module a call was made in."""
    from dspy.dsp.utils.settings import settings

    if settings.disable_history or settings.max_history_size == 0:
        return
    history = getattr(module, "history", None)
    if not isinstance(history, list):
        return
    if len(history) >= settings.max_history_size:
        history.pop(0)
    history.append(entry)


def history_classes() -> tuple[type, ...] | None:
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
