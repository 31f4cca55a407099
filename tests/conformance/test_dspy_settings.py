"""DSPy's own tests/utils/test_settings.py (stanfordnlp/dspy), unchanged but for the names (``test_*``
→ ``dspy_test_*``, so that pytest does not collect them here as well): each test function is the
program, run in-process and through a session (``run.check``: its asserts hold on either side, it
returns None).

Not here, because they fail in-process on DSPy 3.4.1 (written for another DSPy version: most build a
``dspy.LM("openai/...")`` with no API key, which 3.4.1 refuses before the litellm function they
patch is reached; the others assert prompts or fields of another version):
``test_dspy_context_with_dspy_parallel``, ``test_dspy_context_with_async_task_group``.
"""

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest

from tests.conformance.harness import AsyncRunner, Runner, dspy_test_id


def dspy_test_basic_dspy_settings():
    dspy.configure(lm=dspy.LM("openai/gpt-4o"), adapter=dspy.JSONAdapter(), callbacks=[lambda x: x])
    assert dspy.settings.lm.model == "openai/gpt-4o"
    assert isinstance(dspy.settings.adapter, dspy.JSONAdapter)
    assert len(dspy.settings.callbacks) == 1


def dspy_test_forbid_configure_call_in_child_thread():
    dspy.configure(lm=dspy.LM("openai/gpt-4o"), adapter=dspy.JSONAdapter(), callbacks=[lambda x: x])

    def worker():
        with pytest.raises(RuntimeError, match="dspy.settings can only be changed by the thread"):
            dspy.configure(lm=dspy.LM("openai/gpt-4o-mini"), callbacks=[])

    with ThreadPoolExecutor(max_workers=1) as executor:
        executor.submit(worker).result()


def dspy_test_dspy_context():
    dspy.configure(lm=dspy.LM("openai/gpt-4o"), adapter=dspy.JSONAdapter(), callbacks=[lambda x: x])
    with dspy.context(lm=dspy.LM("openai/gpt-4o-mini"), callbacks=[]):
        assert dspy.settings.lm.model == "openai/gpt-4o-mini"
        assert len(dspy.settings.callbacks) == 0

    assert dspy.settings.lm.model == "openai/gpt-4o"
    assert len(dspy.settings.callbacks) == 1


def dspy_test_dspy_context_parallel():
    dspy.configure(lm=dspy.LM("openai/gpt-4o"), adapter=dspy.JSONAdapter(), callbacks=[lambda x: x])

    def worker(i):
        with dspy.context(lm=dspy.LM("openai/gpt-4o-mini"), trace=[i], callbacks=[]):
            assert dspy.settings.lm.model == "openai/gpt-4o-mini"
            assert dspy.settings.trace == [i]
            assert len(dspy.settings.callbacks) == 0

    with ThreadPoolExecutor(max_workers=5) as executor:
        list(executor.map(worker, range(3)))

    assert dspy.settings.lm.model == "openai/gpt-4o"
    assert len(dspy.settings.callbacks) == 1


async def dspy_test_dspy_configure_allowance_async():
    def bar1():
        # `dspy.configure` is disallowed in different async tasks from the initial one.
        # In this case, foo1 (async) calls bar1 (sync), and bar1 uses the async task from foo1.
        with pytest.raises(RuntimeError) as e:
            dspy.configure(lm=dspy.LM("openai/gpt-4o"))
        assert "dspy.configure(...) can only be called from the same async" in str(e.value)

    async def foo1():
        bar1()
        await asyncio.sleep(0.1)

    async def foo2():
        # `dspy.configure` is disallowed in different async tasks from the initial one.
        with pytest.raises(RuntimeError) as e:
            dspy.configure(lm=dspy.LM("openai/gpt-4o"))
        assert "dspy.configure(...) can only be called from the same async" in str(e.value)
        await asyncio.sleep(0.1)

    async def foo3():
        # `dspy.context` is allowed in different async tasks from the initial one.
        with dspy.context(lm=dspy.LM("openai/gpt-4o")):
            await asyncio.sleep(0.1)

    async def foo4():
        # foo4 is directly invoked by the entry task, so it has the same async task as the entry task.
        dspy.configure(lm=dspy.LM("openai/gpt-4o"))
        await asyncio.sleep(0.1)

    # `dspy.configure` is allowed to be called multiple times in the same async task.
    dspy.configure(lm=dspy.LM("openai/gpt-4o-mini"))
    dspy.configure(lm=dspy.LM("openai/gpt-4o"))
    dspy.configure(adapter=dspy.JSONAdapter())

    await asyncio.gather(foo1(), foo2(), foo3())

    await foo4()


