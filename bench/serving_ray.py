"""The Ray driver of the LM-bound serving figure (``python -m bench.serving drive --mode ray``).

The layout is what a Ray user deploys for the same job, sized like the dspex side: an actor
pool of P actors (P = the dspex worker processes), each actor holding one
``dspy.ChainOfThought("question -> answer")`` with its ``dspy.LM`` configured (cache off) and
taking up to C calls at once (``max_concurrency`` = the dspex workers' capacity). N concurrent
callers in one asyncio driver, caller i always on actor i mod P (as N dspex sessions pin evenly
over P workers), each awaiting its call (an ``ObjectRef`` is awaitable) and checking the
returned ``dspy.Prediction``, sent back by value like dspex's. Two actor flavours:

* ``async`` (the figure): an async actor whose method awaits ``program.acall`` (DSPy's native
  async path: litellm's ``acompletion``), Ray's recommended form for I/O-bound actors;
* ``threads``: a threaded actor running the sync ``program(...)`` in C threads, the same
  process × thread layout as the dspex workers.

The Ray instance is the bench's private one (:mod:`bench.rayhead`); this driver attaches to it
by address, so its actors die with it. CPU and RSS are those of every Ray process (GCS, raylet,
agents, monitors, idle and actor workers: the descendants of the pids the bench passes) plus
this driver's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from bench.common import descendants, rss_total

MODEL = "openai/loopback"


def _actor_classes() -> tuple[type, type]:
    """Defined in a function so Ray ships them by value (the workers need not import ``bench``)."""

    class AsyncProgram:
        def __init__(self, base: str) -> None:
            import dspy

            dspy.configure(lm=dspy.LM(MODEL, api_base=base, api_key="x", cache=False))
            self.program = dspy.ChainOfThought("question -> answer")

        def pid(self) -> int:
            return os.getpid()

        async def __call__(self, question: str) -> Any:
            return await self.program.acall(question=question)

    class ThreadedProgram:
        def __init__(self, base: str) -> None:
            import dspy

            dspy.configure(lm=dspy.LM(MODEL, api_base=base, api_key="x", cache=False))
            self.program = dspy.ChainOfThought("question -> answer")

        def pid(self) -> int:
            return os.getpid()

        def __call__(self, question: str) -> Any:
            return self.program(question=question)

    return AsyncProgram, ThreadedProgram


def ray_pids(roots: list[int]) -> list[int]:
    """The Ray processes now: the roots the bench passed (its Ray daemons) and their descendants."""
    out = {p for p in roots if os.path.exists(f"/proc/{p}")}
    for p in list(out):
        out.update(c for c, _ in descendants(p))
    return sorted(out)


def _kind(pid: int) -> str:
    """What a Ray process is: its ``ray::`` title (workers, agents), its script (monitors,
    dashboard) or its executable (gcs_server, raylet)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [x.decode(errors="replace") for x in f.read().split(b"\0") if x]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    script = next((a for a in argv[1:] if a.endswith(".py")), None)
    return os.path.basename(script or argv[0])


async def drive_ray(a: argparse.Namespace, loop: Any, question: str) -> dict[str, Any]:
    """``loop`` is bench.serving's ``_loop`` (the same measuring loop as the other systems)."""
    import ray

    ray.init(address=a.ray_address, log_to_driver=False, configure_logging=False)
    try:
        async_cls, threaded_cls = _actor_classes()
        cls = async_cls if a.ray_layout == "async" else threaded_cls
        actor = ray.remote(max_concurrency=a.capacity)(cls)
        actors = [actor.remote(a.base) for _ in range(a.actors)]
        actor_pids = list(await asyncio.gather(*(x.pid.remote() for x in actors)))
        n = len(actors)

        async def call(i: int) -> bool:
            pred = await actors[i % n].__call__.remote(question)
            return bool(pred.answer == "42")

        def pids() -> list[int]:
            return ray_pids(a.ray_pid)

        out: dict[str, Any] = await loop(a.concurrency, a.duration, a.warmup, call, pids)
        # the actors die with this driver: their RSS is read now, while they are up
        every = ray_pids(a.ray_pid)
        out["ray_rss"] = {"actors": rss_total(actor_pids), "other": rss_total([p for p in every if p not in actor_pids])}
        out["ray_processes"] = len(every)
        by_kind: dict[str, int] = {}
        for p in every:
            k = "actor" if p in actor_pids else _kind(p)
            by_kind[k] = by_kind.get(k, 0) + rss_total([p])
        out["ray_rss_by_kind"] = by_kind
        out["actor_pids"] = actor_pids
        for x in actors:
            ray.kill(x)
        return out
    finally:
        ray.shutdown()

