"""Past one broker: a client with a pool -> endpoint map sends every request to the broker of its
pool (dspex.client.routing), both client kinds; ``dspexctl`` shows every broker of the map.

The map's parsing and the merge of several brokers' answers are pure logic (fast tests); the rest
runs two real brokers on one machine, each with its own run directory, pools and workers, and
checks where calls and sessions land with each broker's own status.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dspex
import dspex.aio
from dspex.client.config import ClientConfig
from dspex.client.endpoints import Broker, broker_map
from dspex.client.routing import merge
from dspex.client.sync import RoutedClient
from dspexctl.keys import generate
from tests.harness import Stack, Workspace, base_env, free_port, wait_for
from tests.harness.supervisord import SupervisedStack
from tests.test_ops_python import small_conf_text

pytestmark = pytest.mark.timeout(120)


# -- the map ---------------------------------------------------------------------------------------
def test_the_endpoints_text_maps_pools_to_brokers(monkeypatch: pytest.MonkeyPatch) -> None:
    text = " triage_pool=ipc:///tmp/dx-a/f.sock, analytics_pool=ipc:///tmp/dx-a/f.sock,\n*=tcp://b:5555;server_key=/k/b.key "
    brokers = broker_map(ClientConfig.from_env(), endpoints=text)
    assert brokers.several
    assert [b.endpoint for b in brokers.brokers] == ["ipc:///tmp/dx-a/f.sock", "tcp://b:5555"]
    assert brokers.broker_for("analytics_pool").endpoint == "ipc:///tmp/dx-a/f.sock"
    assert brokers.broker_for("other").server_key == "/k/b.key"
    assert brokers.pools_of("ipc:///tmp/dx-a/f.sock") == ["triage_pool", "analytics_pool"]
    assert brokers.serves("tcp://b:5555", "other") and not brokers.serves("tcp://b:5555", "triage_pool")
    # the environment, and what wins over it
    monkeypatch.setenv("DSPEX_ENDPOINTS", text)
    assert broker_map(ClientConfig.from_env()).routes == brokers.routes
    assert not broker_map(ClientConfig.from_env(), "ipc:///tmp/x/f.sock").several
    assert broker_map(ClientConfig.from_env(), endpoints={"p": "ipc:///tmp/y/f.sock"}).broker_for("p").endpoint == "ipc:///tmp/y/f.sock"
    monkeypatch.setenv("DSPEX_ENDPOINT", "ipc:///tmp/x/f.sock")
    with pytest.raises(dspex.ConfigError, match="both set"):
        broker_map(ClientConfig.from_env())
    monkeypatch.delenv("DSPEX_ENDPOINTS")
    assert broker_map(ClientConfig.from_env()).brokers == [Broker("ipc:///tmp/x/f.sock")]


@pytest.mark.parametrize("endpoints, error", [
    ("triage_pool", "is not POOL=ENDPOINT"),
    ("p=ipc:///a/f.sock,p=ipc:///b/f.sock", "pool p is named twice"),
    ("p=http://host", "unsupported endpoint"),
    ("p=ipc:///a/f.sock;server_key=/k", "for tcp:// brokers"),
    ("p=tcp://h:1;server_key=/k,q=tcp://h:1", "different CURVE key files"),
    ("p=tcp://h:1;password=x", "is not server_key=FILE"),
    ("a b=ipc:///a/f.sock", "is not a pool name"),
    (" , ", "names no broker"),
    ({}, "names no broker"),
])
def test_a_bad_map_is_a_config_error(endpoints: Any, error: str) -> None:
    with pytest.raises(dspex.ConfigError, match=error):
        broker_map(ClientConfig.from_env(), endpoints=endpoints)
    with pytest.raises(dspex.ConfigError, match="not both"):
        broker_map(ClientConfig.from_env(), "ipc:///a/f.sock", {"p": "ipc:///b/f.sock"})


def test_one_broker_is_the_plain_client_and_an_unknown_pool_is_refused_before_sending(short_tmp: str) -> None:
    """A map of one broker is today's client; with several, a pool the map sends nowhere is a
    typed error raised by the client itself: nothing listens at these endpoints, so anything
    sent would have been BrokerUnreachable."""
    one = f"ipc://{short_tmp}/a.sock"
    with dspex.connect(endpoints={"*": one}) as client:
        assert type(client) is dspex.Client and client.endpoint == one and client.endpoints == {"*": one}
    with dspex.connect(endpoints={"p": one, "q": one}) as client:  # names its pools: no other goes there
        assert isinstance(client, RoutedClient) and client.endpoints == {"p": one, "q": one}
        with pytest.raises(dspex.PoolNotFound, match="no broker for pool 'r'"):
            client.session("r")
    two = {"alpha": f"ipc://{short_tmp}/a.sock", "beta": f"ipc://{short_tmp}/b.sock"}
    with dspex.connect(endpoints=two) as dx:
        assert isinstance(dx, RoutedClient) and dx.endpoint == ""
        with pytest.raises(dspex.PoolNotFound, match="no broker for pool 'gamma' in the endpoint map"):
            dx.session("gamma")
        with pytest.raises(dspex.PoolNotFound, match="nothing was sent"):
            dx.call("os", "getpid", pool="gamma")
        with pytest.raises(dspex.BrokerUnreachable, match="b.sock"):
            dx.session("beta").call("os", "getpid")

    async def main() -> None:
        async with dspex.aio.connect(endpoints=two) as adx:
            assert isinstance(adx, dspex.client.aio.RoutedAsyncClient)
            pending = adx.call("os", "getpid", pool="gamma")  # raises where it is awaited, as every op
            with pytest.raises(dspex.PoolNotFound):
                await pending

    asyncio.run(main())


def test_several_brokers_answers_merge_saying_where_each_part_came_from() -> None:
    brokers = broker_map(ClientConfig.from_env(), endpoints="alpha=ipc:///a/f.sock,*=ipc:///b/f.sock")
    status_a = {"broker": {"pid": 1}, "pools": {"alpha": {"sessions": 1}, "beta": {"sessions": 9}}, "events": []}
    down = dspex.BrokerUnreachable("nothing is listening at ipc:///b/f.sock")
    merged = merge("status", {"ipc:///a/f.sock": status_a, "ipc:///b/f.sock": down}, brokers)
    # beta is the other broker's pool for this client: a's beta is not the one it would reach
    assert merged["pools"] == {"alpha": {"sessions": 1, "endpoint": "ipc:///a/f.sock"}}
    assert merged["brokers"] == {"ipc:///a/f.sock": {**status_a, "pools": ["alpha", "beta"]},
                                 "ipc:///b/f.sock": {"error": {"code": "broker_unreachable", "message": down.message}}}
    sessions = {"ipc:///a/f.sock": [{"id": "s1"}], "ipc:///b/f.sock": [{"id": "s2"}]}
    assert merge("sessions", sessions, brokers) == [{"id": "s1", "endpoint": "ipc:///a/f.sock"},
                                                    {"id": "s2", "endpoint": "ipc:///b/f.sock"}]
    with pytest.raises(dspex.BrokerUnreachable):
        merge("sessions", {**sessions, "ipc:///b/f.sock": down}, brokers)
    with pytest.raises(dspex.BrokerUnreachable):
        merge("ping", {"ipc:///a/f.sock": {"pong": True}, "ipc:///b/f.sock": down}, brokers)
    closed = {"ipc:///a/f.sock": down, "ipc:///b/f.sock": {"closed": True, "released": True}}
    assert merge("close_session", closed, brokers) == {"closed": True, "released": True,
                                                       "endpoint": "ipc:///b/f.sock"}
    nowhere = {"ipc:///a/f.sock": {"closed": False, "released": False}, "ipc:///b/f.sock": down}
    with pytest.raises(dspex.BrokerUnreachable):  # it may be the session of the broker that did not answer
        merge("close_session", nowhere, brokers)


# -- two brokers on one machine --------------------------------------------------------------------
@pytest.fixture
def brokers(request: pytest.FixtureRequest) -> Iterator[tuple[Stack, Stack]]:
    """Broker a with pool alpha, broker b with beta and gamma; one --no-dspy worker each pool."""
    ws = Workspace("dxr")
    a, b = Stack(ws, "a"), Stack(ws, "b")
    try:
        a.start_broker("alpha:strict_queue:size=1")
        b.start_broker("beta:strict_queue:size=1", "gamma:hint:size=1")
        for stack, pool in ((a, "alpha"), (b, "beta"), (b, "gamma")):
            stack.start_worker(pool, "--no-dspy")
        for stack, pool in ((a, "alpha"), (b, "beta"), (b, "gamma")):
            stack.wait_workers(pool, 1)
        yield a, b
    finally:
        a.close()
        b.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(ws.procs.logs())
        ws.close()


def pids(a: Stack, b: Stack) -> dict[str, int]:
    return {pool: stack.workers(pool)[0]["pid"] for stack, pool in ((a, "alpha"), (b, "beta"), (b, "gamma"))}


def session_ids(stack: Stack) -> set[str]:
    with dspex.connect(stack.frontend, timeout=5) as c:
        return {s["id"] for s in c.sessions()}


def test_calls_and_sessions_go_to_the_broker_of_their_pool(brokers: tuple[Stack, Stack]) -> None:
    a, b = brokers
    pid = pids(a, b)
    with dspex.connect(endpoints={"alpha": a.frontend, "*": b.frontend}, timeout=20) as dx:
        assert isinstance(dx, RoutedClient) and dx.endpoint == b.frontend
        sa, sb, sg = dx.session("alpha"), dx.session("beta"), dx.session("gamma")
        assert [s.call("os", "getpid") for s in (sa, sb, sg)] == [pid["alpha"], pid["beta"], pid["gamma"]]
        assert dx.call("os", "getpid", pool="beta") == pid["beta"]  # outside a session too
        assert dx.submit(dx.call, "os", "getpid", pool="alpha").result(20) == pid["alpha"]
        ns = sa.call("types", "SimpleNamespace", kwargs={"value": 7})
        assert ns.value == 7  # a ref's handle calls through its session's broker
        # each broker holds its own pools' sessions, and only those
        assert session_ids(a) == {sa.id} and session_ids(b) == {sb.id, sg.id}
        # client-level views: every broker, each part saying which broker it came from
        status = dx.status()
        assert {name: p["endpoint"] for name, p in status["pools"].items()} == {
            "alpha": a.frontend, "beta": b.frontend, "gamma": b.frontend}
        assert status["pools"]["alpha"]["sessions"] == 1 and status["pools"]["gamma"]["sessions"] == 1
        assert {ep: part["broker"]["pid"] for ep, part in status["brokers"].items()} == {
            a.frontend: a.broker.pid if a.broker else 0, b.frontend: b.broker.pid if b.broker else 0}
        assert status["brokers"][b.frontend]["pools"] == ["beta", "gamma"]
        assert dx.status(pool="alpha")["broker"]["pid"] == status["brokers"][a.frontend]["broker"]["pid"]
        assert set(dx.ping()["brokers"]) == {a.frontend, b.frontend}
        assert dx.ping(pool="gamma")["frontend"] == b.frontend
        assert sorted((s["id"], s["endpoint"]) for s in dx.sessions()) == sorted(
            [(sa.id, a.frontend), (sb.id, b.frontend), (sg.id, b.frontend)])
        assert [s["id"] for s in dx.sessions("beta")] == [sb.id]
        # closing: a session's close goes to its broker; an id alone is found on its broker
        sa.close()
        assert session_ids(a) == set()
        assert dx.close_session(sg.id)["endpoint"] == b.frontend
        assert session_ids(b) == {sb.id}
        assert dx.close_session(sg.id) == {"closed": False, "released": False}
        gamma = [w["incarnation"] for w in b.workers("gamma")]
        assert dx.recycle("gamma")["recycling"] == gamma


def test_the_asyncio_client_routes_alike(brokers: tuple[Stack, Stack]) -> None:
    a, b = brokers
    pid = pids(a, b)

    async def main() -> None:
        async with dspex.aio.connect(endpoints=f"alpha={a.frontend},beta={b.frontend},gamma={b.frontend}",
                                     timeout=20) as dx:
            assert isinstance(dx, dspex.client.aio.RoutedAsyncClient)
            sessions = [dx.session(pool) for pool in ("alpha", "beta", "gamma", "alpha")]
            got = await asyncio.gather(*(s.call("os", "getpid") for s in sessions),
                                       dx.call("os", "getpid", pool="gamma"))
            assert got == [pid["alpha"], pid["beta"], pid["gamma"], pid["alpha"], pid["gamma"]]
            status = await dx.status()
            assert status["pools"]["alpha"]["sessions"] == 2 and status["pools"]["beta"]["endpoint"] == b.frontend
            listed = await dx.sessions()
            assert sorted((s["id"], s["endpoint"]) for s in listed) == sorted(
                (s.id, a.frontend if s.pool == "alpha" else b.frontend) for s in sessions)
            ids = await asyncio.to_thread(lambda: (session_ids(a), session_ids(b)))
            assert ids == ({sessions[0].id, sessions[3].id}, {sessions[1].id, sessions[2].id})
            await sessions[0].close()
            assert (await dx.close_session(sessions[1].id))["endpoint"] == b.frontend
            with pytest.raises(dspex.PoolNotFound, match="endpoint map"):
                dx.session("delta")
            assert await asyncio.to_thread(session_ids, a) == {sessions[3].id}

    asyncio.run(main())


def test_a_broker_down_fails_only_its_own_pools_calls(brokers: tuple[Stack, Stack]) -> None:
    a, b = brokers
    endpoints = {"alpha": a.frontend, "*": b.frontend}
    with dspex.connect(endpoints=endpoints, timeout=10) as dx:
        sa, sb = dx.session("alpha"), dx.session("beta")
        assert (sa.eval("1"), sb.eval("2")) == (1, 2)
        gamma = pids(a, b)["gamma"]
        assert a.broker is not None
        a.kill(a.broker)
        # as with one broker: typed at once, or after the call's deadline while the client waits
        # a few seconds for a broker that went away to come back (a restart)
        with pytest.raises((dspex.ConnectionError, dspex.Timeout)):
            sa.eval("1", timeout=1)
        assert sb.eval("3") == 3 and dx.call("os", "getpid", pool="gamma") == gamma
        assert dx.session("gamma").eval("4") == 4
        status = dx.status(timeout=2)
        assert sorted(status["pools"]) == ["beta", "gamma"]
        assert status["brokers"][a.frontend]["error"]["code"] in ("broker_unreachable", "connection_lost", "timeout")
        assert "pid" in status["brokers"][b.frontend]["broker"]
        with pytest.raises((dspex.ConnectionError, dspex.Timeout), match=a.frontend.removeprefix("ipc://")):
            dx.sessions(timeout=2)  # all of them cannot be listed
        assert [s["id"] for s in dx.sessions("beta")] == [sb.id]

    async def main() -> None:
        async with dspex.aio.connect(endpoints=endpoints, timeout=10) as adx:
            with pytest.raises(dspex.ConnectionError):
                await adx.session("alpha").eval("1", timeout=1)
            assert await adx.session("beta").eval("5") == 5
            assert "error" in (await adx.status(timeout=2))["brokers"][a.frontend]

    asyncio.run(main())


def test_tcp_brokers_each_with_its_own_keys(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CURVE brokers on TCP, each with its own key pair and allow-list: the map's entries name
    each broker's public key and this client's key for it; a broker's key given for the other is
    that broker's refusal only."""
    monkeypatch.delenv("DSPEX_CURVE_SERVER_KEY", raising=False)
    monkeypatch.delenv("DSPEX_CURVE_CLIENT_KEY", raising=False)
    ws = Workspace("dxr")
    stacks = {"a": Stack(ws, "a"), "b": Stack(ws, "b")}
    try:
        keys = {}
        for name, stack in stacks.items():
            written = keys[name] = generate(Path(ws.root, f"k{name}"))
            stack.frontend, stack.backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            stack.env.update(DSPEX_CURVE_SERVER_KEY=str(written["broker"].with_suffix(".key")),
                             DSPEX_CURVE_WORKER_KEY=str(written["worker"]))
            stack.start_broker(f"{name}pool:strict_queue", extra=["--curve-secret-key", str(written["broker"]),
                                                                  "--curve-allowed", str(written["allowed"])])
            stack.start_worker(f"{name}pool", "--no-dspy")

        def entry(pool: str, broker: str, client: str) -> str:
            return (f"{pool}={stacks[broker].frontend};server_key={keys[broker]['broker'].with_suffix('.key')}"
                    f";client_key={keys[client]['client']}")

        with dspex.connect(endpoints=f"{entry('apool', 'a', 'a')},{entry('bpool', 'b', 'b')}", timeout=20) as dx:
            wait_for(lambda: all(dx.status()["pools"][p]["workers"] for p in ("apool", "bpool")), 20,
                     what="both workers")
            assert [dx.session(p).eval("6 * 7") for p in ("apool", "bpool")] == [42, 42]
            assert dx.status()["brokers"].keys() == {stacks["a"].frontend, stacks["b"].frontend}
        # b's entry with a client key that only broker a allows: b refuses it, a serves on
        with dspex.connect(endpoints=f"{entry('apool', 'a', 'a')},{entry('bpool', 'b', 'a')}", timeout=5) as dx:
            assert dx.session("apool").eval("1") == 1
            with pytest.raises(dspex.Refused):
                dx.session("bpool").eval("1")
    finally:
        for stack in stacks.values():
            stack.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(ws.procs.logs())
        ws.close()


