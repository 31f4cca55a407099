"""A wrong stack configuration, as an operator meets it: a ``[dspex:pool:NAME]`` section or key
given twice, a setting out of its range, a malformed ``DSPEX_*`` number, a CURVE key file that is
not there. Each is one line naming the file (or variable) and the fix, with a usage exit code, in
``dspexctl`` (a subprocess), the broker and the workers: never a traceback, never accepted as is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex.stack.supervisor import pid_alive
from tests.harness import base_env, short_tmpdir, wait_for
from tests.harness.stack import Stack
from tests.harness.supervisord import SupervisedStack
from tests.test_cli import no_traceback
from tests.test_ops_python import small_conf_text

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def here() -> Iterator[Path]:
    import shutil

    root = Path(short_tmpdir("dxc"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=base_env(str(cwd / "r"), **env), capture_output=True,
                          text=True, timeout=60)


def one_error_line(res: subprocess.CompletedProcess[str], needle: str) -> None:
    no_traceback(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr


TWICE = {
    "key": ("[dspex:pool:triage_pool]\n", "[dspex:pool:triage_pool]\nqueue_max = 5\n",
            "'queue_max' of [dspex:pool:triage_pool] is given twice"),
    "section": ("[group:triage_pool]\n", "[dspex:pool:triage_pool]\nqueue_max = 5\n\n[group:triage_pool]\n",
                "[dspex:pool:triage_pool] is given twice"),
}


@pytest.mark.parametrize("what", list(TWICE))
def test_a_pool_section_or_key_given_twice_is_one_line_in_every_process(here: Path, what: str) -> None:
    old, new, needle = TWICE[what]
    conf = here / "supervisor.conf"
    conf.write_text(small_conf_text().replace(old, new, 1))
    (here / "run").mkdir()
    res = run(["-m", "dspexctl", "pools", "status"], here)
    assert res.returncode == 4, res.stdout + res.stderr  # nothing runs: unreachable, and the config said
    no_traceback(res)
    assert f"DEGRADED: invalid dspex config: {conf}, line" in res.stdout and needle in res.stdout, res.stdout
    res = run(["-m", "dspexctl", "pools", "status", "--json"], here)
    assert any(needle in p for p in json.loads(res.stdout)["problems"]), res.stdout
    for args in (["-m", "broker", "--config", str(conf)], ["-m", "worker", "--pool", "triage_pool", "--no-dspy",
                                                          "--config", str(conf)]):
        res = run(args, here)
        assert res.returncode == 2, res.stderr
        one_error_line(res, needle)


def test_a_config_error_ends_the_broker_and_a_worker_before_they_import_what_serving_needs(here: Path) -> None:
    """supervisord counts a program alive for startsecs (1 s) as started: one with a bad config
    must exit well before, even on a loaded host, or supervisord restarts it forever instead of
    marking it FATAL. So neither reads its config after the client stack, numpy or its loop."""
    conf = here / "supervisor.conf"
    conf.write_text(small_conf_text(triage_pool={"queue_max": "banana"}))
    serving = {"numpy", "zmq.asyncio", "dspex.client", "dspex.wire.codec", "broker.broker", "worker.worker", "dspy"}
    for args, needle in ((["-m", "broker", "--config", str(conf)], "bad value 'banana' for 'queue_max'"),
                         (["-m", "worker", "--pool", "triage_pool", "--capacity", "0"], "capacity must be at least 1")):
        res = run(["-X", "importtime", *args], here)
        assert res.returncode == 2 and needle in res.stderr, res.stderr[-2000:]
        imported = {ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
        assert imported and not imported & serving, sorted(imported & serving)


def test_a_key_given_twice_outside_the_pool_sections_is_supervisords_business(here: Path) -> None:
    """supervisord takes the last of a repeated key of its own sections; so does dspex."""
    conf = here / "supervisor.conf"
    conf.write_text(small_conf_text().replace("[program:broker]\n", "[program:broker]\npriority = 50\n", 1))
    (here / "run").mkdir()
    res = run(["-m", "dspexctl", "pools", "status", "--json"], here)
    assert res.returncode == 4 and not any("invalid" in p for p in json.loads(res.stdout)["problems"]), res.stdout


@pytest.mark.slow
def test_pools_start_with_an_invalid_pool_section_starts_nothing() -> None:
    """Its broker and workers would only go FATAL: refused before supervisord starts."""
    old, new, needle = TWICE["key"]
    stack = SupervisedStack(small_conf_text().replace(old, new, 1), venv_link=False)
    try:
        res = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "start", "--wait", "20"], cwd=stack.root,
                             env=stack.env, capture_output=True, text=True, timeout=90)
        try:
            stack.adopt_daemon()
        except AssertionError:
            pass
        assert res.returncode == 2, res.stdout + res.stderr
        one_error_line(res, "invalid dspex config, nothing started: ")
        assert needle in res.stderr
        assert not (stack.root / "run" / "supervisord.pid").exists(), "supervisord was started"
    finally:
        stack.stop()
        stack.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("old, new, needle", [
    ("numprocs = 1", "numprocs = two", "invalid literal for int() with base 10: 'two' in section 'program:triage_pool'"),
    ("autorestart = true", "autorestart = yes please", "invalid 'autorestart' value 'yes please'"),
])
def test_a_supervisord_setting_it_refuses_is_a_config_error(old: str, new: str, needle: str) -> None:
    """supervisord refuses the conf (its exit 2): nothing started, the operator's mistake (exit 2,
    config_error in --json), its words on one line, not an operation that failed (exit 1)."""
    stack = SupervisedStack(small_conf_text().replace(old, new, 1), venv_link=False)
    try:
        for json_out in ([], ["--json"]):
            res = subprocess.run([sys.executable, "-m", "dspexctl", *json_out, "pools", "start", "--wait", "20"],
                                 cwd=stack.root, env=stack.env, capture_output=True, text=True, timeout=90)
            assert res.returncode == 2, res.stdout + res.stderr
            no_traceback(res)
            *progress, last = res.stderr.strip().splitlines()  # "starting supervisord -c ...", then the error
            assert last.startswith(f"Error: supervisord refused {stack.conf}: ") and needle in last, res.stderr
            assert all(line.startswith("starting supervisord") for line in progress), res.stderr
            if json_out:
                assert json.loads(res.stdout)["error"]["code"] == "config_error", res.stdout
        assert not (stack.root / "run" / "supervisord.pid").exists(), "supervisord was started"
    finally:
        stack.stop()
        stack.cleanup()


OUT_OF_RANGE = [  # (key, value, what the error says): values that would misbehave rather than fail
    ("queue_max", "0", "queue_max must be at least 1, not 0"),  # every request refused
    ("queue_timeout", "-1", "queue_timeout must be above 0, not -1"),
    ("queue_timeout", "nan", "queue_timeout must be above 0 and finite, not nan"),  # never times out
    ("session_ttl", "inf", "session_ttl must be above 0 and finite, not inf"),  # the broker's dispatch raised
    ("health_window", "0", "health_window must be above 0, not 0"),
    ("max_requests", "-1", "max_requests must be at least 0, not -1"),  # a recycle storm
    ("max_rss_mb", "-1", "max_rss_mb must be at least 0, not -1"),
    ("age_jitter", "5", "age_jitter must be between 0 and 1, not 5"),  # a negative age: a recycle storm
    ("prefetch", "-3", "prefetch must be at least 0, not -3"),
    ("affinity", "strict", "bad value 'strict' for 'affinity' (one of strict_queue, strict_fail_fast, hint, none)"),
]


@pytest.mark.parametrize("key, value, needle", OUT_OF_RANGE)
def test_a_pool_setting_out_of_its_range_is_refused(here: Path, key: str, value: str, needle: str) -> None:
    conf = here / "supervisor.conf"
    conf.write_text(small_conf_text(triage_pool={key: value}))
    (here / "run").mkdir()
    res = run(["-m", "broker", "--config", str(conf)], here)
    assert res.returncode == 2, res.stderr
    one_error_line(res, f"{conf} [dspex:pool:triage_pool]: {needle}")
    res = run(["-m", "broker", "--pool", f"p:strict_queue:{key}={value}"], here)
    assert res.returncode == 2, res.stderr
    one_error_line(res, needle)
    res = run(["-m", "dspexctl", "pools", "status"], here)
    assert res.returncode == 4 and f"DEGRADED: invalid dspex config: {conf} [dspex:pool:triage_pool]: {needle}" \
        in res.stdout, res.stdout


NO_POOL = {  # (old, new, what the error says): confs supervisord accepts whose pool would serve nothing
    "numprocs 0": ("numprocs = 1", "numprocs = 0",
                   ("[program:triage_pool]: numprocs must be at least 1, not 0 (pool 'triage_pool' would have "
                    "no workers)")),
    "numprocs -1": ("numprocs = 1", "numprocs = -1",
                    ("[program:triage_pool]: numprocs must be at least 1, not -1 (pool 'triage_pool' would have "
                     "no workers)")),
    "section typo": ("[dspex:pool:triage_pool]", "[dspex:pol:triage_pool]",
                     "[dspex:pol:triage_pool]: not a dspex section (a pool's settings go in [dspex:pool:NAME])"),
    # supervisord takes it, then its XML-RPC garbles every answer that names it (stop: ExpatError)
    "non-ascii name": ("[dspex:pool:triage_pool]", "[dspex:pool:triagé]",
                       ("[dspex:pool:triagé]: pool name 'triagé': use ASCII letters, digits, '_', '-' and '.' "
                        "(supervisord refuses spaces, ':' and '/', and its XML-RPC garbles the answers that name "
                        "anything not ASCII)")),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", list(NO_POOL))
def test_a_pool_of_no_workers_or_a_misspelt_section_is_refused(what: str) -> None:
    """supervisord accepts both, so the stack started and called the pool OK (0/0 ready) or ran it
    on defaults the operator did not write: refused as a config error, nothing started."""
    old, new, needle = NO_POOL[what]
    stack = SupervisedStack(small_conf_text().replace(old, new, 1), venv_link=False)
    try:
        res = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "status"], cwd=stack.root, env=stack.env,
                             capture_output=True, text=True, timeout=60)
        no_traceback(res)
        assert res.returncode == 4 and f"DEGRADED: invalid dspex config: {stack.conf} {needle}" in res.stdout, \
            res.stdout
        res = subprocess.run([sys.executable, "-m", "broker", "--config", str(stack.conf)], cwd=stack.root,
                             env=stack.env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        one_error_line(res, needle)
        for json_out in ([], ["--json"]):
            res = subprocess.run([sys.executable, "-m", "dspexctl", *json_out, "pools", "start", "--wait", "20"],
                                 cwd=stack.root, env=stack.env, capture_output=True, text=True, timeout=90)
            try:
                stack.adopt_daemon()
            except AssertionError:
                pass
            assert res.returncode == 2, res.stdout + res.stderr
            no_traceback(res)
            assert f"invalid dspex config, nothing started: {stack.conf} {needle}" in res.stderr.splitlines()[-1], \
                res.stderr
            if json_out:
                assert json.loads(res.stdout)["error"]["code"] == "config_error", res.stdout
            assert not (stack.root / "run" / "supervisord.pid").exists(), "supervisord was started"
    finally:
        stack.stop()
        stack.cleanup()


@pytest.mark.slow
def test_an_answer_supervisord_garbles_is_one_line() -> None:
    """A supervisord group whose name is not ASCII (a pool's name is refused so, but a group of
    another program is supervisord's business): supervisord's XML-RPC answers that name it are cut
    short, and ``dspexctl stop`` ended in xml.parsers.expat.ExpatError's traceback."""
    text = small_conf_text().replace("[group:triage_pool]", "[group:triagé]").replace(
        "programs = triage_pool", "programs = triagé").replace("[program:triage_pool]", "[program:triagé]")
    stack = SupervisedStack(text, venv_link=False)
    try:
        stack.start_foreground()
        wait_for(lambda: {p["statename"] for p in stack.processes()} == {"RUNNING"}, 60, 0.2,
                 "the broker and the worker running")
        res = subprocess.run([sys.executable, "-m", "dspexctl", "--json", "stop"], cwd=stack.root, env=stack.env,
                             capture_output=True, text=True, timeout=60)
        no_traceback(res)
        assert res.returncode == 1, res.stdout + res.stderr
        last = res.stderr.splitlines()[-1]
        assert last.startswith("Error: supervisord: supervisor.stopProcessGroup: its answer could not be read "
                               "(unclosed token: "), last
        assert last.endswith("a process or group name that is not ASCII garbles supervisord's XML-RPC "
                             "answers: rename it"), last
        assert json.loads(res.stdout)["error"]["code"] == "supervisor_error", res.stdout
    finally:
        stack.stop()
        stack.cleanup()


@pytest.mark.parametrize("args, name, value", [
    (["-m", "dspexctl", "sessions", "list"], "DSPEX_REPLY_GRACE", "7s"),
    (["-m", "dspexctl", "--json", "pools", "status"], "DSPEX_CODE_CACHE", "1.5"),
    (["-m", "dspexctl", "pools", "status"], "DSPEX_MAX_MESSAGE", "256MB"),
    (["-m", "broker", "--pool", "p"], "DSPEX_HEARTBEAT", "1s"),
    (["-m", "broker", "--pool", "p"], "DSPEX_CLIENT_HWM", "lots"),
    (["-m", "worker", "--pool", "p", "--no-dspy"], "DSPEX_CAPACITY", "two"),
    (["-m", "worker", "--pool", "p", "--no-dspy"], "DSPEX_HARD_GRACE", "5s"),
    (["-c", "import dspex; dspex.connect()"], "DSPEX_CLIENT_THREADS", "x"),
])
def test_a_malformed_dspex_number_is_one_line_naming_the_variable(here: Path, args: list[str], name: str,
                                                                  value: str) -> None:
    res = run(args, here, **{name: value})
    kind = "a whole number" if name in ("DSPEX_CODE_CACHE", "DSPEX_MAX_MESSAGE", "DSPEX_CLIENT_HWM",
                                        "DSPEX_CAPACITY", "DSPEX_CLIENT_THREADS") else "a number"
    needle = f"{name}={value!r} is not {kind}"
    if args[0] == "-c":  # the library raises the typed error
        assert "dspex.wire.errors.ConfigError: " + needle in res.stderr, res.stderr
        return
    assert res.returncode == 2, res.stdout + res.stderr
    one_error_line(res, needle)
    if "--json" in args:
        assert json.loads(res.stdout)["error"]["code"] == "config_error"


def test_a_missing_or_wrong_curve_key_file_is_one_line(here: Path) -> None:
    keys = here / "keys"
    res = run(["-m", "dspexctl", "keys", "generate", "--dir", str(keys)], here)
    assert res.returncode == 0, res.stderr
    tcp = "tcp://127.0.0.1:1"
    cases = [  # (argv, environment, what the line says)
        (["-m", "dspexctl", "--endpoint", tcp, "pools", "status"],
         {"DSPEX_CURVE_SERVER_KEY": str(keys / "nope.key"), "DSPEX_CURVE_CLIENT_KEY": str(keys / "client.key_secret")},
         f"the broker's public key file {keys / 'nope.key'} does not exist"),
        (["-m", "dspexctl", "--endpoint", tcp, "sessions", "list"],
         {"DSPEX_CURVE_SERVER_KEY": str(keys / "broker.key"), "DSPEX_CURVE_CLIENT_KEY": str(here / "supervisor.conf")},
         f"the secret key file {here / 'supervisor.conf'} is not a CURVE key file"),
        (["-m", "broker", "--pool", "p", "--frontend", tcp, "--backend", "tcp://127.0.0.1:2", "--curve-allowed",
          str(keys / "allowed"), "--curve-secret-key", str(keys / "broker.key_secrett")], {},
         f"the broker's secret key file {keys / 'broker.key_secrett'} does not exist"),
        (["-m", "broker", "--pool", "p", "--frontend", tcp, "--backend", "tcp://127.0.0.1:2", "--curve-allowed",
          str(keys / "allowed"), "--curve-secret-key", str(keys / "broker.key")], {},
         f"{keys / 'broker.key'} holds no secret key"),
        (["-m", "worker", "--pool", "p", "--no-dspy", "--backend", tcp, "--curve-server-key", str(keys / "nope"),
          "--curve-key", str(keys / "worker.key_secret")], {},
         f"the broker's public key file {keys / 'nope'} does not exist"),
    ]
    (here / "supervisor.conf").write_text("[supervisord]\n")
    for argv, env, needle in cases:
        res = run(argv, here, **env)
        assert res.returncode == 2, (argv, res.stdout + res.stderr)
        one_error_line(res, needle)


def test_a_tcp_endpoint_another_process_holds_is_one_line(here: Path) -> None:
    """The broker raised zmq's traceback (exit 1); under supervisord its log's last line was the
    only hint, after the traceback."""
    import socket

    keys = here / "keys"
    assert run(["-m", "dspexctl", "keys", "generate", "--dir", str(keys)], here).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        res = run(["-m", "broker", "--pool", "p", "--frontend", endpoint, "--backend", "tcp://127.0.0.1:0",
                   "--curve-allowed", str(keys / "allowed"), "--curve-secret-key", str(keys / "broker.key_secret")],
                  here)
    assert res.returncode == 2, res.stderr
    one_error_line(res, f"cannot bind {endpoint}: Address already in use (another process holds it: stop it, or "
                        "give the broker another endpoint)")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_pools_start_names_why_a_program_went_fatal() -> None:
    """A worker whose command line is wrong: the error says what its log says, not only where."""
    text = small_conf_text({"triage_pool": 1, "analytics_pool": 1}).replace(
        "-m worker --pool analytics_pool", "-m worker --pool analytics_pool --capacity 0", 1)
    stack = SupervisedStack(text, venv_link=False)
    try:
        res = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "start", "--wait", "90"], cwd=stack.root,
                             env=stack.env, capture_output=True, text=True, timeout=120)
        stack.adopt_daemon()
        assert res.returncode == 1, res.stdout + res.stderr
        no_traceback(res)
        error = res.stderr.splitlines()[-1]
        assert error.startswith("Error: supervisord gave up on analytics_pool:analytics_pool_00 (FATAL"), error
        assert "worker: capacity must be at least 1, not 0" in error, error
    finally:
        stack.stop()
        stack.cleanup()


