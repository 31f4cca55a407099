"""Pool declarations: ``NAME:MODE[:key=value,...]`` on the command line, or ``[dspex:pool:NAME]``
sections in supervisor.conf (supervisord ignores sections it does not know)."""

from __future__ import annotations

import configparser
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from dspex.stack.health import HEALTH_WINDOW_S
from dspex.wire.errors import ConfigError
from dspex.wire.protocol import Affinity

SECTION_PREFIX = "dspex:pool:"


@dataclass
class RecyclePolicy:
    """When the broker retires a worker by itself (0 means never)."""

    max_requests: int = 0
    max_age: float = 0.0
    age_jitter: float = 0.1  # fraction of max_age, so a pool's workers do not all retire at once
    max_rss_mb: float = 0.0


@dataclass
class PoolConfig:
    name: str
    affinity: Affinity = Affinity.STRICT_QUEUE
    queue_max: int = 1000
    queue_timeout: float = 30.0
    session_ttl: float = 3600.0
    size: int = 0  # expected workers (from supervisor.conf); 0 = unknown
    # calls one worker runs at once (threads); read by the workers. 0: the section does not say, so
    # a worker takes its --capacity, else DSPEX_CAPACITY, else 1
    capacity: int = 0
    # strict_queue, capacity-1 workers: how many pinned requests the broker may send a worker
    # ahead of the reply to its running call (behind short calls only), so it does not idle a
    # broker round trip between calls; each carries its queue deadline, which the worker enforces.
    # The default is the depth measured best (docs/benchmarks.md, on prefetch depth and wake-ups);
    # the requests behind a pinned worker wait for it either way
    prefetch: int = 4
    drain_timeout: float = 600.0  # a draining (recycled, stopping) worker busy longer is stopped hard; 0: never
    durable: bool = False  # every session of the pool is durable (checkpointed, moved when its worker goes)
    # seconds of the sliding window the pool's health counts the service's failures in (WARN)
    health_window: float = HEALTH_WINDOW_S
    recycle: RecyclePolicy = field(default_factory=RecyclePolicy)


_POOL_KEYS = {f.name: f.type for f in fields(PoolConfig) if f.name not in ("name", "affinity", "recycle")}
_RECYCLE_KEYS = {f.name for f in fields(RecyclePolicy)}
# the range of each number (lowest, whether the lowest itself is allowed, highest); a value out of
# it would not fail at once but misbehave (a queue that refuses everything, a recycle storm)
_RANGES: dict[str, tuple[float, bool, float]] = {
    "queue_max": (1, True, math.inf), "capacity": (1, True, math.inf), "queue_timeout": (0, False, math.inf),
    "session_ttl": (0, False, math.inf), "health_window": (0, False, math.inf), "age_jitter": (0, True, 1),
    **dict.fromkeys(("drain_timeout", "prefetch", "size", "max_requests", "max_age", "max_rss_mb"),
                    (0, True, math.inf)),
}
# settings earlier versions had: a conf that still sets one is told why it is refused
_REMOVED_KEYS = {"direct": "direct pools were removed: every call goes through the broker"}


def _apply(cfg: PoolConfig, key: str, value: str, where: str) -> None:
    key = key.strip().replace("-", "_")
    try:
        if key == "affinity":
            cfg.affinity = Affinity(value.strip())
        elif key in _RECYCLE_KEYS:
            setattr(cfg.recycle, key, type(getattr(cfg.recycle, key))(value))
        elif key in _POOL_KEYS and isinstance(getattr(cfg, key), bool):
            setattr(cfg, key, configparser.RawConfigParser.BOOLEAN_STATES[value.strip().lower()])  # KeyError: not a boolean
        elif key in _POOL_KEYS:
            setattr(cfg, key, type(getattr(cfg, key))(value))
        elif key in _REMOVED_KEYS:
            raise ConfigError(f"{where}: pool setting {key!r} was removed ({_REMOVED_KEYS[key]}); delete it")
        else:
            raise ConfigError(f"{where}: unknown pool setting {key!r}")
    except (KeyError, ValueError):
        one_of = f" (one of {', '.join(a.value for a in Affinity)})" if key == "affinity" else ""
        raise ConfigError(f"{where}: bad value {value!r} for {key!r}{one_of}") from None
    if key in _RANGES:
        _check_range(key, getattr(cfg.recycle if key in _RECYCLE_KEYS else cfg, key), where)


def _check_range(key: str, number: float, where: str) -> None:
    low, low_ok, high = _RANGES[key]
    if math.isfinite(number) and (number > low or (low_ok and number == low)) and number <= high:
        return
    if high < math.inf:
        rule = f"between {low:g} and {high:g}"
    else:
        rule = f"at least {low:g}" if low_ok else f"above {low:g}"
    finite = "" if math.isfinite(number) else " and finite"
    raise ConfigError(f"{where}: {key} must be {rule}{finite}, not {number:g}")


def check_pool(cfg: PoolConfig, where: str) -> None:
    """Settings that contradict each other."""
    if cfg.durable and cfg.affinity is Affinity.NONE:
        raise ConfigError(f"{where}: pool {cfg.name!r} keeps no session state (affinity none): its sessions cannot "
                          "be durable; use strict_queue, strict_fail_fast or hint")


