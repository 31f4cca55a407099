"""One user API for the blocking and the asyncio client (dspex/client/api.py): the same methods with the
same parameters, the same constructor options, the same close semantics and a Rehydrator for
both, checked on the classes and through real broker and worker processes."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

import dspex
import dspex.aio
from tests.harness import Stack, wait_for
from tests.test_security import curve_stack

pytestmark = pytest.mark.timeout(120)

# what only one transport has: the blocking client's thread pool (the asyncio stream's awaitable
# close, the blocking one's ``close``, is the stream's)
SYNC_ONLY = {"submit"}
AIO_ONLY: set[str] = set()


def public(cls: type) -> dict[str, Any]:
    return {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")}


def parameters(fn: Any) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults of a callable's parameters (return annotations differ by kind)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_session_and_async_session_have_the_same_methods_with_the_same_parameters() -> None:
    sync, aio = public(dspex.Session), public(dspex.aio.AsyncSession)
    assert sync.keys() == aio.keys()
    assert {"run", "apply", "put", "define", "call", "method", "attr", "set_attr", "eval", "exec", "to_data",
            "release", "stream", "stream_method", "stream_eval", "stream_apply", "close"} <= sync.keys()
    for name, member in sync.items():
        assert parameters(member) == parameters(aio[name]), name
    # each kind has its own context manager, and no other's
    assert hasattr(dspex.Session, "__enter__") and not hasattr(dspex.Session, "__aenter__")
    assert hasattr(dspex.aio.AsyncSession, "__aenter__") and not hasattr(dspex.aio.AsyncSession, "__enter__")


def test_client_and_async_client_have_the_same_user_ops_options_and_connect() -> None:
    sync, aio = public(dspex.Client), public(dspex.aio.AsyncClient)
    assert sync.keys() - aio.keys() == SYNC_ONLY
    assert aio.keys() - sync.keys() == AIO_ONLY
    assert {"session", "call", "status", "ping", "sessions", "close_session", "recycle", "cancel_all", "request",
            "stream", "close"} <= sync.keys()
    for name in sync.keys() & aio.keys():  # every op either kind has, a new one included
        if callable(sync[name]):
            assert parameters(sync[name]) == parameters(aio[name]), name
    options = parameters(dspex.Client)
    assert [name for name, _, _ in options] == ["endpoint", "timeout", "curve_server_key", "curve_keypair",
                                                "forward_output", "client_settings"]
    assert parameters(dspex.aio.AsyncClient) == options
    # connect also takes a map of several brokers (dspex.client.routing)
    assert parameters(dspex.connect) == parameters(dspex.aio.connect)
    assert [name for name, _, _ in parameters(dspex.connect)] == ["endpoint", "timeout", "endpoints",
                                                                  *[name for name, _, _ in options[2:]]]
    routed, routed_aio = public(dspex.client.sync.RoutedClient), public(dspex.client.aio.RoutedAsyncClient)
    assert routed.keys() == sync.keys() and routed_aio.keys() == aio.keys()
    for name in sync.keys() & aio.keys():
        if callable(sync[name]):
            assert parameters(routed[name]) == parameters(sync[name]) == parameters(routed_aio[name]), name


def test_stream_and_async_stream_read_alike() -> None:
    sync, aio = public(dspex.Stream), public(dspex.aio.AsyncStream)
    assert sync.keys() - {"close"} == aio.keys() - {"aclose"}
    assert inspect.iscoroutinefunction(dspex.aio.AsyncStream.aclose)
    # each kind iterates and closes as its own kind of iterator does (``contextlib.closing`` /
    # ``aclosing`` take them), and no other's
    assert all(hasattr(dspex.Stream, name) for name in ("__iter__", "__next__", "__enter__", "__exit__"))
    assert all(hasattr(dspex.aio.AsyncStream, name) for name in ("__aiter__", "__anext__", "__aenter__", "__aexit__"))
    assert not any(hasattr(dspex.Stream, name) for name in ("__aiter__", "__aenter__"))
    assert not any(hasattr(dspex.aio.AsyncStream, name) for name in ("__iter__", "__enter__"))


def test_constructor_curve_keys_for_both_kinds(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys passed to ``connect`` (no environment) reach the broker from both kinds; one key per
    client: a session opened over one of its sockets is its own over the others."""
    written = curve_stack(stack)
    stack.start_worker("p", "--no-dspy")
    monkeypatch.delenv("DSPEX_CURVE_SERVER_KEY", raising=False)
    monkeypatch.delenv("DSPEX_CURVE_CLIENT_KEY", raising=False)
    server_public, _ = zmq.auth.load_certificate(Path(stack.root, "k", "broker.key"))
    keypair = zmq.auth.load_certificate(written["client"])
    assert keypair[1] is not None
    keys: dict[str, Any] = {"curve_server_key": server_public, "curve_keypair": (keypair[0], keypair[1])}
    with dspex.connect(stack.frontend, timeout=10, **keys) as dx:
        wait_for(lambda: len(dx.status()["pools"]["p"]["workers"]) == 1, what="worker registered")
        s = dx.session("p")
        assert s.eval("6 * 7") == 42
        # a second thread's request borrows another socket: same key, same owner
        assert dx.submit(s.eval, "7 * 6").result(20) == 42

    async def main() -> int:
        async with dspex.aio.connect(stack.frontend, timeout=10, **keys) as adx:
            return int(await adx.session("p").eval("6 * 7"))

    assert asyncio.run(main()) == 42
    # with only the server key, each client makes one key pair of its own
    with dspex.connect(stack.frontend, timeout=10, curve_server_key=server_public) as dx, \
            pytest.raises(dspex.Refused):  # not in the broker's allow-list
        dx.ping()


