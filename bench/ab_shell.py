"""The in-process side of ``python -m bench.ab --what shell``: the broker's main thread alone.

Run as a script (``python bench/ab_shell.py SESSIONS``) with the tree under test first on
``sys.path``, in the protocol of ``bench/ab_drivers.py`` (``{"ready": true}``, then one JSON line
of figures per ``{"n": calls}`` line): the broker of that tree (``broker.broker.Broker``, its zmq
shell and routing core) in this thread over inproc sockets, turn by turn (``Broker.turn``), under
the pipelined load of ``--what tree`` from sockets of this thread (``ShellLoad``): ``shell_us``,
thread CPU per request + reply of its turns. The same messages reach each turn of both trees, so
the figure does not move with the machine's scheduling; zmq's I/O thread is not in it (inproc).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ab_drivers import Side, headers_module, serve

_SESSIONS = 100  # calls in flight, as in --what tree
_CLIENTS = 4  # client sockets they share


class ShellLoad:
    """The broker of whichever tree is first on sys.path, its zmq shell and core, in this thread
    over inproc sockets (no I/O thread: what is measured is the broker's main thread), with 2
    protocol-echo workers and 4 clients as sockets of this thread too: the pipelined load of
    ``--what tree``, 100 sessions (``SESSIONS``; 1: sequential round trips, two turns each) with
    one call each in flight. A step: one turn of the broker's loop (``Broker.turn``, timed in
    thread CPU), then every worker answers what it was sent and every client sends its sessions'
    next calls for the replies it got."""

    def __init__(self, sessions: int = _SESSIONS) -> None:
        import msgpack
        import zmq

        import dspex.wire.protocol as wire
        from broker.broker import Broker
        from broker.settings import parse

        self.zmq, self.wire, self.headers = zmq, wire, headers_module()
        tag = f"{id(self):x}"
        self.ctx = zmq.Context()
        opts = parse(["--frontend", f"inproc://dxab-f-{tag}", "--backend", f"inproc://dxab-b-{tag}", "--pool",
                      "p:strict_queue", "--checkpoints", "", "--heartbeat", "1.0", "--liveness", "3", "--log-level", "WARNING"])
        self.broker = broker = Broker(opts, self.ctx)
        if not hasattr(broker, "turn"):
            raise SystemExit("--what shell needs a tree whose Broker has turn()")
        broker.bind()
        self.workers = []
        info = {"pool": "p", "pid": 1, "host": "h", "capacity": 1, "running": 0, "version": wire.PROTOCOL_VERSION}
        for wid in (b"w" * 32, b"v" * 32):
            w = self.ctx.socket(zmq.DEALER)
            w.setsockopt(zmq.ROUTING_ID, wid)
            w.connect(opts.backend)
            w.send_multipart([wire.W_READY, msgpack.packb({**info, "incarnation": wid.decode()})])
            self.workers.append((wid, w))
        while len(broker.core.workers) < 2:
            broker.turn()
        self.clients = []
        for i in range(_CLIENTS):
            c = self.ctx.socket(zmq.DEALER)
            c.setsockopt(zmq.ROUTING_ID, b"c%d" % i)
            c.connect(opts.frontend)
            self.clients.append(c)
            # an ipc broker maps a client to its connection on its first call; inproc has no fds,
            # so the load maps them (else every call would look for the mapping again)
            broker.connections.clients.fd[b"c%d" % i] = 1_000_000 + i
        self.body = msgpack.packb(["os", "getpid", [], {}])
        self.result = msgpack.packb(0)
        self.next_id = 0
        self.session_of: dict[int, str] = {}
        for i in range(sessions):  # every session's first call
            self._send(self.clients[i % _CLIENTS], f"s{i:031d}")

    def _send(self, client: Any, session: str) -> None:
        self.next_id += 1
        self.session_of[self.next_id] = session
        client.send_multipart([self.headers.RequestHeader("call", self.next_id, "p", session).pack(), self.body])

    def _step_peers(self) -> int:
        """Workers answer what they were sent; clients send their next calls. Replies seen."""
        zmq, w, h = self.zmq, self.wire, self.headers
        for wid, sock in self.workers:
            while sock.poll(0):
                frames = sock.recv_multipart()
                if frames[0][:1] == w.B_REQUEST:
                    client = frames[0][h.REQUEST_ENVELOPE_SIZE:]
                    req_id = h.unpack_request_header(frames[1]).req_id
                    sock.send_multipart([h.pack_reply_envelope(w.W_REPLY, "ok", req_id, client),
                                         h.pack_reply_header("ok", req_id, wid.decode(), "p"), self.result])
                elif frames[0][:1] == w.B_HEARTBEAT:
                    sock.send_multipart([w.W_HEARTBEAT])
        replies = 0
        for c in self.clients:
            while c.poll(0):
                frames = c.recv_multipart(zmq.NOBLOCK)
                req_id = h.unpack_reply_header(frames[0])[1]
                replies += 1
                self._send(c, self.session_of.pop(req_id))
        return replies

    def block(self, calls: int) -> float:
        """Seconds of the broker's thread CPU per request + reply over ``calls`` of them."""
        broker, clock = self.broker, time.thread_time
        spent, done = 0.0, 0
        while done < calls:
            t = clock()
            broker.turn()
            spent += clock() - t
            done += self._step_peers()
        return spent / done


def _shell(sessions: int) -> Side:
    load = ShellLoad(sessions)
    load.block(2000)  # warm-up
    return (lambda cmd: {"shell_us": load.block(int(cmd["n"])) * 1e6}), lambda: None


if __name__ == "__main__":
    sys.path.pop(0)  # this script's directory (bench/) must not shadow anything (ab_drivers is imported)
    block, close = _shell(int(sys.argv[1]))
    sys.exit(serve(block, close))
