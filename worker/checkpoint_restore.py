"""Restore of a durable session's checkpoint (worker/checkpoint.py): check the frame, load the
blobs and the skeleton into an empty session, hand back a tracker that knows what the broker
holds. Anything wrong is ``CheckpointRefused`` (the session is lost), never a crash."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dspex.wire import byvalue, classes, codestore
from dspex.wire.errors import CheckpointRefused
from worker import checkpoint_pickler as cp
from worker import namespace
from worker.checkpoint import (
    DEFAULT_HISTORY_LIMIT,
    FORMAT_VERSION,
    HEAD,
    LOST_MEMORY,
    MAGIC,
    SESSION_NS,
    NotDurable,
    Tracker,
    versions,
)
from worker.checkpoint_slots import Slots
from worker.refs import SessionState


@dataclass
class Restored:
    """What :func:`restore` made besides the session's state."""

    tracker: Tracker
    lost: list[NotDurable] = field(default_factory=list)  # what earlier workers could not checkpoint


def _refuse(session: str, why: str) -> CheckpointRefused:
    reason = f"its checkpoint {why}"
    return CheckpointRefused(f"session {session[:8]} could not be restored: {reason}; the session is lost (open a "
                             "new one)", session=session, reason=reason)


def read_header(frame: bytes | memoryview, session: str) -> tuple[dict[str, Any], memoryview]:
    """The header and the pickle of a skeleton frame; refuses another format or versions."""
    view = memoryview(frame)
    if len(view) < HEAD.size:
        raise _refuse(session, "is truncated")
    magic, version, size = HEAD.unpack_from(view)
    if magic != MAGIC:
        raise _refuse(session, "is not a dspex checkpoint")
    if version != FORMAT_VERSION:
        raise _refuse(session, f"has format version {version}; this worker reads version {FORMAT_VERSION}")
    try:
        header = msgpack.unpackb(view[HEAD.size:HEAD.size + size])
        if not isinstance(header, dict):
            raise TypeError("not a map")
    except Exception as exc:  # noqa: BLE001 - any malformed header is refused
        raise _refuse(session, f"has a malformed header ({exc})") from None
    ours = versions()
    for key in ("python", "cloudpickle", "dspy"):
        if header.get(key) != ours[key]:
            raise _refuse(session, f"was written with {key} {header.get(key) or 'absent'}; this worker runs "
                                   f"{ours[key] or 'none'}")
    if header.get("session") != session:
        raise _refuse(session, "belongs to another session")
    return header, view[HEAD.size + size:]


def restore(state: SessionState, frame: bytes | memoryview, slots: list[int],
            blobs: list[bytes | memoryview], seq: int, history_limit: int = DEFAULT_HISTORY_LIMIT) -> Restored:
    """Fill the empty ``state`` from a checkpoint (the skeleton ``frame``, the ``blobs`` of
    ``slots``, the broker's ``seq`` of it); raise ``CheckpointRefused`` for a corrupt, foreign or
    unloadable one (then the caller releases ``state``)."""
    sid = state.id
    header, data = read_header(frame, sid)
    try:
        seed_size = int(header["seed"])
        module_slots = {int(i): (str(nsid), str(name)) for i, nsid, name in header["modules"]}
        count, set_digest = header["blobs"]
        expected = header["digest"]
    except Exception as exc:  # noqa: BLE001 - any malformed header is refused
        raise _refuse(sid, f"has a malformed header ({exc})") from None
    if cp.digest(data) != expected:
        raise _refuse(sid, "is corrupt (its state does not match its digest)")
    check = Slots()
    for i, blob in zip(slots, blobs):
        check.set_blob(i, blob)
    if len(slots) != count or len(set(slots)) != len(slots) or check.set_digest() != set_digest:
        raise _refuse(sid, f"is corrupt or incomplete ({len(slots)} of {count} stored objects, their digest "
                           f"{'matches' if check.set_digest() == set_digest else 'differs'})")
    context = cp.LoadContext()
    seeds: list[Any] = [None] * seed_size
    try:
        for i, (nsid, name) in module_slots.items():
            if nsid == "global":  # a class or function the skeleton refers to by slot: by its name
                if i < seed_size:
                    seeds[i] = byvalue.resolve_name(name)
                continue
            if nsid == SESSION_NS:
                module = namespace.session_module(state, name)
            elif nsid[:2] in ("m:", "g:", codestore.IMPORTED):
                module = state.code.module(nsid, {"__name__": name})
            else:
                raise ValueError(f"unknown module slot {nsid!r}")
            context.modules[id(module.__dict__)] = module
            if i < seed_size:
                seeds[i] = module.__dict__
        with cp.loading(context):
            for i, blob in zip(slots, blobs):
                obj = context.objects[i] = pickle.loads(blob)  # our own checkpoint, checked against its digest
                if i < seed_size:
                    seeds[i] = obj
            root = cp.load_seeded(seeds, data)
        lost = _apply(state, root)
    except CheckpointRefused:
        raise
    except BaseException as exc:  # noqa: BLE001 - unpickling runs user code (__setstate__, __reduce__)
        raise _refuse(sid, f"could not be loaded ({type(exc).__name__}: {exc})"[:1000]) from None
    tracker = Tracker.adopt(state, context.objects, module_slots, dict(zip(slots, blobs)), seq, lost, history_limit)
    return Restored(tracker, lost)


def _apply(state: SessionState, root: Any) -> list[NotDurable]:
    if not isinstance(root, dict) or not {"refs", "ns", "settings", "history", "lost", "code", "globals"} <= root.keys():
        raise ValueError("its state is not a session's")
    module = state.module
    if module is not None:
        module.__dict__.update(root["ns"])
        if root.get("ns_lines"):
            namespace.set_lines(module.__file__ or "", list(root["ns_lines"]))
    for rid, obj in root["refs"].items():
        state.refs[rid] = obj
        state.ref_of_object[id(obj)] = rid
    state.dspy_settings.update(root["settings"])
    state.lm_history[:] = root["history"]
    code = state.code
    code.objects.update(root["code"])
    for nsid, values in root["globals"].items():
        code.module(nsid).__dict__.update(values)
    code.bound.update(root["bound"])
    # (a checkpoint of before per-client versions holds none: a call relying on one is refused once)
    code.versions.update(root.get("versions", {}))
    code.stamps.update(root.get("stamps", {}))
    code.unsent.update(root.get("unsent", {}))  # (a checkpoint of before it holds none: no notes)
    for filename, entry in root["sources"].items():
        code.sources[filename] = entry
    code.activate_sources()
    for key, file in root["class_files"].items():
        classes.register_class_file(code.objects[key], file)
    _forget_lost_bindings(code)
    return [NotDurable(*item) for item in root["lost"]][-LOST_MEMORY:]


def _forget_lost_bindings(code: codestore.CodeStore) -> None:
    """A module global bound to a value the client sent that the checkpoint left out (not durable:
    a ``ContextVar``) is unbound here, while its client takes it as held and would never send it
    again: its calls would meet a ``NameError``. Forgetting its binding and the clients' binding
    versions makes the session's next call that relies on them a ``CodeCacheMiss``, which its
    client answers by sending it again with every binding (those held here stay as restored). A
    global the session's own code rebound to what is not durable stays unbound (the client's
    value is an older one)."""
    # (every value a client binds is held under its key: one missing was left out)
    lost = [where for where, key in code.bound.items() if key not in code.objects
            and (module := code.modules.get(where[0])) is not None and where[1] not in module.__dict__]
    for where in lost:
        del code.bound[where]
        code.stamps.pop(where, None)
    if lost:
        code.versions.clear()
