"""The binding versions of a session (pure logic): what a request relies on and brings a worker's
store to (dspex.client.sendcache.SendCache.commit), and when the store refuses a request
(dspex.wire.codestore.check_held). The real hint pool: test_session_threads."""

from __future__ import annotations

import types
from typing import Any

import pytest

from dspex.client.sendcache import SendCache
from dspex.wire import codestore
from dspex.wire.errors import CodeCacheMiss


def request(bindings: dict[tuple[str, str], tuple[Any, str]]) -> Any:
    """A request's encoding that carries ``bindings`` and defines nothing."""
    return types.SimpleNamespace(new_keys={}, defined=set(), used=set(), namespaces=set(), sources={},
                                 settings_sent=None, restated=[], cells={}, holders={},
                                 globals=types.SimpleNamespace(bindings=bindings, walks={}, cells_rebound=[]))


def versions(cache: SendCache, bindings: dict[tuple[str, str], tuple[Any, str]]) -> tuple[int, int]:
    sent = cache.commit(request(bindings), [])
    assert sent is not None
    return sent[1], sent[2]


def test_each_change_of_a_binding_takes_the_next_version() -> None:
    cache = SendCache()
    one, two = object(), object()
    assert versions(cache, {("m:a", "X"): (one, "k1"), ("m:a", "Y"): (one, "k1")}) == (0, 2)
    assert versions(cache, {}) == (2, 2)  # a steady request relies on every binding held
    assert versions(cache, {("m:a", "X"): (one, "k1")}) == (2, 2)  # sent again unchanged: no change
    assert versions(cache, {("m:a", "X"): (two, "k2")}) == (2, 3)  # relies on Y (2), brings X to 3
    assert versions(cache, {}) == (3, 3)


def test_a_binding_sent_again_after_a_miss_keeps_its_version() -> None:
    """A worker that held it is not refused because another worker missed; one that missed is
    sent every binding changed since the version it holds."""
    cache = SendCache()
    one, two = object(), object()
    assert versions(cache, {("m:a", "X"): (one, "k1"), ("m:a", "Y"): (two, "k2")}) == (0, 2)
    assert cache.changed_since(1) == [(("m:a", "Y"), two)]
    cache.missed(False)
    assert versions(cache, {}) == (2, 2)  # every binding of the session, held or not by the client's count
    assert versions(cache, {("m:a", "X"): (one, "k1")}) == (2, 2)
    assert cache.changed_since(0) == [(("m:a", "X"), one), (("m:a", "Y"), two)]
    cache.missed(True)  # a none pool: nothing to catch up on
    assert cache.changed_since(0) == []


def test_a_store_behind_the_version_a_request_relies_on_refuses_it() -> None:
    store = codestore.CodeStore()
    store.bound[("m:a", "X")] = "k1"
    store.reached("a", 0, 1)
    with codestore.loading(store, client="a"):
        codestore.check_held(1)
        with pytest.raises(CodeCacheMiss):
            codestore.check_held(2)  # the change to version 2 ran on another worker
    store.reached("a", 2, 3)  # a request the store could not have been checked for does not advance it
    assert store.versions == {"a": 1}
    store.reached("a", 1, 3)
    assert store.versions == {"a": 3}
    store.reached("a", 0, 2)  # an older request loaded late
    assert store.versions == {"a": 3}


def test_another_clients_versions_say_nothing_of_a_clients_own() -> None:
    """Two clients of one session (a parent and its forked child, two session objects on one id)
    number their binding changes apart: a store far along in one's refuses the other's request
    that relies on a change of its own the store lacks, and says how far it is in that one's."""
    store = codestore.CodeStore()
    store.bound[("m:a", "X")] = "a.1"
    store.reached("a", 0, 100)
    store.reached("b", 0, 2)
    with codestore.loading(store, client="b"), pytest.raises(CodeCacheMiss) as miss:
        codestore.check_held(3)
    assert miss.value.details["version"] == 2
    with codestore.loading(store, client="a"):
        codestore.check_held(100)