# -- dspexctl --------------------------------------------------------------------------------------
def dspexctl(endpoints: str, cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = base_env(DSPEX_ENDPOINTS=endpoints)
    res = subprocess.run([sys.executable, "-m", "dspexctl", "--timeout", "3", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_dspexctl_shows_every_broker_of_the_map(brokers: tuple[Stack, Stack]) -> None:
    a, b = brokers
    endpoints = f"alpha={a.frontend},*={b.frontend}"
    cwd = a.root  # no supervisor.conf here: the brokers, started by hand, have none either
    with dspex.connect(endpoints=endpoints, timeout=20) as dx:
        sa, sb = dx.session("alpha"), dx.session("beta")
        assert (sa.eval("1"), sb.eval("2")) == (1, 2)

        res = dspexctl(endpoints, cwd, "pools", "status")
        assert res.returncode == 0, res.stdout + res.stderr
        sections = res.stdout.split("\n\n")
        assert sections[0].startswith(f"broker {a.frontend} (alpha)\nPOOL")
        assert sections[1].startswith(f"broker {b.frontend} (*)\nPOOL")
        assert sections[-1] == "2 brokers: OK\n"
        assert "alpha" in sections[0] and "beta" not in sections[0] and "beta" in sections[1]
        doc = json.loads(dspexctl(endpoints, cwd, "pools", "status", "--json").stdout)
        assert doc["health"] == "ok"
        assert [(p["endpoint"], p["routes"], [q["name"] for q in p["pools"]]) for p in doc["brokers"]] == [
            (a.frontend, ["alpha"], ["alpha"]), (b.frontend, ["*"], ["beta", "gamma"])]
        assert doc["brokers"][0]["broker"]["pid"] == (a.broker.pid if a.broker else 0)
        one = json.loads(dspexctl(endpoints, cwd, "pools", "status", "gamma", "--json").stdout)
        assert [p["endpoint"] for p in one["brokers"]] == [b.frontend]

        res = dspexctl(endpoints, cwd, "sessions", "list")
        assert res.returncode == 0, res.stderr
        header, *rows = res.stdout.splitlines()
        assert header.split()[:3] == ["SESSION", "POOL", "BROKER"]
        assert sorted(r.split()[:3] for r in rows) == sorted([[sa.id, "alpha", a.frontend], [sb.id, "beta", b.frontend]])

        # a broker that cannot be asked: its section says so, the other still shows; exit 4
        assert b.broker is not None
        b.kill(b.broker)
        res = dspexctl(endpoints, cwd, "pools", "status")
        assert res.returncode == 4, res.stdout + res.stderr
        assert f"UNREACHABLE: broker unreachable: nothing is listening at {b.frontend}" in res.stdout.split("\n\n")[1]
        doc = json.loads(dspexctl(endpoints, cwd, "pools", "status", "--json").stdout)
        assert (doc["health"], [p["health"] for p in doc["brokers"]]) == ("unreachable", ["ok", "unreachable"])
        res = dspexctl(endpoints, cwd, "sessions", "list")
        assert res.returncode == 4, res.stdout + res.stderr
        assert sa.id in res.stdout and f"UNREACHABLE: broker {b.frontend}: nothing is listening" in res.stdout
        res = dspexctl(endpoints, cwd, "sessions", "close", sa.id[:10])
        assert res.returncode == 4 and f"closed {sa.id}" in res.stdout, res.stdout + res.stderr
        assert session_ids(a) == set()
        # the broker back (its workers register again), and a pool down on the other: exit 5
        b.start_broker()
        b.wait_workers("beta", 1)
        b.wait_workers("gamma", 1)
        a.kill(a.workers("alpha")[0]["pid"])
        wait_for(lambda: not a.workers("alpha"), 10, what="alpha's worker dropped")
        res = dspexctl(endpoints, cwd, "pools", "status")
        assert res.returncode == 5 and "DOWN: alpha has no ready worker" in res.stdout, res.stdout
        assert res.stdout.endswith("2 brokers: DOWN\n")
        # a pool the map sends nowhere is the operator's mistake
        res = dspexctl(f"alpha={a.frontend},beta={b.frontend}", cwd, "workers", "recycle", "gamma")
        assert res.returncode == 2 and "no broker for pool 'gamma'" in res.stderr, res.stderr


def test_a_map_of_one_broker_is_shown_as_that_map_says(brokers: tuple[Stack, Stack]) -> None:
    """A map naming one broker is a map, not ``--endpoint``: ``pools status`` shows that broker's
    section with the pools the map names for it (not the rows of ./supervisor.conf), ``sessions
    list`` its BROKER column, and a pool the map sends nowhere is the operator's mistake."""
    a, _ = brokers
    cwd = tempfile.mkdtemp(dir=a.root)
    Path(cwd, "supervisor.conf").write_text(small_conf_text({"triage_pool": 1}))  # another stack's: not this map's
    gone = f"ipc://{cwd}/nonexist/f.sock"
    res = dspexctl(f"p={gone}", cwd, "pools", "status")
    assert res.returncode == 4, res.stdout + res.stderr
    assert res.stdout.startswith(f"broker {gone} (p)\nPOOL"), res.stdout
    assert "triage_pool" not in res.stdout and res.stdout.endswith("1 broker: UNREACHABLE\n"), res.stdout
    assert [line.split()[-1] for line in res.stdout.splitlines() if line.startswith("p ")] == ["UNKNOWN"], res.stdout

    endpoints = f"alpha={a.frontend}"
    with dspex.connect(endpoints=endpoints, timeout=20) as dx:
        session = dx.session("alpha")
        assert session.eval("1") == 1
        res = dspexctl(endpoints, cwd, "pools", "status")
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.startswith(f"broker {a.frontend} (alpha)\nPOOL"), res.stdout
        assert "triage_pool" not in res.stdout and res.stdout.endswith("1 broker: OK\n"), res.stdout
        doc = json.loads(dspexctl(endpoints, cwd, "pools", "status", "--json").stdout)
        assert [(p["endpoint"], [q["name"] for q in p["pools"]]) for p in doc["brokers"]] == [(a.frontend, ["alpha"])]
        res = dspexctl(endpoints, cwd, "sessions", "list")
        assert res.returncode == 0, res.stdout + res.stderr
        header, *rows = res.stdout.splitlines()
        assert header.split()[:3] == ["SESSION", "POOL", "BROKER"]
        assert [r.split()[:3] for r in rows] == [[session.id, "alpha", a.frontend]]
    res = dspexctl(endpoints, cwd, "workers", "recycle", "gamma")
    assert res.returncode == 2 and "no broker for pool 'gamma'" in res.stderr, res.stderr


def test_a_pool_whose_broker_is_down_is_unknown_not_missing(brokers: tuple[Stack, Stack]) -> None:
    """The map names the pools of a broker that cannot be asked: they are its section's rows,
    UNKNOWN, and asking for one of them is that broker's UNREACHABLE (exit 4), not a pool that does
    not exist (exit 2). A pool the map sends to a broker that has no such pool is DOWN, said."""
    a, b = brokers
    cwd = a.root
    res = dspexctl(f"alpha={a.frontend},delta={a.frontend},*={b.frontend}", cwd, "pools", "status")
    assert res.returncode == 5, res.stdout + res.stderr
    assert (f"DOWN: the endpoint map sends pool delta to {a.frontend}, whose broker has no pool delta "
            "(its pools: alpha): its calls get pool_not_found") in res.stdout.split("\n\n")[0], res.stdout
    assert b.broker is not None
    b.kill(b.broker)
    endpoints = f"alpha={a.frontend},beta={b.frontend},gamma={b.frontend}"
    for args in (["pools", "status", "beta"], ["pools", "status"]):
        res = dspexctl(endpoints, cwd, *args)
        assert res.returncode == 4, res.stdout + res.stderr
        section = res.stdout.split("\n\n")[-2 if args == ["pools", "status"] else 0]
        rows = {line.split()[0]: line.split()[-1] for line in section.splitlines()[2:] if line.split()[0] in
                ("beta", "gamma")}
        assert rows == ({"beta": "UNKNOWN"} if "beta" in args else {"beta": "UNKNOWN", "gamma": "UNKNOWN"}), res.stdout
        assert f"UNREACHABLE: broker unreachable: nothing is listening at {b.frontend}" in section
        doc = json.loads(dspexctl(endpoints, cwd, *args, "--json").stdout)
        part = doc["brokers"][-1]
        assert (doc["health"], part["endpoint"], [(p["name"], p["health"]) for p in part["pools"]]) == (
            "unreachable", b.frontend, [("beta", "unknown")] + ([("gamma", "unknown")] if "beta" not in args else []))
    # a broker the map reaches only through '*': nothing to list, and no table header over nothing
    res = dspexctl(f"alpha={a.frontend},*={b.frontend}", cwd, "pools", "status")
    assert res.returncode == 4, res.stdout
    assert res.stdout.split("\n\n")[1].splitlines()[1].startswith("UNREACHABLE: "), res.stdout
    res = dspexctl(f"alpha={a.frontend},*={b.frontend}", cwd, "pools", "status", "beta")
    assert res.returncode == 4 and "UNREACHABLE: broker unreachable" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dspexctl_joins_each_broker_with_its_own_supervisord(short_tmp: str) -> None:
    """The operator's layout (docs/operations.md, "More than one broker"): two stacks, each its
    own supervisor.conf and run directory, and one map. Each broker's section is joined with the
    supervisord of the conf it was started with (found through the broker), and the commands
    about one pool reach that pool's stack through the map alone."""
    stacks = [SupervisedStack(small_conf_text({"triage_pool": 1})),
              SupervisedStack(small_conf_text({"analytics_pool": 1}))]
    try:
        for stack in stacks:
            stack.start_foreground()
        a, b = stacks

        def ready() -> bool:
            return bool(a.processes() and b.processes() and a.ready("triage_pool") and b.ready("analytics_pool"))

        wait_for(ready, 120, 0.1, "both stacks ready")
        endpoints = f"triage_pool={a.endpoint},*={b.endpoint}"
        cwd = short_tmp  # no supervisor.conf here: each stack's comes from its broker

        doc = json.loads(dspexctl(endpoints, cwd, "pools", "status", "-v", "--json").stdout)
        assert doc["health"] == "ok", doc
        assert [(p["supervisor"]["conf"], [q["name"] for q in p["pools"]]) for p in doc["brokers"]] == [
            (str(a.conf), ["triage_pool"]), (str(b.conf), ["analytics_pool"])]
        assert [p["pools"][0]["workers"][0]["process"] for p in doc["brokers"]] == [
            "triage_pool:triage_pool_00", "analytics_pool:analytics_pool_00"]

        # a pool's command goes to its stack: the SIGKILL through that broker's supervisord
        old = b.ready("analytics_pool")[0]["pid"]
        res = dspexctl(endpoints, cwd, "workers", "recycle", "analytics_pool", "--hard", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout)["recycled"][0]["old_pid"] == old
        assert b.ready("analytics_pool")[0]["pid"] != old

        # a stopped pool of one stack: its section is DOWN, the other stays OK
        b.rpc("supervisor.stopProcessGroup", "analytics_pool", True)
        res = dspexctl(endpoints, cwd, "pools", "status")
        assert res.returncode == 5, res.stdout + res.stderr
        first, second = res.stdout.split("\n\n")[:2]
        assert first.startswith(f"broker {a.endpoint} (triage_pool)") and "OK" in first and "DOWN" not in first
        assert "DOWN: analytics_pool has no ready worker" in second and "supervisord: RUNNING" in second
    finally:
        for stack in stacks:
            stack.stop()
            stack.cleanup()
