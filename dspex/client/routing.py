"""A client of several brokers: requests go to the broker of their pool.

``dspex.connect(endpoints={...})`` (or ``DSPEX_ENDPOINTS``) with more than one broker gives a
:class:`Router` of the client kind: one ordinary client of that kind per broker, made up front
(each connects at its first request), and every request handed to the one of its pool. A session
belongs to its pool's broker client from the start, so its calls cost what they cost with one
broker. The ops that are about no pool (``status``, ``ping``, ``sessions``, ``close_session``
by id) ask every broker in turn and merge the answers, each part saying which broker it came from
(:func:`merge`). One broker for every pool stays the plain client of its kind, untouched:
:func:`open_client` chooses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, Unpack

from dspex.client.api import DEFAULT_TIMEOUT, ClientAPI, S
from dspex.client.arguments import check_session_args
from dspex.client.config import ClientConfig
from dspex.client.endpoints import ANY_POOL, Broker, BrokerMap, broker_map
from dspex.client.sessionapi import RequestOptions, Steps, _raising
from dspex.wire.errors import DspexError, PoolNotFound
from dspex.wire.ops import WORKER_OPS, Op
from dspex.wire.sockets import curve_client_keys

ServerKey = bytes | Mapping[str, bytes] | None
C = TypeVar("C", bound=ClientAPI[Any])


def open_client(one: type[C], several: type[Router[Any]], endpoint: str | None,
                endpoints: Mapping[str, str] | str | None, timeout: float, *, curve_server_key: ServerKey,
                curve_keypair: tuple[bytes, bytes] | None, forward_output: bool, client_settings: bool) -> Any:
    """``connect()`` of a client kind: ``one`` (the kind's client) for one broker of every pool,
    ``several`` (its :class:`Router`) for a map of more brokers, or one that names its pools (a
    pool it does not name is then refused before anything is sent). ``curve_server_key`` may map
    endpoints to keys."""
    config = ClientConfig.from_env()
    brokers = broker_map(config, endpoint, endpoints)
    if brokers.several or ANY_POOL not in brokers.routes:
        return several(brokers, timeout, curve_server_key=curve_server_key, curve_keypair=curve_keypair,
                       forward_output=forward_output, client_settings=client_settings)
    broker = brokers.brokers[0]
    server_key, keypair = broker_keys(broker, config, curve_server_key, curve_keypair)
    return one(broker.endpoint, timeout, curve_server_key=server_key, curve_keypair=keypair,
               forward_output=forward_output, client_settings=client_settings)


def broker_keys(broker: Broker, config: ClientConfig, server_key: ServerKey = None,
                keypair: tuple[bytes, bytes] | None = None) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
    """The CURVE keys of ``broker``'s client: given ones (``server_key`` by endpoint when a map),
    else for a ``tcp://`` broker the files of its map entry or of ``DSPEX_CURVE_SERVER_KEY`` /
    ``DSPEX_CURVE_CLIENT_KEY`` (a ``ConfigError`` when there are none)."""
    key = server_key.get(broker.endpoint) if isinstance(server_key, Mapping) else server_key
    if key is None and broker.endpoint.startswith("tcp://"):
        key, from_files = curve_client_keys(
            broker.endpoint, broker.server_key or config.curve_server_key,
            broker.client_key or config.curve_client_key)
        keypair = keypair or from_files
    return key, keypair


class Router(ClientAPI[S]):
    """A client of several brokers, one per pool or group of pools (see the module). Mixed into
    each kind before the kind's client: ``RoutedClient(Router[Session], Client)``; the kind's own
    transport is never used, only its lifecycle (``close``, the blocking kind's ``submit``).

    ``endpoint`` is the broker of the pools the map does not name (``""`` when it has no ``"*"``);
    a session's ``client`` is its broker's client.
    """

    _broker_kind: type[ClientAPI[S]]  # the kind's client of one broker

    def __init__(self, brokers: BrokerMap, timeout: float = DEFAULT_TIMEOUT, *,
                 curve_server_key: ServerKey = None, curve_keypair: tuple[bytes, bytes] | None = None,
                 forward_output: bool = True, client_settings: bool = True) -> None:
        self._map = brokers
        config = self._options(timeout, forward_output, client_settings)
        self.endpoints = {pool: b.endpoint for pool, b in brokers.routes.items()}
        self.endpoint = self.endpoints.get(ANY_POOL, "")
        # every broker's keys first: a client is only made once nothing can fail
        keys = {b.endpoint: broker_keys(b, config, curve_server_key, curve_keypair) for b in brokers.brokers}
        self._brokers: dict[str, ClientAPI[S]] = {
            endpoint: self._broker_kind(endpoint, timeout, curve_server_key=server_key, curve_keypair=keypair,
                                        forward_output=forward_output, client_settings=client_settings)
            for endpoint, (server_key, keypair) in keys.items()}
        self._init_transport()

    def _broker(self, pool: str) -> ClientAPI[S]:
        return self._brokers[self._map.broker_for(pool).endpoint]

    # -- a pool's requests go to its broker -------------------------------------------------------
    def session(self, pool: str, session_id: str | None = None, *, durable: bool = False,
                forward_output: bool | None = None, client_settings: bool | None = None) -> S:
        check_session_args(pool, session_id)
        return self._broker(pool).session(pool, session_id, durable=durable, forward_output=forward_output,
                                          client_settings=client_settings)

    def request(self, op: str, pool: str = "", session: str = "", body: Any = None,
                **options: Unpack[RequestOptions]) -> Any:
        if not pool and op not in WORKER_OPS:
            return self._drive(self._every(op, session, body, options.get("timeout")))
        try:
            client = self._broker(pool)
        except PoolNotFound as err:
            return self._drive(_raising(err))
        return client.request(op, pool, session, body, **options)

    def stream(self, op: str, pool: str, session: str, body: Any, **options: Unpack[RequestOptions]) -> Any:
        return self._broker(pool).stream(op, pool, session, body, **options)

    def _every(self, op: str, session: str, body: Any, timeout: float | None) -> Steps[Any]:
        """``op`` asked of every broker in turn; their answers (or errors) merged."""
        answers: dict[str, Any] = {}
        for endpoint, client in self._brokers.items():
            try:
                answers[endpoint] = yield client.request(op, "", session, body, timeout=timeout)
            except DspexError as err:
                answers[endpoint] = err
        return merge(op, answers, self._map)

    # -- every broker's client ----------------------------------------------------------------------
    @property
    def open_sockets(self) -> int:
        return sum(client.open_sockets for client in self._brokers.values())

    @property
    def replaced_sockets(self) -> int:
        return sum(client.replaced_sockets for client in self._brokers.values())

    def cancel_all(self) -> None:
        for client in self._brokers.values():
            client.cancel_all()

    def close(self) -> Any:
        return self._drive(self._close_all())

    def _close_all(self) -> Steps[None]:
        yield super().close()  # the kind's own first: the blocking kind's submitted calls finish
        for client in self._brokers.values():
            yield client.close()


def merge(op: str, answers: Mapping[str, Any], brokers: BrokerMap) -> Any:
    """One answer of several brokers to an op that is about no pool. ``answers``: endpoint ->
    the broker's answer or its error (a DspexError).

    * ``status``: ``{"pools": {name: {..., "endpoint"}}, "brokers": {endpoint: ...}}``: each pool
      from the broker the map sends it to; per broker its own status with ``pools`` as the list of
      its pool names, or ``{"error": {"code", "message"}}``. A broker that cannot answer is
      reported there, never raised: status is what one reads when something is down.
    * ``ping``: ``{"brokers": {endpoint: its ping}}``; ``sessions``: every broker's sessions, each
      with its ``endpoint``. Both raise the first broker's error: their answer is all or nothing.
    * ``close_session`` (by id alone): the answer of the broker that closed it, with its
      ``endpoint``; else the first error, else ``{"closed": False, "released": False}``.
    """
    errors = [err for err in answers.values() if isinstance(err, DspexError)]
    if op == Op.STATUS.value:
        pools: dict[str, Any] = {}
        per_broker: dict[str, Any] = {}
        for endpoint, answer in answers.items():
            if isinstance(answer, DspexError):
                per_broker[endpoint] = {"error": {"code": answer.code, "message": answer.message}}
                continue
            per_broker[endpoint] = {**answer, "pools": list(answer["pools"])}
            pools.update((name, {**pool, "endpoint": endpoint}) for name, pool in answer["pools"].items()
                         if brokers.serves(endpoint, name))
        return {"pools": pools, "brokers": per_broker}
    if op == Op.CLOSE_SESSION.value:
        for endpoint, answer in answers.items():
            if isinstance(answer, dict) and answer.get("closed"):
                return {**answer, "endpoint": endpoint}
        if errors:
            raise errors[0]
        return {"closed": False, "released": False}
    if errors:
        raise errors[0]
    if op == Op.SESSIONS.value:
        return [{**s, "endpoint": endpoint} for endpoint, answer in answers.items() for s in answer]
    return {"brokers": dict(answers)}