def dspy_test_dspy_settings_save_load(tmp_path):
    dspy.configure(lm=dspy.LM("openai/gpt-4o"), adapter=dspy.JSONAdapter(), callbacks=[lambda x: x])

    dspy.settings.save(tmp_path / "settings.pkl")
    dspy.configure(lm=None, adapter=None, callbacks=None)

    loaded_settings = dspy.load_settings(tmp_path / "settings.pkl", allow_pickle=True)
    dspy.configure(**loaded_settings)
    assert dspy.settings.lm.model == "openai/gpt-4o"
    assert isinstance(dspy.settings.adapter, dspy.JSONAdapter)
    assert len(dspy.settings.callbacks) == 1


def dspy_test_dspy_settings_save_exclude_keys(tmp_path):
    dspy.configure(lm=dspy.LM("openai/gpt-4o"), adapter=dspy.JSONAdapter(), track_usage=True)

    dspy.settings.save(tmp_path / "settings.pkl", exclude_keys=["adapter", "track_usage"])
    dspy.configure(lm=None, adapter=None, track_usage=False)

    loaded_settings = dspy.load_settings(tmp_path / "settings.pkl", allow_pickle=True)
    dspy.configure(**loaded_settings)
    assert dspy.settings.lm.model == "openai/gpt-4o"
    assert dspy.settings.adapter is None
    assert not dspy.settings.track_usage


def dspy_test_settings_save_with_extra_modules(tmp_path):
    # Create a temporary Python file with our custom module
    custom_module_path = tmp_path / "custom_module.py"
    with open(custom_module_path, "w") as f:
        f.write(
            """
def callback(x):
    return x + 1
"""
        )

    # Add the tmp_path to Python path so we can import the module
    sys.path.insert(0, str(tmp_path))
    try:
        import custom_module

        dspy.configure(callbacks=[custom_module.callback])

        settings_path = tmp_path / "settings.pkl"
        sys.path.insert(0, str(tmp_path))

        dspy.configure(callbacks=[custom_module.callback])
        dspy.settings.save(settings_path, modules_to_serialize=[custom_module])

        # Remove the custom module again to simulate it not being available at load time
        sys.modules.pop("custom_module", None)
        sys.path.remove(str(tmp_path))
        del custom_module

        dspy.configure(callbacks=None)

        # Loading should now succeed and preserve the adapter instance
        loaded_settings = dspy.load_settings(settings_path, allow_pickle=True)
        dspy.settings.configure(**loaded_settings)

        assert dspy.settings.callbacks[0](3) == 4

    finally:
        # Only need to clean up sys.path
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


# pydantic warns once per process when it first builds a schema of litellm's types: not the case's
pytestmark = pytest.mark.filterwarnings("ignore:Item '.*' on TypedDict class:UserWarning")

# -- the cases: DSPy's test functions as programs, in-process and through a session --

SYNC_TESTS = [
    dspy_test_basic_dspy_settings, dspy_test_forbid_configure_call_in_child_thread, dspy_test_dspy_context,
    dspy_test_dspy_context_parallel,
]


@pytest.mark.parametrize("dspy_test", SYNC_TESTS, ids=dspy_test_id)
def test_settings_tests_of_dspy(run: Runner, dspy_test) -> None:
    assert run.check(dspy_test) is None  # its asserts held where it ran


ASYNC_TESTS = [dspy_test_dspy_configure_allowance_async]


@pytest.mark.parametrize("dspy_test", ASYNC_TESTS, ids=dspy_test_id)
def test_async_settings_tests_of_dspy(arun: AsyncRunner, dspy_test) -> None:
    async def main(arun: AsyncRunner) -> None:
        return await arun(dspy_test)

    assert arun.check(main) is None  # its asserts held where it ran


TMP_PATH_TESTS = [
    dspy_test_dspy_settings_save_load, dspy_test_dspy_settings_save_exclude_keys,
    dspy_test_settings_save_with_extra_modules,
]


@pytest.mark.parametrize("dspy_test", TMP_PATH_TESTS, ids=dspy_test_id)
def test_settings_tests_of_dspy_with_a_tmp_path(run: Runner, dspy_test, tmp_path) -> None:
    assert run.check(dspy_test, tmp_path) is None  # its asserts held where it ran
