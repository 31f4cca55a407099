"""DSPy's own tests/clients/test_cache.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test function
is the program, run in-process and through a session (``run.check``: its asserts hold on either side,
it returns None); pytest's ``tmp_path``, and a ``monkeypatch`` made where the program runs, are passed
to the tests that take them (``harness.run_dspy_test``).

Not here:
- takes DSPy's fixture ``cache``: ``test_cache_key_generation``, ``test_put_and_get``,
  ``test_cache_miss``, ``test_unserializable_key``, ``test_reset_memory_cache``,
  ``test_save_and_load_memory_cache``, ``test_request_cache_decorator``,
  ``test_request_cache_decorator_with_ignored_args_for_cache_key``,
  ``test_request_cache_decorator_async``,
  ``test_cache_consistency_with_lm_call_modifies_the_request``,
  ``test_prepare_cached_response_marks_strict_models_as_cache_hit``;
- takes DSPy's fixture ``restricted_cache``: ``test_model_response_roundtrip_in_restricted_mode``,
  ``test_unlisted_type_rejected_on_read``.
"""

import os
from dataclasses import dataclass

import dspy
import pydantic
import pytest
from cachetools import LRUCache
from diskcache import FanoutCache
from dspy.clients.cache import Cache

from tests.conformance.harness import DSPY_TEST_WARNINGS, Runner, dspy_test_cases, run_dspy_test


@dataclass
class DummyResponse:
    message: str
    usage: dict


@dataclass
class CacheValidationDataclass:
    name: str
    value: int


def dspy_test_initialization(tmp_path):
    """Test different cache initialization configurations."""
    # Test memory-only cache
    memory_cache = Cache(
        enable_disk_cache=False,
        enable_memory_cache=True,
        disk_cache_dir="",
        disk_size_limit_bytes=0,
        memory_max_entries=50,
    )
    assert isinstance(memory_cache.memory_cache, LRUCache)
    assert memory_cache.memory_cache.maxsize == 50
    assert memory_cache.disk_cache == {}

    # Test disk-only cache
    disk_cache = Cache(
        enable_disk_cache=True,
        enable_memory_cache=False,
        disk_cache_dir=str(tmp_path),
        disk_size_limit_bytes=1024,
        memory_max_entries=0,
    )
    assert isinstance(disk_cache.disk_cache, FanoutCache)
    assert disk_cache.memory_cache == {}

    # Test disabled cache
    disabled_cache = Cache(
        enable_disk_cache=False,
        enable_memory_cache=False,
        disk_cache_dir="",
        disk_size_limit_bytes=0,
        memory_max_entries=0,
    )
    assert disabled_cache.memory_cache == {}
    assert disabled_cache.disk_cache == {}


def dspy_test_invalid_cache_initialization():
    with pytest.raises(ValueError, match=r"`memory_max_entries` must be a positive number, but received -1"):
        Cache(
            enable_disk_cache=False,
            enable_memory_cache=True,
            disk_cache_dir="",
            disk_size_limit_bytes=0,
            memory_max_entries=-1,
        )
    with pytest.raises(
        ValueError, match=r"`memory_max_entries` cannot be None. Use `math.inf` if you need an unbounded cache."
    ):
        Cache(
            enable_disk_cache=False,
            enable_memory_cache=True,
            disk_cache_dir="",
            disk_size_limit_bytes=0,
            memory_max_entries=None,
        )


def dspy_test_cache_fallback_on_restricted_environment():
    """Test that DSPy gracefully falls back to memory-only cache when disk cache fails."""
    old_env = os.environ.get("DSPY_CACHEDIR")
    try:
        # Set an invalid cache directory that can't be created
        os.environ["DSPY_CACHEDIR"] = "/dev/null/invalid_path"

        import dspy
        from dspy.clients import _get_dspy_cache

        dspy.cache = _get_dspy_cache()

        # Cache should work with memory-only fallback despite invalid disk path
        test_request = {"model": "test", "prompt": "hello"}
        dspy.cache.put(test_request, "fallback_result")
        result = dspy.cache.get(test_request)

        assert result == "fallback_result", "Memory cache fallback should work"

    finally:
        if old_env is None:
            os.environ.pop("DSPY_CACHEDIR", None)
        else:
            os.environ["DSPY_CACHEDIR"] = old_env


def dspy_test_cache_init_with_disk_disabled_and_none_dir():
    cache = Cache(
        enable_disk_cache=False,
        enable_memory_cache=True,
        disk_cache_dir=None,
    )
    assert cache.disk_cache_dir is None
    assert cache.enable_disk_cache is False


# -- restrict_pickle tests --