def parse_pool_spec(spec: str) -> PoolConfig:
    """``triage_pool:strict_queue:queue_max=100,queue_timeout=5``."""
    parts = spec.split(":", 2)
    if not parts[0]:
        raise ConfigError(f"bad pool spec {spec!r}: expected NAME[:MODE[:key=value,...]]")
    cfg = PoolConfig(parts[0])
    if len(parts) > 1 and parts[1]:
        _apply(cfg, "affinity", parts[1], f"pool spec {spec!r}")
    if len(parts) > 2 and parts[2]:
        for item in parts[2].split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"pool spec {spec!r}: expected key=value, got {item!r}")
            _apply(cfg, key, value, f"pool spec {spec!r}")
    check_pool(cfg, f"pool spec {spec!r}")
    return cfg


# a pool's name is its supervisord group's and processes' too
_SUPERVISOR_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def load_pools(conf_path: str | Path) -> list[PoolConfig]:
    """The ``[dspex:pool:NAME]`` sections of a supervisor.conf, in file order."""
    path = Path(conf_path)
    parser = _read_conf(path)
    pools = []
    for section in parser.sections():
        if section.lower().startswith("dspex") and not section.startswith(SECTION_PREFIX):
            # supervisord ignores it and the broker would too: the pool would run on defaults
            raise ConfigError(f"{path} [{section}]: not a dspex section (a pool's settings go in "
                              f"[{SECTION_PREFIX}NAME])")
        if section.startswith(SECTION_PREFIX):
            name = section[len(SECTION_PREFIX):]
            if not _SUPERVISOR_NAME.fullmatch(name):
                raise ConfigError(f"{path} [{section}]: pool name {name!r}: use ASCII letters, digits, '_', '-' and "
                                  "'.' (supervisord refuses spaces, ':' and '/', and its XML-RPC garbles the answers "
                                  "that name anything not ASCII)")
            cfg = PoolConfig(name)
            for key, value in parser.items(section):
                _apply(cfg, key, value, f"{path} [{section}]")
            check_pool(cfg, f"{path} [{section}]")
            pools.append(cfg)
    sizes = _group_sizes(parser)
    for cfg in pools:
        _check_has_workers(parser, path, cfg.name)
        if not cfg.size:  # a size in the pool's own section wins over numprocs
            cfg.size = sizes.get(cfg.name, 0)
    return pools


def _read_conf(path: Path) -> configparser.RawConfigParser:
    """The conf, parsed as supervisord parses it (a repeated key or section elsewhere is its
    business: the last one wins), except that a ``[dspex:pool:NAME]`` section or key given twice
    is refused: which of the two the operator meant is a guess."""
    def parser(strict: bool) -> configparser.RawConfigParser:
        return configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=strict)

    try:
        strict = parser(True)
        if not strict.read(path):
            raise ConfigError(f"cannot read {path}")
        return strict
    except (configparser.DuplicateSectionError, configparser.DuplicateOptionError) as err:
        if err.section.startswith(SECTION_PREFIX):
            what = f"[{err.section}]" if isinstance(err, configparser.DuplicateSectionError) else \
                f"{err.option!r} of [{err.section}]"
            raise ConfigError(f"{path}, line {err.lineno}: {what} is given twice; keep one") from None
        lenient = parser(False)
        lenient.read(path)
        return lenient
    except (configparser.Error, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot parse {path}: {' '.join(str(err).split())}") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None


def _numprocs(parser: configparser.RawConfigParser, program: str) -> int | None:
    """A program's numprocs; None when it has no section or a numprocs supervisord would expand
    (``%(ENV_X)s``), which is not guessed at."""
    section = f"program:{program.strip()}"
    if not parser.has_section(section):
        return None
    try:
        return int(parser.get(section, "numprocs", fallback="1"))
    except ValueError:
        return None


def _group_programs(parser: configparser.RawConfigParser, group: str) -> list[str]:
    return [p.strip() for p in parser.get(f"group:{group}", "programs", fallback="").split(",") if p.strip()]


def _check_has_workers(parser: configparser.RawConfigParser, path: Path, pool: str) -> None:
    """supervisord accepts a numprocs of 0 or less: the pool would start with no worker and look
    healthy (0/0 ready) while it can serve nothing."""
    programs = _group_programs(parser, pool) if parser.has_section(f"group:{pool}") else [pool]
    for program in programs:
        count = _numprocs(parser, program)
        if count is not None and count < 1:
            raise ConfigError(f"{path} [program:{program}]: numprocs must be at least 1, not {count} "
                              f"(pool {pool!r} would have no workers)")


def _group_sizes(parser: configparser.RawConfigParser) -> dict[str, int]:
    """Processes per supervisord group: a pool's size is the numprocs of its ``[group:POOL]``.

    A ``size`` in ``[dspex:pool:NAME]`` wins; a numprocs not known here counts as unknown (0).
    """
    sizes: dict[str, int] = {}
    grouped: set[str] = set()
    for section in parser.sections():
        if section.startswith("group:"):
            programs = _group_programs(parser, section[len("group:"):])
            grouped.update(programs)
            sizes[section[len("group:"):]] = sum(_numprocs(parser, p) or 0 for p in programs)
    for section in parser.sections():
        if section.startswith("program:") and section[len("program:"):] not in grouped:
            sizes.setdefault(section[len("program:"):], _numprocs(parser, section[len("program:"):]) or 0)
    return sizes
