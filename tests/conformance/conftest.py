"""One stack (broker + workers) for the whole conformance suite, and the ``run`` fixture.

Pools: ``c1`` (2 workers of capacity 1: save/load across two workers), ``c4`` (1 worker of
capacity 4: settings isolation between threads), ``t`` (1 worker for the cases that raise
BaseExceptions and time out, so a bug there cannot spoil the other cases; its per-session ref
quota is small so a case can reach it), ``t4`` (1 worker of capacity 4 for timeouts in pool
threads).
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import shutil
import tempfile
from collections.abc import Iterator

import pytest

import dspex
from dspex.wire.protocol import HEARTBEAT_INTERVAL
from tests.conformance.harness import (
    INPROCESS,
    SESSION,
    AsyncInProcess,
    AsyncRunner,
    AsyncThroughSession,
    InProcess,
    Runner,
    ThroughSession,
    fresh_dspy_settings,
)
from tests.harness import Stack

REF_QUOTA = 50  # refs one session may hold on pool t's worker (a small quota to reach in a test)
POOLS = {"c1": ("c1:strict_queue", 2, ()), "c4": ("c4:strict_queue:capacity=4", 1, ("--capacity", "4")),
         "t": ("t:strict_queue", 1, ("--ref-cap", str(REF_QUOTA))),
         "t4": ("t4:strict_queue:capacity=4", 1, ("--capacity", "4"))}


@pytest.fixture(scope="package")
def cstack() -> Iterator[Stack]:
    root = tempfile.mkdtemp(prefix="dxc", dir="/tmp")
    empty = os.path.join(root, "empty")  # the workers' working directory: the cases' code reaches them by value
    os.mkdir(empty)
    # the product's heartbeat (1 s x 3), not the harness's 0.25 s: the suite compares results, and on
    # the shared 2-CPU machine (load 15-20) a worker running GEPA or BetterTogether was declared
    # crashed after 0.75 s without a heartbeat, failing a case that had nothing wrong
    st = Stack(root, heartbeat=HEARTBEAT_INTERVAL)
    try:
        st.start_broker(*(spec for spec, _, _ in POOLS.values()))
        for name, (_, n, args) in POOLS.items():
            for _ in range(n):
                st.start_worker(name, *args, cwd=empty)
        for name, (_, n, _) in POOLS.items():
            st.wait_workers(name, n, timeout=90)
        yield st
    finally:
        st.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="package")
def dx(cstack: Stack) -> dspex.Client:
    return cstack.client(timeout=60)


@pytest.fixture(autouse=True)
def _hermetic_dspy(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every case starts with DSPy's settings of a fresh process and leaves nothing behind."""
    with fresh_dspy_settings():
        yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "cstack" in request.fixturenames:
        print(request.getfixturevalue("cstack").logs())


@pytest.fixture
def session(dx: dspex.Client) -> Iterator[dspex.Session]:
    s = dx.session("c1")
    try:
        yield s
    finally:
        s.close(timeout=10)


@pytest.fixture(params=[INPROCESS, SESSION])
def run(request: pytest.FixtureRequest) -> Iterator[Runner]:
    if request.param == INPROCESS:
        yield InProcess()
        return
    dx: dspex.Client = request.getfixturevalue("dx")
    s = dx.session("c1")
    try:
        yield ThroughSession(s)
    finally:
        s.close(timeout=10)


@pytest.fixture(params=[INPROCESS, SESSION])
def arun(request: pytest.FixtureRequest) -> AsyncRunner:
    """The asyncio user's ``run``: in-process, or through a ``dspex.aio`` session of pool c1 (the
    client is made in the case's event loop: ``arun.go(main)``)."""
    if request.param == INPROCESS:
        return AsyncInProcess()
    return AsyncThroughSession(request.getfixturevalue("cstack").frontend, "c1")