def dspy_test_registered_dataclass_roundtrip_in_restricted_mode(tmp_path):
    cache = Cache(
        enable_disk_cache=True,
        enable_memory_cache=False,
        disk_cache_dir=str(tmp_path),
        restrict_pickle=True,
        safe_types=[CacheValidationDataclass],
    )
    request = {
        "model": "test",
        "prompt": "registered_dataclass_test",
        "payload": CacheValidationDataclass(name="request", value=1),
    }
    response = CacheValidationDataclass(name="hello", value=3)

    cache.put(request, response)
    result = cache.get(request)

    assert isinstance(result, CacheValidationDataclass)
    assert result == response


def dspy_test_configure_cache_registers_safe_types(tmp_path):
    original_cache = dspy.cache
    try:
        dspy.configure_cache(
            enable_disk_cache=True,
            enable_memory_cache=False,
            disk_cache_dir=str(tmp_path / "configured"),
            restrict_pickle=True,
            safe_types=[CacheValidationDataclass],
        )
        request = {"model": "test", "prompt": "configured_safe_type"}
        response = CacheValidationDataclass(name="configured", value=7)

        dspy.cache.put(request, response)
        result = dspy.cache.get(request)

        assert isinstance(result, CacheValidationDataclass)
        assert result == response
    finally:
        dspy.cache = original_cache


def dspy_test_corrupt_disk_entries_return_none(tmp_path):
    """Real pickle corruption in a cache entry must return None, not raise."""
    import sqlite3

    cache = Cache(
        enable_disk_cache=True,
        enable_memory_cache=False,
        disk_cache_dir=str(tmp_path),
        restrict_pickle=True,
    )
    request = {"model": "test", "prompt": "will_be_corrupted"}
    cache.put(request, {"value": "good"})
    key = cache.cache_key(request)

    # Corrupt the pickle blob in the SQLite database
    for shard_id in range(16):
        db_path = os.path.join(str(tmp_path), f"{shard_id:03d}", "cache.db")
        if not os.path.exists(db_path):
            continue
        conn = sqlite3.connect(db_path)
        row = conn.execute("SELECT rowid, value FROM Cache WHERE key = ?", (key,)).fetchone()
        if row:
            conn.execute("UPDATE Cache SET value = X'DEADBEEF' WHERE rowid = ?", (row[0],))
            conn.commit()
        conn.close()

    assert cache.get(request) is None


def dspy_test_restricted_and_unrestricted_share_wire_format(tmp_path):
    """Both modes use standard pickle, so entries written by one can be read by the other."""
    shared_dir = tmp_path / "shared"
    request = {"model": "test", "prompt": "shared"}

    unrestricted = Cache(
        enable_disk_cache=True, enable_memory_cache=False,
        disk_cache_dir=shared_dir, disk_size_limit_bytes=1024 * 1024,
    )
    unrestricted.put(request, {"value": "hello"})
    unrestricted.disk_cache.close()

    restricted = Cache(
        enable_disk_cache=True, enable_memory_cache=False,
        disk_cache_dir=shared_dir, disk_size_limit_bytes=1024 * 1024,
        restrict_pickle=True,
    )
    assert restricted.get(request) == {"value": "hello"}


@dataclass
class _UnlistedDataclass:
    value: int


def dspy_test_safe_types_rejects_non_types(tmp_path):
    with pytest.raises(TypeError, match="safe_types entries must be types"):
        Cache(
            enable_disk_cache=True,
            enable_memory_cache=False,
            disk_cache_dir=str(tmp_path),
            restrict_pickle=True,
            safe_types=["not_a_type"],
        )


class _StrictProviderResponse(pydantic.BaseModel):
    """Mimics strict provider SDK models (e.g. litellm's ResponsesAPIResponse)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    output: list[dict]
    usage: dict


pytestmark = DSPY_TEST_WARNINGS

# -- the cases: DSPy's test functions as programs, in-process and through a session --


SYNC_TESTS = [dspy_test_initialization, dspy_test_invalid_cache_initialization,
    dspy_test_cache_fallback_on_restricted_environment, dspy_test_cache_init_with_disk_disabled_and_none_dir,
    dspy_test_corrupt_disk_entries_return_none, dspy_test_restricted_and_unrestricted_share_wire_format,
    dspy_test_safe_types_rejects_non_types,
    # these two pickle this module's CacheValidationDataclass with the standard ``pickle``, which finds
    # it by name in ``sys.modules``: the session's copy's class (worker/namespace.py)
    dspy_test_registered_dataclass_roundtrip_in_restricted_mode, dspy_test_configure_cache_registers_safe_types]


@pytest.mark.parametrize(("dspy_test", "kwargs"), dspy_test_cases(SYNC_TESTS))
def test_cache_tests_of_dspy(run: Runner, dspy_test, kwargs, tmp_path) -> None:
    assert run.check(run_dspy_test, dspy_test, tmp_path, **kwargs) is None  # its asserts held where it ran
