"""The history entries a session's call recorded in copies of this client's LMs, recorded here.

In-process, ``lm.history`` and ``dspy.inspect_history()`` show every call a program made. A
session's worker holds a copy of each LM the client sent (a setting, a module global): its reply
carries the entries that call recorded in those copies (``worker.lm_history``), in call order, and
each is recorded in the client's own LM through DSPy (``lm.update_history``), so DSPy's bounds
(``max_history_size``, its global history's) and ``disable_history`` apply as they would have
in-process.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from dspex.wire import codec

log = logging.getLogger("dspex.client")


def record_history(lms: dict[str, Any], extras: dict[str, Any]) -> None:
    """Record the entries of a reply's ``extras`` (``[[key, entry], ...]``: ``"history"``, a
    pickle, or ``"history_codec"``, a codec body) in the LMs of ``lms`` (key -> LM)."""
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
        if isinstance(item, list) and len(item) == 2:
            lm = lms.get(item[0])
            if lm is not None:
                lm.update_history(item[1])