def test_a_forked_childs_count_starts_at_its_nearest_known_ancestors_as_far_as_the_fork() -> None:
    """Its bindings up to the fork are the ancestor's: a store that holds the ancestor's up to
    there holds the child's, and does not refuse its first call (whose catch-up would send every
    global it inherited again, each as it was at the fork, over the ancestor's later rebinding)."""
    store = codestore.CodeStore()
    store.reached("parent", 0, 40)
    store.inherit("child", [("parent", 30)])  # forked at 30; the parent went on to 40
    store.inherit("late", [("parent", 50)])  # the store has not loaded the parent's 41..50
    store.inherit("grandchild", [("unknown", 60), ("parent", 35)])  # its parent never reached this store
    store.inherit("orphan", [("unknown", 60)])
    assert store.versions == {"parent": 40, "child": 30, "late": 40, "grandchild": 35}
    store.reached("child", 30, 31)
    store.inherit("child", [("parent", 30)])  # known: its own count stands
    assert store.versions["child"] == 31


def test_an_empty_store_refuses_a_request_that_relies_on_what_the_session_holds() -> None:
    with codestore.loading(codestore.CodeStore()), pytest.raises(CodeCacheMiss):
        codestore.check_held(0)


def test_the_bindings_of_a_request_the_worker_could_not_load_are_not_caught_up_on() -> None:
    """A global needing a package the worker lacks fails its call; the calls after it do not
    carry it to catch up (each would fail alike)."""
    cache = SendCache()
    ok, lacking = object(), object()
    assert versions(cache, {("m:a", "X"): (ok, "k1")}) == (0, 1)
    sent = cache.commit(request({("m:a", "MOD"): (lacking, "k2")}), [])
    assert sent is not None and sent[1:] == (1, 2)
    cache.missed(False, sent[0])
    assert cache.changed_since(0) == [(("m:a", "X"), ok)]


def test_a_binding_of_an_older_request_never_replaces_a_newer_one() -> None:
    """Requests of one session reach the worker in another order than the client committed them
    (two threads): each binding stays the one of the latest request that carried its name. Two
    clients of the session (a parent and its forked child) count versions apart: the binding that
    arrives last wins."""
    store = codestore.CodeStore()

    def load(client: str, version: int, value: int) -> None:
        with codestore.loading(store, client=client, at=version):
            key = codestore._load_binding_key("m:a", "X", f"{client}.{value}")
            codestore._load_bindings([("m:a", "X", key, value)])

    load("a", 3, 3)
    load("a", 2, 2)  # committed before the request of 3, loaded after it
    assert store.modules["m:a"].X == 3 and store.bound[("m:a", "X")] == "a.3"
    load("a", 4, 4)
    assert store.modules["m:a"].X == 4
    load("b", 1, 5)  # another client's numbering
    assert store.modules["m:a"].X == 5
    load("a", 5, 6)
    assert store.modules["m:a"].X == 6


def test_a_request_that_uses_a_held_context_variable_sends_its_value_after_another_threads_miss() -> None:
    """Another thread's call that missed on the worker forgets what the worker holds; a request
    encoded before that, which refers to a ContextVar global by key, still runs with its thread's
    value (it ran with the variable's default: test_session_threads' 16 threads, once in ~17 runs)."""
    import contextvars

    cache = SendCache()
    var: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST")
    defining = request({("m:a", "REQUEST"): (var, "k1")})
    defining.new_keys, defining.defined = {id(var): (var, "k1")}, {"k1"}
    assert cache.commit(defining, []) is not None
    using = request({})
    using.used = {"k-fn"}  # a held function that reads the variable as its global: only its own key
    var.set("r1")
    cache.missed(False)
    assert cache.context_values(using) == {"k1": (var, "r1")}
