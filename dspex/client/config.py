"""A client's settings: what it takes from the environment, read when a client is made
(``dspex.connect``, ``dspex.aio.connect``); an argument given to ``connect`` wins over it.
docs/operations.md (*Environment*) lists every variable of every process kind."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dspex.wire.sockets import check_endpoint, default_frontend, env_number, max_message_bytes, run_dir

DEFAULT_REPLY_GRACE = 7.0  # seconds a client waits past a call's timeout for its worker's own reply
DEFAULT_CODE_CACHE = 4096  # code objects a session remembers its worker holds
DEFAULT_IDLE_SOCKETS = 8  # idle sockets a blocking client keeps for its next requests
DEFAULT_CLIENT_THREADS = 16  # threads of the pool a blocking client's ``submit`` runs calls on


@dataclass(frozen=True)
class ClientConfig:
    """The environment as a client sees it (its ``client_settings`` option is another thing: this
    process's DSPy settings sent with its calls)."""

    endpoint: str | None  # DSPEX_ENDPOINT: one broker for every pool
    endpoints: str | None  # DSPEX_ENDPOINTS: a pool -> endpoint map
    frontend: str  # the broker's frontend when neither is given (DSPEX_FRONTEND, else the run directory's)
    run_dir: str  # DSPEX_RUN_DIR, or its default
    run_dir_given: bool  # whether DSPEX_RUN_DIR is set (dspexctl's diagnostics say which)
    curve_server_key: str | None  # DSPEX_CURVE_SERVER_KEY: the broker's public key file (tcp://)
    curve_client_key: str | None  # DSPEX_CURVE_CLIENT_KEY: this client's secret key file (tcp://)
    max_message: int  # DSPEX_MAX_MESSAGE
    reply_grace: float  # DSPEX_REPLY_GRACE
    code_cache: int  # DSPEX_CODE_CACHE
    idle_sockets: int = DEFAULT_IDLE_SOCKETS  # DSPEX_CLIENT_IDLE_SOCKETS (the blocking client)
    threads: int = DEFAULT_CLIENT_THREADS  # DSPEX_CLIENT_THREADS (the blocking client's submit)

    @classmethod
    def from_env(cls) -> ClientConfig:
        env = os.environ
        return cls(
            endpoint=env.get("DSPEX_ENDPOINT") or None,
            endpoints=env.get("DSPEX_ENDPOINTS", "").strip() or None,
            frontend=default_frontend(env),
            run_dir=str(run_dir(env)),
            run_dir_given=bool(env.get("DSPEX_RUN_DIR")),
            curve_server_key=env.get("DSPEX_CURVE_SERVER_KEY") or None,
            curve_client_key=env.get("DSPEX_CURVE_CLIENT_KEY") or None,
            max_message=max_message_bytes(env),
            reply_grace=env_number(env, "DSPEX_REPLY_GRACE", DEFAULT_REPLY_GRACE),
            code_cache=env_number(env, "DSPEX_CODE_CACHE", DEFAULT_CODE_CACHE),
            idle_sockets=env_number(env, "DSPEX_CLIENT_IDLE_SOCKETS", DEFAULT_IDLE_SOCKETS),
            threads=env_number(env, "DSPEX_CLIENT_THREADS", DEFAULT_CLIENT_THREADS),
        )

    def endpoint_or_default(self, endpoint: str | None = None, given: str = "the endpoint given") -> str:
        """The one broker a client of ``endpoint`` talks to: that (``given`` says where it was
        given), else ``DSPEX_ENDPOINT``, else the default frontend; checked, an error naming where
        it came from (:func:`check_endpoint`)."""
        if endpoint and endpoint != self.endpoint:
            return check_endpoint(endpoint, given)
        if self.endpoint:
            return check_endpoint(self.endpoint, "DSPEX_ENDPOINT")
        return check_endpoint(self.frontend, "DSPEX_FRONTEND")  # (else the run directory's: ipc://)
