"""Logs an operator reads: one timestamped format in every process (config errors included), no
progress bars from workers, a line per failed call, intended recycles at INFO, a shutdown line."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import dspex
from tests.harness import REPO, Stack, base_env, wait_for

# 2026-11-30T07:30:01.123Z broker[4242] INFO dspex.broker: ...
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (broker\[\d+\]|worker\[[\w-]+:\d+\]|worker\[\d+\]) "
                  r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def lines(stack: Stack, name: str) -> list[str]:
    return Path(stack.root, name).read_text(errors="replace").splitlines()


def test_config_errors_are_timestamped_lines(short_tmp: str) -> None:
    env = base_env(short_tmp + "/r")
    conf = Path(short_tmp, "s.conf")
    conf.write_text("[dspex:pool:p]\naffinity = strict_queue\n")
    for args, what in ((["-m", "broker", "--pool", "p:nonsense"], "broker: "),
                       (["-m", "broker", "--config", str(conf), "--pool", "q:strict_queue:queue_max=x"], "broker: "),
                       (["-m", "worker", "--pool", "other", "--config", str(conf)], "worker: ")):
        res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        [line] = res.stderr.strip().splitlines()
        assert LINE.match(line) and " ERROR " in line and what in line, line


@pytest.mark.timeout(180)
def test_one_format_failed_calls_recycles_and_shutdown(stack: Stack) -> None:
    stack.start_broker("p:strict_queue")
    stack.start_worker("p", "--no-dspy")
    stack.start_worker("p", "--no-dspy")
    first = stack.wait_workers("p", 2)
    dx = stack.client()
    s = dx.session("p")
    s.call("os", "getpid")

    # a progress bar in user code: its redraws go to a listening caller, the log gets the
    # finished bar as one line (worker/output.py), never a smear of carriage returns
    assert s.eval("sum(1 for _ in __import__('tqdm').tqdm(range(2000), mininterval=0))") == 2000
    # user code imports dspy in a worker started without it: dspy's own handler gets our format
    s.exec("import dspy")
    s.exec("import logging; logging.getLogger('dspy').warning('a line from dspy')")
    # a failed call: one line in the worker with session, request id and error code
    with pytest.raises(dspex.RemoteError):
        s.call("operator", "truediv", [1, 0])
    # a stream that fails part-way
    with pytest.raises(dspex.RemoteError):
        list(s.stream_eval("(1 // (3 - i) for i in range(5))"))
    # a failure decided in the broker: the session's pin is gone (strict: did not run)
    with pytest.raises(dspex.PoolNotFound):
        dx.session("nope").call("os", "getpid")
    worker_log = "\n".join(lines(stack, "worker-p.log"))
    sid = s.id[:8]
    assert re.search(rf"INFO dspex\.worker: call failed: session={sid} request=\d+ op=call error=remote_error: "
                     r"division by zero", worker_log), worker_log
    assert re.search(rf"dspex\.worker: stream failed: session={sid} request=\d+ op=\w+ error=remote_error: "
                     r"integer division or modulo by zero", worker_log), worker_log
    assert "\r" not in worker_log
    # its own line in our format, not nested in a captured "stderr:" line with dspy's date format
    assert re.search(r"^\S+ worker\[p:\d+\] WARNING dspy: a line from dspy$", worker_log, re.MULTILINE), worker_log
    assert len([line for line in worker_log.splitlines() if "2000/2000" in line]) == 1, worker_log
    wait_for(lambda: any(re.search(r"call failed in the broker: pool=- session=\w+ request=\d+ op=call "
                                   r"error=pool_not_found", line) for line in lines(stack, "broker.log")),
             what="the broker's line for a call it failed")

    # an intended recycle is routine: INFO, never WARNING
    dx.recycle("p", first[0]["incarnation"])
    stack.start_worker("p", "--no-dspy")  # no supervisord here: stand in for its restart
    wait_for(lambda: any("was recycled" in line for line in lines(stack, "broker.log")), 20, 0.05,
             "the recycle logged")
    [recycled] = [line for line in lines(stack, "broker.log") if "was recycled" in line]
    assert " INFO dspex.broker: worker " in recycled, recycled

    # every process says it stopped
    stack.wait_workers("p", 2)
    procs = [p for p in stack.procs if p.poll() is None]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(30)
    broker_log, worker_lines = lines(stack, "broker.log"), lines(stack, "worker-p.log")
    assert re.search(r"INFO dspex\.broker: broker stopped \(SIGTERM\)", broker_log[-1]), broker_log[-3:]
    stopped = [line for line in worker_lines if re.search(r"INFO dspex\.worker: worker \w+ \(pool p, pid \d+\) "
                                                         r"stopped after \d+s: \d+ calls served, \d+ failed", line)]
    assert len(stopped) == 3, "the recycled worker and both live ones"
    for line in broker_log + worker_lines:
        assert LINE.match(line), f"a line in another format: {line!r}"
