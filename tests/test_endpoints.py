"""What a client says about the endpoint it was given: the CLI as a subprocess, no stack.

A client only connects: it names what is wrong with *that* socket (nothing listening, not a
socket, not ours, permission denied) and never asks for the mode of a directory it was merely
pointed at to change; its own run directory, which the broker and workers keep 0700
(tests/test_security.py), gets the ``chmod 700`` that fixes it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.harness import base_env
from tests.harness.supervisord import small_conf_text
from tests.test_cli import no_traceback

HARMFUL = ("chmod", "mode 1777", "must be 0700", "is the broker running")


def ctl(cwd: str, *args: str, setpriv: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = base_env(os.path.join(cwd, "r"))
    return subprocess.run([*(setpriv or []), sys.executable, "-m", "dspexctl", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def bound_socket(path: str, listen: bool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if listen:
        sock.listen(1)
    return sock


@pytest.fixture
def tmp_sock() -> Iterator[str]:
    """A socket path directly in /tmp (root's sticky 1777 directory, as in the issue's typo)."""
    path = f"/tmp/dx-{uuid.uuid4().hex[:10]}.sock"
    try:
        yield path
    finally:
        if os.path.lexists(path):
            os.unlink(path)


def assert_not_misleading(res: subprocess.CompletedProcess[str]) -> None:
    no_traceback(res)
    for text in HARMFUL:
        assert text not in res.stdout + res.stderr, res.stdout + res.stderr


def test_a_mistyped_endpoint_in_tmp_says_nothing_listens_there(short_tmp: str, tmp_sock: str) -> None:
    res = ctl(short_tmp, "--endpoint", f"ipc://{tmp_sock}", "pools", "status")
    assert res.returncode == 4, res.stdout + res.stderr
    assert f"nothing is listening at ipc://{tmp_sock}: no socket file {tmp_sock}" in res.stdout
    assert_not_misleading(res)
    res = ctl(short_tmp, "--endpoint", f"ipc://{tmp_sock}", "sessions", "list")
    assert res.returncode == 4 and res.stderr.count("\n") == 1, res.stderr
    assert "no socket file" in res.stderr
    assert_not_misleading(res)


def test_a_missing_directory_is_named(short_tmp: str) -> None:
    res = ctl(short_tmp, "--endpoint", f"ipc://{short_tmp}/nodir/f.sock", "sessions", "list")
    assert res.returncode == 4, res.stderr
    assert f"its directory {short_tmp}/nodir does not exist" in res.stderr
    assert_not_misleading(res)


def test_a_stale_socket_file_is_named(short_tmp: str, tmp_sock: str) -> None:
    bound_socket(tmp_sock, listen=False).close()  # the file stays; nobody listens
    res = ctl(short_tmp, "--endpoint", f"ipc://{tmp_sock}", "sessions", "list")
    assert res.returncode == 4, res.stderr
    assert f"{tmp_sock} is a stale socket file" in res.stderr
    assert_not_misleading(res)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_path_that_is_not_a_socket_is_a_usage_error(short_tmp: str, kind: str) -> None:
    path = os.path.join(short_tmp, "thing")
    if kind == "file":
        open(path, "w").close()
    else:
        os.mkdir(path)
    res = ctl(short_tmp, "--endpoint", f"ipc://{path}", "pools", "status")
    assert res.returncode == 2, res.stdout + res.stderr
    word = "a regular file" if kind == "file" else "a directory"
    assert res.stderr == f"Error: cannot use ipc://{path}: {path} is {word}, not a unix socket\n"
    assert_not_misleading(res)


def test_a_socket_in_a_directory_others_may_write_is_refused_without_chmod_advice(short_tmp: str) -> None:
    shared = os.path.join(short_tmp, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    sock = bound_socket(os.path.join(shared, "f.sock"), listen=True)
    try:
        res = ctl(short_tmp, "--endpoint", f"ipc://{shared}/f.sock", "sessions", "list")
    finally:
        sock.close()
    assert res.returncode == 2, res.stderr
    assert f"its directory {shared} has mode 0777, writable by other users" in res.stderr
    assert_not_misleading(res)
    assert os.stat(shared).st_mode & 0o777 == 0o777, "nothing was chmodded"


def test_permission_denied_on_the_socket_is_named(short_tmp: str) -> None:
    """As root the kernel skips permission checks; setpriv drops that capability for the CLI."""
    setpriv = shutil.which("setpriv")
    if setpriv is None and os.geteuid() == 0:
        pytest.skip("root without setpriv cannot be denied a socket")
    path = os.path.join(short_tmp, "f.sock")
    sock = bound_socket(path, listen=True)
    os.chmod(path, 0)
    try:
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"] if setpriv else []
        res = ctl(short_tmp, "--endpoint", f"ipc://{path}", "sessions", "list", setpriv=prefix)
    finally:
        sock.close()
    assert res.returncode == 2, res.stderr
    assert res.stderr == f"Error: cannot use ipc://{path}: permission denied connecting to {path}\n"
    assert_not_misleading(res)


def run_dir_with_socket(short_tmp: str, mode: int) -> tuple[str, socket.socket]:
    """The run directory ``ctl`` uses (short_tmp/r) with a listening frontend.sock, then ``mode``."""
    run_dir = os.path.join(short_tmp, "r")
    os.mkdir(run_dir, 0o700)
    sock = bound_socket(os.path.join(run_dir, "frontend.sock"), listen=True)
    os.chmod(run_dir, mode)
    return run_dir, sock


def test_a_run_dir_others_may_write_is_refused_with_the_chmod_that_fixes_it(short_tmp: str) -> None:
    """The run directory is the stack's own and must be 0700 (the broker keeps that rule): for it,
    and only for it, the refusal gives the command that makes it so."""
    run_dir, sock = run_dir_with_socket(short_tmp, 0o777)
    try:
        res = ctl(short_tmp, "sessions", "list")
    finally:
        sock.close()
    no_traceback(res)
    assert res.returncode == 2, res.stderr
    assert f"its run directory {run_dir} has mode 0777, writable by other users" in res.stderr, res.stderr
    assert f"chmod 700 {run_dir}" in res.stderr, res.stderr
    assert os.stat(run_dir).st_mode & 0o777 == 0o777, "nothing was chmodded"


def test_a_run_dir_of_another_user_is_refused_with_the_way_out(short_tmp: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another uid")
    run_dir, sock = run_dir_with_socket(short_tmp, 0o700)
    os.chown(run_dir, 65534, 65534)
    try:
        res = ctl(short_tmp, "sessions", "list")
    finally:
        sock.close()
    assert_not_misleading(res)
    assert res.returncode == 2, res.stderr
    assert f"its run directory {run_dir} belongs to uid 65534" in res.stderr, res.stderr
    assert "set DSPEX_RUN_DIR to a directory of your own" in res.stderr, res.stderr


def test_a_run_dir_too_deep_for_a_socket_path_says_how_short_it_must_be(short_tmp: str) -> None:
    """``DSPEX_RUN_DIR`` deep in /tmp: the client, the broker and ``pools start`` each refuse it
    before binding or connecting, naming the limit and the longest directory that fits."""
    deep = os.path.join(short_tmp, "d" * 100)
    os.makedirs(deep, 0o700)
    fits = 107 - len("/frontend.sock")
    env = {**base_env(deep), "DSPEX_METRICS_PORT": "0"}
    conf = os.path.join(short_tmp, "supervisor.conf")
    with open(conf, "w") as f:
        f.write(small_conf_text())
    runs = {
        "client": [sys.executable, "-m", "dspexctl", "sessions", "list"],
        "broker": [sys.executable, "-m", "broker", "--pool", "p"],
        "pools start": [sys.executable, "-m", "dspexctl", "--supervisor-conf", conf, "pools", "start"],
    }
    for who, cmd in runs.items():
        res = subprocess.run(cmd, cwd=short_tmp, env=env, capture_output=True, text=True, timeout=60, check=False)
        no_traceback(res)
        assert res.returncode == 2, (who, res.stdout + res.stderr)
        assert "over the unix socket limit of 107 bytes" in res.stderr, (who, res.stderr)
        assert f"DSPEX_RUN_DIR of at most {fits} bytes" in res.stderr, (who, res.stderr)
    assert not os.path.exists(os.path.join(short_tmp, "run", "supervisord.pid")), "pools start started nothing"


def test_a_tcp_endpoint_without_a_port_names_the_variable_and_the_form(short_tmp: str) -> None:
    """``tcp://host`` without its port, in the variable each process reads: the client (a
    script's ``dspex.connect``), ``dspexctl``, the broker and a worker each say which variable,
    its value and the form it needs, before anything else ("CURVE is required", before)."""
    env = base_env(os.path.join(short_tmp, "r"))
    client = "import dspex\ndspex.connect()"
    runs = {
        "client": ("DSPEX_ENDPOINT", [sys.executable, "-c", client]),
        "dspexctl": ("DSPEX_ENDPOINT", [sys.executable, "-m", "dspexctl", "sessions", "list"]),
        "broker": ("DSPEX_FRONTEND", [sys.executable, "-m", "broker", "--pool", "p"]),
        "worker": ("DSPEX_BACKEND", [sys.executable, "-m", "worker", "--pool", "p", "--no-dspy"]),
        "map": ("DSPEX_ENDPOINTS[p]", [sys.executable, "-m", "dspexctl", "sessions", "list"]),
    }
    for who, (variable, cmd) in runs.items():
        value = "p=tcp://broker.example" if who == "map" else "tcp://broker.example"
        res = subprocess.run(cmd, cwd=short_tmp, env={**env, variable.partition("[")[0]: value}, capture_output=True,
                             text=True, timeout=60, check=False)
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "CURVE" not in out, (who, out)
        assert f"{variable}='tcp://broker.example' has no port: a tcp:// endpoint is tcp://HOST:PORT, such as " \
               "tcp://broker.example:5555" in out, (who, out)