def test_close_semantics_are_the_same(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A session whose broker is gone closes without raising on both kinds: the failure is logged
    (its idle TTL releases it), and the session answers SessionClosed afterwards."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    assert s.eval("1") == 1

    async def pinned() -> dspex.aio.AsyncSession:
        adx = dspex.aio.connect(stack.frontend, timeout=5)
        a = adx.session("p")
        assert await a.eval("2") == 2
        return a

    async def close(a: dspex.aio.AsyncSession) -> None:
        try:
            await a.close(timeout=1)
            with pytest.raises(dspex.SessionClosed):
                await a.eval("1")
        finally:
            await a.client.close()

    loop = asyncio.new_event_loop()
    try:
        a = loop.run_until_complete(pinned())
        assert stack.broker is not None
        stack.kill(stack.broker)
        with caplog.at_level(logging.WARNING, logger="dspex.client"):
            s.close(timeout=1)
            loop.run_until_complete(close(a))
    finally:
        loop.close()
    closing = [r.getMessage() for r in caplog.records if "closing session" in r.getMessage()]
    assert len(closing) == 2 and {m.split()[2].rstrip(":") for m in closing} == {s.id[:8], a.id[:8]}, closing
    with pytest.raises(dspex.SessionClosed):
        s.eval("1")


def test_async_rehydrator_rebuilds_on_a_new_session(stack: Stack) -> None:
    """``dspex.aio.Rehydrator``: async rebuild, fn and on_rehydrate; after the worker dies the next
    run opens a new session, rebuilds there and retries once."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    events: list[str] = []

    async def rebuild(s: dspex.aio.AsyncSession) -> dict[str, Any]:
        return {"ns": await s.call("types", "SimpleNamespace", kwargs={"value": 42}),
                "pid": await s.call("os", "getpid")}

    async def use(s: dspex.aio.AsyncSession, objs: dict[str, Any]) -> tuple[int, int]:
        return await s.attr(objs["ns"], "value"), await s.call("os", "getpid")

    async def on_rehydrate(err: dspex.DspexError, new: dspex.aio.AsyncSession) -> None:
        events.append(err.code)

    async def main() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=20) as adx:
            rh: dspex.aio.Rehydrator[dict[str, Any]] = dspex.aio.Rehydrator(adx, "p", rebuild, on_rehydrate)
            assert await rh.start() is rh
            old_pid, old_session = rh.objects["pid"], rh.session.id
            assert await rh.run(use) == (42, old_pid)
            stack.kill(old_pid)
            stack.start_worker("p", "--no-dspy")
            await asyncio.to_thread(wait_for, lambda: [w["pid"] for w in stack.workers("p")] not in ([], [old_pid]),
                                    20, 0.05, "the replacement worker")
            value, pid = await rh.run(use)
            assert (value, rh.rehydrations, events) == (42, 1, ["session_worker_unavailable"])
            assert pid != old_pid and rh.session.id != old_session
            await rh.close()
            assert rh.session.closed

    asyncio.run(main())
    assert dspex.aio.Rehydrator is dspex.Rehydrator


def test_async_client_reaches_no_broker_only_when_it_sends(short_tmp: str) -> None:
    """Both kinds connect lazily: ``connect`` to a dead broker's socket file succeeds, the first
    request is BrokerUnreachable (did not run)."""
    import socket

    stale = Path(short_tmp, "stale.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()

    async def main() -> None:
        adx = dspex.aio.connect(f"ipc://{stale}", timeout=5)
        try:
            with pytest.raises(dspex.BrokerUnreachable):
                await adx.ping()
        finally:
            await adx.close()

    asyncio.run(main())
    with dspex.connect(f"ipc://{stale}", timeout=5) as dx, pytest.raises(dspex.BrokerUnreachable):
        dx.ping()


def test_async_cancel_all_stops_the_calls_and_streams_in_flight(stack: Stack, tmp_path: Path) -> None:
    """``AsyncClient.cancel_all()``, as ``Client.cancel_all()``: every call and stream in flight
    raises Cancelled where it is awaited and stops on its worker; later calls run as usual."""
    stack.env["DSPEX_HARD_GRACE"] = "60"
    stack.pool("p:strict_queue", 2, "--no-dspy")
    code = ("import os, time\n"
            "def slow(marker):\n    open(marker, 'w').close()\n    time.sleep(30)\n"
            "def gen(marker):\n    yield 0\n    slow(marker)\n    yield 1\n")
    markers = [tmp_path / "call", tmp_path / "stream"]

    async def main() -> float:
        async with dspex.aio.connect(stack.frontend, timeout=60) as adx:
            calling, streaming = adx.session("p"), adx.session("p")
            for s in (calling, streaming):
                await s.exec(code)
            call = asyncio.create_task(calling.eval(f"slow({str(markers[0])!r})"))
            items = streaming.stream_eval(f"gen({str(markers[1])!r})")
            assert await anext(items) == 0
            item = asyncio.create_task(anext(items))
            await asyncio.to_thread(wait_for, lambda: all(m.exists() for m in markers), 20, 0.02, "both to run")
            started = time.monotonic()
            adx.cancel_all()
            for task in (call, item):
                with pytest.raises(dspex.Cancelled, match="cancel_all"):
                    await task
            assert await asyncio.gather(calling.eval("1"), streaming.eval("2")) == [1, 2]  # both workers free
            return time.monotonic() - started

    assert asyncio.run(main()) < 3.0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_rehydrator_shared_by_concurrent_callers_rebuilds_once_per_lost_session(stack: Stack, kind: str) -> None:
    """A service keeps one Rehydrator per user and its requests run at once (threads of one
    blocking client, tasks of one asyncio client). When the worker dies, every caller gets its
    result from the one new session: none closes a session another just opened, none uses
    objects built for another session."""
    stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "4")
    callers = 10

    def rebuild(s: Any) -> Any:
        return {"box": s.put([])} if kind == "sync" else _async_rebuild(s)

    async def _async_rebuild(s: dspex.aio.AsyncSession) -> dict[str, Any]:
        return {"box": await s.put([])}

    def use(s: Any, objs: dict[str, Any]) -> Any:
        return s.method(objs["box"], "__len__")

    def kill_the_worker(pid: int) -> None:
        stack.kill(pid)
        stack.start_worker("p", "--no-dspy", "--capacity", "4")
        wait_for(lambda: [w["pid"] for w in stack.workers("p")] not in ([], [pid]), 20, 0.05, "the replacement worker")

    if kind == "sync":
        dx = stack.client(timeout=20)
        rh: dspex.Rehydrator[dict[str, Any]] = dspex.Rehydrator(dx, "p", rebuild)
        assert rh.run(use) == 0
        kill_the_worker(rh.session.call("os", "getpid"))
        with ThreadPoolExecutor(callers) as pool:
            outcomes = list(pool.map(lambda _: _outcome(lambda: rh.run(use)), range(callers)))
        assert rh.session.call("os", "getpid") and rh.run(use) == 0
    else:
        async def main() -> list[Any]:
            async with dspex.aio.connect(stack.frontend, timeout=20) as adx:
                arh: dspex.aio.Rehydrator[dict[str, Any]] = dspex.aio.Rehydrator(adx, "p", rebuild)
                assert await arh.run(use) == 0
                await asyncio.to_thread(kill_the_worker, await arh.session.call("os", "getpid"))
                done = await asyncio.gather(*(arh.run(use) for _ in range(callers)), return_exceptions=True)
                assert await arh.run(use) == 0
                return list(done)
        outcomes = asyncio.run(main())
    assert outcomes == [0] * callers, outcomes


def _outcome(call: Any) -> Any:
    try:
        return call()
    except dspex.DspexError as err:
        return err
