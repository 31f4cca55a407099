"""The asyncio client's direct path to a ``direct`` pool's workers (issue 14 prototype).

The same contract as :mod:`dspex.direct` (the sync client's): one DEALER per worker endpoint
per client, a reader task routing replies by request id and a monitor task that fails the calls
waiting on a dropped connection with ``WorkerCrashed`` and marks that worker dead for this
client (its sessions' next calls: ``SessionWorkerUnavailable``). ``STATUS_VIA_BROKER`` answers
send the request through the broker.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dspex import config
from dspex.core import Exchange, cancel_all, close_monitored, control_frames
from dspex.direct import VIA_BROKER, frozen_peer_check, unavailable
from dspex.errors import BrokerUnreachable, ProtocolError, SessionWorkerUnavailable, WorkerCrashed
from dspex.protocol import STATUS_VIA_BROKER, Op, unpack_reply

_Reply = tuple[str, list[Any]]
_LOST = "__lost__"


class _Link:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, worker: str, max_message: int,
                 routes: "AsyncDirectRoutes") -> None:
        self.worker = worker
        self.sock = ctx.socket(zmq.DEALER)
        config.tune_socket(self.sock, max_message=max_message)  # type: ignore[arg-type]
        frozen_peer_check(self.sock)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.pending: dict[int, asyncio.Queue[_Reply]] = {}
        self.ids = itertools.count(1)
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._read()), loop.create_task(self._watch(routes))]

    async def _read(self) -> None:
        while True:
            reply = await self.sock.recv_multipart(copy=False)
            try:
                status, rid, _, _, _ = unpack_reply(reply[0].buffer)
            except ProtocolError:
                continue
            queue = self.pending.get(rid)
            if queue is not None:  # else a late reply of a call that timed out
                queue.put_nowait((status, reply[1:]))

    async def _watch(self, routes: "AsyncDirectRoutes") -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                break
        routes.died(self.worker, "crashed (its direct connection dropped)")
        for queue in self.pending.values():
            queue.put_nowait((_LOST, []))

    async def close(self) -> None:
        tasks, self.tasks = self.tasks, []
        await cancel_all(tasks)
        close_monitored(self.sock, self.monitor)


class AsyncDirectRoutes:
    """Per asyncio client: worker incarnation -> direct endpoint, its link, workers seen dead."""

    def __init__(self, ctx: zmq.asyncio.Context, max_message: int, local: bool) -> None:
        self._ctx = ctx
        self._local = local  # the client reaches its broker over ipc: the workers are on this host
        self._max_message = max_message
        self.endpoints: dict[str, str] = {}
        self._dead: dict[str, str] = {}
        self._links: dict[str, _Link] = {}
        self._retiring: list[_Link] = []

    def learn(self, worker: str, endpoint: str) -> None:
        if self._local and worker and endpoint.startswith("ipc://") and worker not in self.endpoints and worker not in self._dead:
            self.endpoints[worker] = endpoint

    def died(self, worker: str, why: str) -> None:
        endpoint = self.endpoints.pop(worker, None)
        self._dead[worker] = why
        link = self._links.pop(endpoint, None) if endpoint else None
        if link is not None:
            self._retiring.append(link)  # closed at close(): its watcher is the caller here

    def unavailable(self, ex: Exchange, worker: str) -> SessionWorkerUnavailable | None:
        return unavailable(self._dead, ex, worker)

    async def close(self) -> None:
        links, self._links = [*self._links.values(), *self._retiring], {}
        self._retiring = []
        for link in links:
            await link.close()

    def _link(self, worker: str, endpoint: str) -> _Link:
        link = self._links.get(endpoint)
        if link is None:
            config.probe_ipc(endpoint)  # a new link only: a stale socket file fails at once
            link = self._links[endpoint] = _Link(self._ctx, endpoint, worker, self._max_message, self)
        return link

    async def request(self, ex: Exchange, worker: str, endpoint: str) -> Any:
        """Send ``ex`` straight to ``worker``; its value, or ``VIA_BROKER`` (nothing ran)."""
        try:
            link = self._link(worker, endpoint)
        except BrokerUnreachable:
            self.died(worker, "is gone (nothing listens at its direct endpoint)")
            raise self.unavailable(ex, worker) from None  # type: ignore[misc]
        req_id = next(link.ids)
        queue: asyncio.Queue[_Reply] = asyncio.Queue()
        link.pending[req_id] = queue
        try:
            try:
                await asyncio.wait_for(link.sock.send_multipart(ex.frames(req_id, worker), copy=len(ex.body) <= 1),
                                       ex.timeout if ex.timeout > 0 else None)
            except (asyncio.TimeoutError, zmq.ZMQError):
                self.died(worker, "is not reading its direct socket")
                raise self.unavailable(ex, worker) from None  # type: ignore[misc]
            while True:
                try:
                    status, frames = await asyncio.wait_for(queue.get(), ex.wait)
                except asyncio.TimeoutError:
                    raise ex.timed_out() from None
                if status == _LOST:
                    raise WorkerCrashed(f"worker {worker[:8]} of session {ex.session[:8]} went away during "
                                        f"{ex.op}; the call may or may not have run", session=ex.session, worker=worker)
                if status == STATUS_VIA_BROKER:
                    return VIA_BROKER
                kind, value, credit = ex.feed(status, worker, frames)
                if kind == "done":
                    return value
                if credit:  # the call's output events, under the worker's flow control
                    await link.sock.send_multipart(control_frames(Op.CREDIT, ex.pool, ex.session, req_id, credit))
        finally:
            link.pending.pop(req_id, None)