def test_a_run_directory_that_cannot_be_made_is_one_line(here: Path) -> None:
    """A file where a directory of DSPEX_RUN_DIR's path should be (as a read-only file system or a
    missing permission, mkdir fails): the broker and workers say so and exit 2, dspexctl too."""
    (here / "file").write_text("")
    run_dir = str(here / "file" / "r")
    for args in (["-m", "broker", "--pool", "p"], ["-m", "worker", "--pool", "p", "--no-dspy"]):
        res = run(args, here, DSPEX_RUN_DIR=run_dir)
        assert res.returncode == 2, res.stderr
        one_error_line(res, f"cannot create the run directory {run_dir}: Not a directory (set DSPEX_RUN_DIR")
    res = run(["-m", "dspexctl", "sessions", "list"], here, DSPEX_RUN_DIR=run_dir)
    assert res.returncode == 2, res.stderr
    one_error_line(res, f"cannot use ipc://{run_dir}/frontend.sock: its run directory {run_dir}: Not a directory")


def test_a_run_directory_that_is_a_file_is_one_line(here: Path) -> None:
    """DSPEX_RUN_DIR naming a file (a typo, a stale path): dspexctl raised NotADirectoryError."""
    run_dir = here / "r"
    run_dir.write_text("")
    (here / "supervisor.conf").write_text(small_conf_text())
    needle = (f"cannot use ipc://{run_dir}/frontend.sock: its run directory {run_dir} is not a directory (set "
              "DSPEX_RUN_DIR to a directory of your own)")
    for args in (["sessions", "list"], ["pools", "status"], ["--json", "workers", "recycle", "triage_pool"]):
        res = run(["-m", "dspexctl", *args], here)
        assert res.returncode == 2, res.stdout + res.stderr
        one_error_line(res, needle)
    for args in (["-m", "broker", "--pool", "p"], ["-m", "worker", "--pool", "p", "--no-dspy"]):  # they said "File exists"
        res = run(args, here, DSPEX_RUN_DIR=str(run_dir))
        assert res.returncode == 2, res.stderr
        one_error_line(res, f"cannot use the run directory {run_dir}: it is a file, not a directory (set DSPEX_RUN_DIR")
        if "--json" in args:
            assert json.loads(res.stdout)["error"]["code"] == "config_error", res.stdout
    pidfile = here / "run" / "supervisord.pid"
    try:
        res = run(["-m", "dspexctl", "pools", "start", "--wait", "20"], here)  # refused before supervisord starts
        assert res.returncode == 2, res.stdout + res.stderr
        one_error_line(res, f"Error: nothing started: {needle}")
        assert not pidfile.exists(), "supervisord was started"
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
            wait_for(lambda: not pid_alive(int(pidfile.read_text())), 60, 0.1, "supervisord gone")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_broker_that_is_not_running_is_named_with_its_cause_or_its_fix() -> None:
    """Stopped by an operator: the fix. Died (here: its conf broken after supervisord read it,
    so it fails at its next start): its log's last line, the cause."""
    text = small_conf_text({"triage_pool": 1})
    stack = SupervisedStack(text, venv_link=False)
    try:
        stack.start_foreground()
        wait_for(lambda: any(p["name"] == "broker" and p["statename"] == "RUNNING" for p in stack.processes()), 60,
                 0.1, "the broker RUNNING")
        stack.rpc("supervisor.stopProcess", "broker:broker")
        res = subprocess.run([sys.executable, "-m", "dspexctl", "sessions", "list"], cwd=stack.root,
                             env={**stack.env, "DSPEX_SUPERVISOR_CONF": ""}, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 4, res.stderr
        one_error_line(res, f"supervisord of {stack.conf} reports its broker STOPPED: start it with dspexctl pools "
                            "start")
        stack.conf.write_text(text.replace(*TWICE["key"][:2], 1))
        stack.rpc("supervisor.startProcess", "broker:broker", False)
        wait_for(lambda: any(p["name"] == "broker" and p["statename"] == "FATAL" for p in stack.processes()), 60,
                 0.1, "the broker FATAL")
        res = subprocess.run([sys.executable, "-m", "dspexctl", "workers", "recycle", "triage_pool"], cwd=stack.root,
                             env=stack.env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 4, res.stderr
        one_error_line(res, "reports its broker FATAL, its last log line: ")
        assert "ERROR dspex: broker: " in res.stderr and TWICE["key"][2] in res.stderr, res.stderr
    finally:
        stack.stop()
        stack.cleanup()


def test_keys_generate_never_replaces_a_broker_key_pair_and_speaks_json(here: Path) -> None:
    keys = here / "keys"
    res = run(["-m", "dspexctl", "--json", "keys", "generate", "--dir", str(keys), "--peer", "client", "--peer",
               "worker1"], here)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)  # the same facts as the text: the files written, what uses them
    assert doc["written"] == {"broker": str(keys / "broker.key_secret"), "client": str(keys / "client.key_secret"),
                              "worker1": str(keys / "worker1.key_secret"), "allowed": str(keys / "allowed")}
    assert doc["server_key"] == str(keys / "broker.key") and set(doc["use"]) == {"broker", "workers", "clients"}
    secret = (keys / "broker.key_secret").read_bytes()
    res = run(["-m", "dspexctl", "keys", "generate", "--dir", str(keys), "--peer", "bob"], here)
    assert res.returncode == 2, res.stdout + res.stderr
    one_error_line(res, f"{keys} already holds a broker key pair")
    assert (keys / "broker.key_secret").read_bytes() == secret and not (keys / "bob.key").exists()
    res = run(["-m", "dspexctl", "keys", "generate", "--dir", str(here / "k2"), "--admin", "worker9"], here)
    assert res.returncode == 2 and "worker9 is a worker key" in res.stderr, res.stderr
    assert not (here / "k2").exists(), "nothing written for a refused run"


def test_keys_generate_says_how_each_side_uses_the_keys_it_wrote(here: Path) -> None:
    """The lines after the files: the broker binds its worker plane on TCP (``--backend``: the keys
    are for workers on other hosts) and, for clients elsewhere, its frontend; each worker host's conf
    comes from ``hosts conf`` with the worker key written, whatever its name; a client needs the
    endpoint too. ``--json`` has the same lines under ``use``."""
    keys = here / "keys"
    res = run(["-m", "dspexctl", "keys", "generate", "--dir", str(keys), "--peer", "alice", "--peer", "worker-gpu1"],
              here)
    assert res.returncode == 0, res.stderr
    use = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in res.stdout.splitlines()[-3:]}
    assert set(use) == {"broker", "workers", "clients"}, res.stdout
    assert "--backend tcp://" in use["broker"] and "--frontend tcp://" in use["broker"], use["broker"]
    assert f"--curve-secret-key {keys / 'broker.key_secret'} --curve-allowed {keys / 'allowed'}" in use["broker"]
    assert use["workers"].startswith("dspexctl hosts conf --broker tcp://"), use["workers"]
    assert f"--worker-key {keys / 'worker-gpu1.key_secret'} --server-key {keys / 'broker.key'}" in use["workers"]
    assert "…" not in res.stdout, "every line names a key this run wrote"
    assert use["clients"].startswith("DSPEX_ENDPOINT=tcp://"), use["clients"]
    assert f"DSPEX_CURVE_CLIENT_KEY={keys / 'alice.key_secret'}" in use["clients"], use["clients"]
    doc = json.loads(run(["-m", "dspexctl", "--json", "keys", "generate", "--dir", str(here / "k2"), "--peer",
                          "worker"], here).stdout)
    assert "--backend tcp://" in doc["use"]["broker"] and "--frontend" not in doc["use"]["broker"], doc["use"]
    assert set(doc["use"]) == {"broker", "workers"}, "no client key written: no client line"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_pools_stop_that_runs_out_of_its_wait_exits_8_naming_what_still_stops() -> None:
    """``pools stop --wait 1`` while a worker finishes a call (held until both commands returned:
    on a loaded machine each takes seconds): the exit code of every command whose --wait runs out
    (8), one line naming the process still stopping, ``--json``'s error document; and it returns
    when its wait is over, not once the worker is gone."""
    from tests.harness.supervisord import dspexctl, small_stack

    with small_stack({"triage_pool": 1}) as stack, stack.client(60) as dx:
        s = dx.session("triage_pool")
        s.exec("import os, time\n"
               "def held(started, release):\n"
               "    open(started, 'w').close()\n"
               "    deadline = time.monotonic() + 25\n"  # (within the worker's stopwaitsecs, 30)
               "    while not os.path.exists(release) and time.monotonic() < deadline:\n"
               "        time.sleep(0.05)\n")
        started, release = os.path.join(stack.root, "started"), os.path.join(stack.root, "release")
        call = dx.submit(lambda: s.eval("held(a, b)", {"a": started, "b": release}))
        wait_for(lambda: os.path.exists(started), 20, 0.05, "the call running")
        res = dspexctl(stack, "pools", "stop", "--wait", "1")
        assert not call.done(), "the command waited past its --wait, until the worker was gone"
        again = dspexctl(stack, "--json", "pools", "stop", "--wait", "1")
        assert not call.done()
        open(release, "w").close()
        assert call.result(30) is None, "supervisord let the worker finish its call"
        for r in (res, again):
            no_traceback(r)
            assert r.returncode == 8, r.stdout + r.stderr
        line = "triage_pool:triage_pool_00 is still STOPPING after 1s"
        last = res.stderr.splitlines()[-1]  # after the progress lines ("stopping triage_pool")
        assert last.startswith("Error: ") and line in last and res.stdout == "", res.stdout + res.stderr
        error = json.loads(again.stdout)["error"]
        assert error["code"] == "timeout" and error["exit"] == 8 and line in error["message"], error
        done = dspexctl(stack, "pools", "stop")
        assert done.returncode == 0 and done.stdout.splitlines() == ["triage_pool:triage_pool_00: STOPPED"], done


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_pools_start_starts_a_worker_that_was_still_stopping_once_it_stopped() -> None:
    """After a ``pools stop`` whose --wait ran out, supervisord goes on stopping the worker (it
    finishes its call): a ``pools start`` then cannot start it at once, and must start it once it
    has stopped rather than wait for a worker nobody starts."""
    from tests.harness.supervisord import dspexctl, small_stack

    with small_stack({"triage_pool": 1}) as stack, stack.client(60) as dx:
        s = dx.session("triage_pool")
        s.exec("import os, time\n"
               "def held(started, release):\n"
               "    open(started, 'w').close()\n"
               "    deadline = time.monotonic() + 60\n"
               "    while not os.path.exists(release) and time.monotonic() < deadline:\n"
               "        time.sleep(0.05)\n")
        started, release = os.path.join(stack.root, "started"), os.path.join(stack.root, "release")
        call = dx.submit(lambda: s.eval("held(a, b)", {"a": started, "b": release}))
        wait_for(lambda: os.path.exists(started), 20, 0.05, "the call running")
        assert dspexctl(stack, "pools", "stop", "--wait", "0.5").returncode == 8
        env = {k: v for k, v in stack.env.items() if k != "DSPEX_SUPERVISOR_CONF"}
        start = subprocess.Popen([sys.executable, "-m", "dspexctl", "pools", "start", "--wait", "30"], cwd=stack.root,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert start.stderr is not None
            lines = []
            while not lines or not lines[-1].startswith("waiting"):  # it has seen the worker stopping
                lines.append(start.stderr.readline())
                assert lines[-1], "".join(lines)
            open(release, "w").close()
            out, err = start.communicate(timeout=60)
        finally:
            if start.poll() is None:
                start.kill()
                start.wait()
        assert call.result(30) is None, "supervisord let the worker finish its call"
        assert start.returncode == 0, "".join(lines) + err + out
        assert out.startswith("triage_pool: 1/1 ready"), out
        assert len(stack.ready("triage_pool")) == 1


def test_status_verbose_with_nothing_running_shows_no_empty_worker_tables(here: Path) -> None:
    (here / "supervisor.conf").write_text(small_conf_text({"triage_pool": 2, "analytics_pool": 1}))
    (here / "run").mkdir()
    res = run(["-m", "dspexctl", "pools", "status", "-v"], here)
    assert res.returncode == 4, res.stdout + res.stderr
    assert "PROCESS" not in res.stdout, res.stdout  # no worker is known: no worker header either
    assert [ln.split()[0] for ln in res.stdout.splitlines()[:3]] == ["POOL", "triage_pool", "analytics_pool"]


def test_a_broker_started_by_hand_beside_a_conf_nobody_runs_is_not_judged_by_it(stack: Stack) -> None:
    """The README's by-hand block runs in the checkout, beside supervisor.conf: its pools, which
    that broker never declared, are not DOWN, and the supervisord nobody started is not trouble."""
    stack.pool("triage_pool:strict_queue", 1, "--no-dspy").close()
    root = Path(stack.root)
    (root / "supervisor.conf").write_text(small_conf_text({"triage_pool": 2, "analytics_pool": 1}))
    (root / "run").mkdir()
    env = {**stack.env, "DSPEX_ENDPOINT": stack.frontend}
    res = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "status"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [ln.split()[0] for ln in res.stdout.splitlines()[:2]] == ["POOL", "triage_pool"], res.stdout
    assert f"supervisord: not used: {root / 'supervisor.conf'} is not this broker's" in res.stdout
    doc = json.loads(subprocess.run([sys.executable, "-m", "dspexctl", "pools", "status", "--json"], cwd=root,
                                    env=env, capture_output=True, text=True, timeout=60).stdout)
    assert doc["health"] == "ok" and doc["supervisor"]["unused"] and not doc["problems"], doc
    # asked for by name, the conf is joined: its pools are expected, its supervisord is missing
    res = subprocess.run([sys.executable, "-m", "dspexctl", "--supervisor-conf", "supervisor.conf", "pools",
                          "status"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 4 and "UNREACHABLE: supervisord is not running" in res.stdout, res.stdout


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_pools_stop_says_what_it_waits_for_while_a_worker_finishes_its_call() -> None:
    stack = SupervisedStack(small_conf_text({"triage_pool": 1}), venv_link=False)
    try:
        res = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "start", "--wait", "90"], cwd=stack.root,
                             env=stack.env, capture_output=True, text=True, timeout=120)
        stack.adopt_daemon()
        assert res.returncode == 0, res.stdout + res.stderr
        (worker,) = stack.ready("triage_pool")
        with stack.client(60) as dx:
            s = dx.session("triage_pool")
            s.exec("import pathlib, time\ndef slow(started):\n    pathlib.Path(started).touch()\n    time.sleep(4)\n")
            started = os.path.join(stack.root, "started")
            call = dx.submit(lambda: s.eval("slow(p)", {"p": started}))
            # running on the worker, not only sent to it: a request the worker has not started
            # when the stop comes is answered "did not run" (SessionWorkerUnavailable)
            wait_for(lambda: os.path.exists(started), 20, 0.05, "the call running")
            res = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "stop"], cwd=stack.root, env=stack.env,
                                 capture_output=True, text=True, timeout=60)
            assert call.result(30) is None  # it finished: the stop waited for it
        assert res.returncode == 0, res.stdout + res.stderr
        assert ("waiting for triage_pool:triage_pool_00 to stop (a worker finishes its running calls first)"
                in res.stderr.splitlines()), res.stderr
        assert res.stdout.splitlines() == ["triage_pool:triage_pool_00: STOPPED"], res.stdout
        assert not pid_alive(worker["pid"])
    finally:
        stack.stop()
        stack.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_stop_while_supervisord_shuts_down_waits_for_it() -> None:
    """A second `dspexctl stop` (after a first one ran out of --wait, or another operator's) finds
    supervisord shutting down, which refuses every XML-RPC call: it waits for the exit, exit 0."""
    stack = SupervisedStack(small_conf_text({"triage_pool": 1}), venv_link=False)
    try:
        res = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "start", "--wait", "90"], cwd=stack.root,
                             env=stack.env, capture_output=True, text=True, timeout=120)
        stack.adopt_daemon()
        assert res.returncode == 0, res.stdout + res.stderr
        pid = stack.supervisord_pid
        assert pid
        with stack.client(60) as dx:
            s = dx.session("triage_pool")
            s.exec("import pathlib, time\ndef slow(started):\n    pathlib.Path(started).touch()\n    time.sleep(4)\n")
            started = os.path.join(stack.root, "started")
            call = dx.submit(lambda: s.eval("slow(p)", {"p": started}))
            wait_for(lambda: os.path.exists(started), 20, 0.05, "the call running")
            with stack.supervisor() as sup:
                sup.shutdown()  # the worker finishes its call first: supervisord shuts down for seconds
            res = subprocess.run([sys.executable, "-m", "dspexctl", "stop"], cwd=stack.root, env=stack.env,
                                 capture_output=True, text=True, timeout=60)
            call.result(30)
        no_traceback(res)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.startswith(f"supervisord (pid {pid}) of {stack.root}"), res.stdout
        assert "was shutting down already; it exited" in res.stdout, res.stdout
        assert not pid_alive(pid)
    finally:
        stack.stop()
        stack.cleanup()
