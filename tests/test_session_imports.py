"""A session is the user's own Python: a package of the user's (relative imports, submodules,
imports inside functions), decorated functions (lru_cache, singledispatch), class registries
filled by ``__init_subclass__`` or a metaclass behave through ``s.run`` as in-process; a global
that cannot travel is named; a request that did not load leaves the session whole.

The package is written to a temp dir only this process has on its path; the workers run in an
empty working directory, so they reach it only by value.
"""

from __future__ import annotations

import importlib
import os
import secrets
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import dspex
from tests.harness import Stack, wait_for
from tests.test_session_code import code_stack, dx  # noqa: F401 - the module's stack and client

Package = Callable[[dict[str, str]], str]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Package]:
    """``package({"__init__.py": src, "sub/helpers.py": src, ...})``: a user package of this
    process under a fresh name (returned), imported; the workers cannot import it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(files: dict[str, str]) -> str:
        name = f"upkg_{secrets.token_hex(4)}"
        for rel, source in files.items():
            path = tmp_path / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source))
        for directory in [tmp_path / name, *(p for p in (tmp_path / name).rglob("*") if p.is_dir())]:
            (directory / "__init__.py").touch()
        importlib.invalidate_caches()
        made.append(name)
        importlib.import_module(name)
        return name

    yield make
    for mod in [m for m in sys.modules if m.split(".")[0] in made]:
        sys.modules.pop(mod, None)


def _mod(name: str) -> types.ModuleType:
    return importlib.import_module(name)


PACKAGE = {
    "__init__.py": "from .core import bump, STATE\n",
    "core.py": """
        from .sub.helpers import double
        STATE = []

        def bump(x):
            STATE.append(double(x))
            return list(STATE)
        """,
    "sub/helpers.py": """
        def double(x):
            return 2 * x
        """,
    "lazy.py": """
        def relative():
            from .sub import helpers
            from . import core
            return helpers.double(3), core.bump(1), __package__

        def absolute():
            import {pkg}.sub.helpers
            from {pkg} import core
            return {pkg}.sub.helpers.double(4), core.bump(2)
        """,
}


def test_imports_inside_functions_of_a_user_package(dx: dspex.Client, package: Package,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """``from .sub import helpers`` / ``import pkg.sub.helpers`` in a function body find the
    session's modules (with their state), as in-process."""
    name = package({k: v for k, v in PACKAGE.items() if k != "lazy.py"})
    (tmp_path / name / "lazy.py").write_text(textwrap.dedent(PACKAGE["lazy.py"]).replace("{pkg}", name))
    importlib.invalidate_caches()
    lazy = _mod(f"{name}.lazy")
    s = dx.session("p")
    try:
        assert s.run(lazy.relative) == (6, [2], name)
        assert s.run(lazy.absolute) == (8, [2, 4])  # the one core module of the session: its STATE
        assert s.run(lambda: lazy.__package__) == name
    finally:
        s.close()
    assert _mod(f"{name}.core").STATE == []  # the client's module was not touched
    assert lazy.relative() == (6, [2], name)  # in-process, the same


def test_an_import_inside_a_script_function_of_a_sibling_module(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """A function (of ``__main__``, of a test module) importing a user module in its body."""
    name = package({"tools.py": "COUNT = [0]\ndef tick():\n    COUNT[0] += 1\n    return COUNT[0]\n"})

    code = compile(f"def program():\n    from {name} import tools\n    return tools.tick()\n", "<script>", "exec")
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(code, ns)  # noqa: S102 - a function of __main__ as a script would define it
    s = dx.session("p")
    try:
        assert [s.run(ns["program"]) for _ in range(3)] == [1, 2, 3]
    finally:
        s.close()


def test_lru_cache_of_a_user_function_keeps_its_cache_in_the_session(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """``@functools.lru_cache`` / ``@functools.cache`` on a user function: the session's one
    wrapper, whose cache lives across calls (and whose misses call the session's function)."""
    name = package({"memo.py": """
        import functools
        CALLS = []

        @functools.lru_cache(maxsize=8)
        def square(n):
            CALLS.append(n)
            return n * n

        @functools.cache
        def cube(n):
            CALLS.append(-n)
            return n ** 3

        def both(n):
            return square(n), cube(n)
        """})
    memo = _mod(f"{name}.memo")
    s = dx.session("p")
    try:
        assert s.run(memo.square, 3) == 9
        assert s.run(memo.square, 3) == 9
        assert s.run(memo.both, 3) == (9, 27)
        assert s.run(memo.both, 3) == (9, 27)
        assert s.run(lambda: (list(memo.CALLS), memo.square.cache_info().hits, memo.cube.cache_info().hits)) \
            == ([3, -3], 3, 1)
        assert s.run(lambda: memo.square.cache_parameters()) == {"maxsize": 8, "typed": False}
    finally:
        s.close()
    assert memo.CALLS == []  # the client's module was not touched


def test_a_durable_session_keeps_its_imports_and_cached_functions_after_kill_9(stack: Stack, package: Package,
                                                                              tmp_path: Path) -> None:
    """After its worker is SIGKILLed, a durable session's functions still import its modules (the
    restored functions keep the session's ``__import__``) and its lru_cache wrapper is still the
    session's, an empty cache around the session's function (a cache is not state a checkpoint
    keeps: the next call computes again)."""
    name = package({**{k: v for k, v in PACKAGE.items() if k != "lazy.py"}, "plugins.py": PLUGINS})
    (tmp_path / name / "lazy.py").write_text(textwrap.dedent(PACKAGE["lazy.py"]).replace("{pkg}", name) + textwrap.dedent("""
        import functools

        @functools.lru_cache(maxsize=None)
        def cached(n):
            from .core import bump
            return bump(n)
        """))
    importlib.invalidate_caches()
    lazy = _mod(f"{name}.lazy")
    client = stack.pool("d:strict_queue:durable=true", 3)  # two are killed
    s = client.session("d", durable=True)
    try:
        assert s.run(lazy.relative) == (6, [2], name)
        assert [s.run(lazy.cached, 5), s.run(lazy.cached, 5)] == [[2, 10], [2, 10]]
        pid = s.run(os.getpid)
        stack.kill(pid)
        wait_for(lambda: pid not in {w["pid"] for w in client.status()["pools"]["d"]["workers"]}, what="worker gone")
        assert s.run(lazy.absolute) == (8, [2, 10, 4])
        assert s.run(lazy.cached, 5) == [2, 10, 4, 10]
        assert s.run(lazy.cached, 5) == [2, 10, 4, 10]
        assert s.run(os.getpid) != pid
        plugins = _mod(f"{name}.plugins")
        assert s.run(plugins.define, "Extra") == (["Child", "Extra"], ["Child", "Extra"], True)
        pid = s.run(os.getpid)
        stack.kill(pid)
        wait_for(lambda: pid not in {w["pid"] for w in client.status()["pools"]["d"]["workers"]}, what="worker gone")
        assert s.run(plugins.registry) == (["Child", "Extra"], ["Child", "Extra"], True)
    finally:
        s.close()


def test_a_singledispatch_function_of_a_user_module(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """``@functools.singledispatch`` with registered implementations: callable through a session,
    and it does not make its whole module unsendable (its closure holds a weak-keyed cache)."""
    name = package({"misc.py": """
        import functools

        @functools.singledispatch
        def describe(x):
            return "thing"

        @describe.register
        def _(x: int):
            return "int"

        def other():
            return "other"
        """})
    misc = _mod(f"{name}.misc")
    s = dx.session("p")
    try:
        assert (s.run(misc.describe, 1), s.run(misc.describe, "a")) == ("int", "thing")
        assert s.run(lambda: (misc.other(), misc.describe(2), misc.describe(2.5))) == ("other", "int", "thing")
    finally:
        s.close()


def test_a_class_registry_filled_by_init_subclass(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """A plugin registry: ``__init_subclass__`` of a user base class (or a user metaclass) records
    each subclass in a module global. Through a session the registry is the client's (the subclasses defined when the
    client imported the module), and a subclass defined in a call registers itself, as in-process;
    rebuilding the classes on the worker does not run ``__init_subclass__`` again (it ran on the
    client, and what it did travelled with the module's state)."""
    name = package({"plugins.py": PLUGINS})
    plugins = _mod(f"{name}.plugins")
    s = dx.session("p")
    try:
        assert s.run(plugins.registry) == (["Child"], ["Child"], True)
        assert s.run(plugins.define, "Extra") == (["Child", "Extra"], ["Child", "Extra"], True)
        assert s.run(lambda: plugins.REG["Child"] is plugins.Child) is True
        assert s.run(plugins.kinds, "Extra") == (["Plugin", "Tool", "Extra"], "tool")
    finally:
        s.close()
    assert plugins.registry() == (["Child"], ["Child"], True)
    s2 = dx.session("p")
    try:  # the module arrives whole (an import of its package): its classes are rebuilt first
        assert s2.run(lambda: plugins.kinds()) == (["Plugin", "Tool"], "tool")
    finally:
        s2.close()


PLUGINS = """
        REG = {}
        CREATED = []

        class Base:
            def __init_subclass__(cls, **kw):
                super().__init_subclass__(**kw)
                CREATED.append(cls.__name__)
                REG[cls.__name__] = cls

        class Child(Base):
            pass

        def registry():
            return sorted(REG), list(CREATED), REG["Child"] is Child

        def define(name):
            type(name, (Base,), {})
            return registry()

        KINDS = []

        class Meta(type):
            def __new__(mcs, name, bases, ns):
                ns.setdefault("kind", name.lower())
                return super().__new__(mcs, name, bases, ns)

            def __init__(cls, name, bases, ns):
                super().__init__(name, bases, ns)
                KINDS.append(name)

        class Plugin(metaclass=Meta):
            pass

        class Tool(Plugin):
            pass

        def kinds(new=None):
            if new:
                Meta(new, (Plugin,), {})
            return list(KINDS), Tool.kind
        """


def test_a_request_that_did_not_load_on_the_worker_is_sent_in_full_next_time(dx: dspex.Client,  # noqa: F811
                                                                             package: Package) -> None:
    """A global whose unpickling fails on the worker (here: the first time only) fails that call
    with a typed error; the session's next call that uses the module is not left with a module
    the worker never got (the client does not count what that request sent as held)."""
    name = package({"fragile.py": """
        import os

        class Fragile:
            def __reduce__(self):
                return (_load, ())

        def _load():
            marker = "/tmp/dx-fragile-" + str(os.getpid())
            if not os.path.exists(marker) and __name__ != "__main__":
                open(marker, "w").close()
                raise RuntimeError("not loadable the first time")
            return Fragile()

        ITEM = Fragile()
        TOTAL = [10]

        def use():
            return type(ITEM).__name__, TOTAL[0]

        def total():
            return TOTAL[0]
        """})
    fragile = _mod(f"{name}.fragile")
    s = dx.session("p")
    try:
        pid = s.run(os.getpid)
        marker = f"/tmp/dx-fragile-{pid}"
        if os.path.exists(marker):
            os.unlink(marker)
        with pytest.raises(dspex.errors.ProtocolError, match="not loadable the first time"):
            s.run(fragile.use)
        assert s.run(fragile.total) == 10
        assert s.run(lambda: fragile.TOTAL[0] + 1) == 11
        assert s.run(fragile.use) == ("Fragile", 10)
    finally:
        s.close()
        if os.path.exists(marker):
            os.unlink(marker)


def test_an_unpicklable_global_read_by_a_global_objects_class_is_named(dx: dspex.Client,  # noqa: F811
                                                                       package: Package) -> None:
    """A program global whose class's method reads a module-level lock: the EncodeError names the
    lock, not the program object that led to it."""
    name = package({"locked.py": """
        import threading
        LOCK = threading.Lock()

        class Prog:
            def forward(self, x):
                with LOCK:
                    return x

        PROG = Prog()

        def run(x):
            return PROG.forward(x)
        """})
    locked = _mod(f"{name}.locked")
    s = dx.session("p")
    try:
        with pytest.raises(dspex.errors.EncodeError, match=r"cannot send LOCK \(_thread.lock\) from module"):
            s.run(locked.run, 1)
    finally:
        s.close()


def test_string_annotations_of_a_function_resolve_in_the_session(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """A tool of a module with ``from __future__ import annotations`` whose argument is a Pydantic
    model of that module: ``typing.get_type_hints`` and ``dspy.Tool`` (which reads them) see the
    model on the worker, as in-process, though the function's code never names it."""
    name = package({"tools.py": """
        from __future__ import annotations
        import typing
        import pydantic
        import dspy

        class Order(pydantic.BaseModel):
            order_id: str
            qty: int

        def lookup(order: Order, note: typing.Optional[Note] = None) -> str:
            \"\"\"Look up an order.\"\"\"
            return f"order {order['order_id'] if isinstance(order, dict) else order.order_id}"

        class Note(pydantic.BaseModel):
            text: str

        def hints():
            return sorted((k, getattr(v, "__name__", str(v))) for k, v in typing.get_type_hints(lookup).items())

        def tool():
            t = dspy.Tool(lookup)
            return t.args, t(order={"order_id": "A7", "qty": 2})
        """})
    tools = _mod(f"{name}.tools")
    s = dx.session("p")
    try:
        assert s.run(tools.hints) == tools.hints()
        assert s.run(tools.tool) == tools.tool()
    finally:
        s.close()


def test_package_data_read_through_importlib_resources(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """A prompt template next to the package's code, read as ``importlib.resources`` reads it
    (from the package module or its name, in a function of the package and of the script): the
    session's package module has a spec naming the client's files, as in-process (workers
    sharing the client's filesystem read them)."""
    name = package({"prompts.txt": "", "templates.py": """
        import importlib.resources


        def by_package():
            return importlib.resources.files(__package__).joinpath("prompts.txt").read_text()
    """})
    (Path(_mod(name).__file__).parent / "prompts.txt").write_text("You are terse.\n")
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(f"def by_module():\n    import importlib.resources, {name}\n"  # noqa: S102 - a script's function
                 f"    return importlib.resources.files({name}).joinpath('prompts.txt').read_text()\n",
                 "<script>", "exec"), ns)
    templates = _mod(f"{name}.templates")
    assert templates.by_package() == ns["by_module"]() == "You are terse.\n"  # in-process
    with dx.session("p") as s:
        assert s.run(ns["by_module"]) == "You are terse.\n"
        assert s.run(templates.by_package) == "You are terse.\n"


def test_a_user_package_through_sys_modules_is_the_sessions(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """``sys.modules[name]`` of a user package in a call reads as the session's package, its
    ``__path__`` and ``__file__`` included (``pkgutil.iter_modules`` of a plugin package)."""
    name = package({"plugins/a.py": "", "plugins/b.py": ""})
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(f"def plugins():\n    import sys, pkgutil, {name}.plugins\n"  # noqa: S102
                 f"    pkg = sys.modules['{name}.plugins']\n"
                 "    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)), pkg.__file__\n",
                 "<script>", "exec"), ns)
    expected = ns["plugins"]()
    assert expected[0] == ["a", "b"]
    with dx.session("p") as s:
        assert s.run(ns["plugins"]) == expected


def test_package_data_read_by_a_submodule_through_its_package(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """A submodule reads its package's data by the package (``files(__package__)``,
    ``pkgutil.get_data(__package__, ...)``) in a session that got only the submodule's function:
    the session has the package as an import would make it, with its spec (the package was
    unknown there: ``None`` from ``get_data``, ``AttributeError`` from ``files``), whose loader
    reads files (``get_data`` was missing)."""
    name = package({"data/prompt.txt": "", "templates.py": """
        import importlib.resources
        import pkgutil
        import sys


        def by_get_data():
            return pkgutil.get_data(__package__, "data/prompt.txt")


        def by_files():
            return importlib.resources.files(__package__).joinpath("data/prompt.txt").read_bytes()


        def package_holds_me():
            return sys.modules[__package__].templates.__name__
    """})
    (Path(_mod(name).__file__).parent / "data" / "prompt.txt").write_bytes(b"Answer in French.\n")
    templates = _mod(f"{name}.templates")
    for fn, expected in [(templates.by_get_data, b"Answer in French.\n"), (templates.by_files, b"Answer in French.\n"),
                         (templates.package_holds_me, f"{name}.templates")]:
        assert fn() == expected  # in-process
        with dx.session("p") as s:
            assert s.run(fn) == expected


def test_a_modules_own_dunders_are_read_through_the_module(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """``pkg.__version__``, ``pkg.__all__`` and a module ``__getattr__`` (PEP 562 lazy names) read
    through the package module in a call, as in-process (the module went without them: only the
    import system's dunders travelled)."""
    name = package({"__init__.py": """
        __version__ = "1.2.3"
        __all__ = ["VALUE"]
        VALUE = 1


        def __getattr__(attr):
            if attr == "LAZY":
                return VALUE + 1
            raise AttributeError(attr)
    """})
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(f"import {name} as pkg\n"  # noqa: S102 - a script importing its package
                 "def describe():\n    return pkg.__version__, pkg.__all__, pkg.LAZY, pkg.VALUE\n"
                 "def by_name():\n    import importlib\n"
                 "    return importlib.import_module(pkg.__name__).LAZY\n", "<script>", "exec"), ns)
    assert ns["describe"]() == ("1.2.3", ["VALUE"], 2, 1) and ns["by_name"]() == 2  # in-process
    with dx.session("p") as s:
        assert s.run(ns["describe"]) == ("1.2.3", ["VALUE"], 2, 1)
        assert s.run(ns["by_name"]) == 2  # sys.modules' entry: the session's module, its __getattr__ too


def test_a_module_used_as_a_module_goes_without_a_global_no_call_needs_that_cannot_travel(
        dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """A module of the app used as a module (``import myapp.store as store``, ``store.add(x)``)
    goes whole, and one of its globals cannot be pickled (a lock beside the code that uses it):
    calls that do not need it run as in-process (every call through the module was an
    ``EncodeError`` naming the lock). Code that reaches the lock through the module gets a
    ``NameError`` whose note says why it is not there; sending that code itself is the
    ``EncodeError`` it was."""
    name = package({"store.py": """
        import threading

        _LOCK = threading.Lock()
        ITEMS = []


        def add(x):
            ITEMS.append(x)
            return len(ITEMS)


        def add_locked(x):
            with _LOCK:
                ITEMS.append(x)
    """})
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(f"import {name}.store as store\n"  # noqa: S102 - a script using the app's module
                 "def add(x):\n    return store.add(x)\n"
                 "def add_locked(x):\n    return store.add_locked(x)\n"
                 "def locked():\n    return store._LOCK.locked()\n", "<script>", "exec"), ns)
    store = _mod(f"{name}.store")
    with dx.session("p") as s:
        assert [s.run(ns["add"], "a"), s.run(ns["add"], "b")] == [1, 2]  # the session's ITEMS, as in-process
        with pytest.raises(NameError) as caught:
            s.run(ns["add_locked"], "c")
        why = f"dspex: _LOCK was not sent with its module: cannot send _LOCK (_thread.lock) from module {name}.store"
        assert why in "\n".join(getattr(caught.value, "__notes__", [])), caught.value
        with pytest.raises(AttributeError) as caught_attribute:
            s.run(ns["locked"])
        assert why in "\n".join(getattr(caught_attribute.value, "__notes__", [])), caught_attribute.value
        with pytest.raises(dspex.EncodeError, match=rf"cannot send _LOCK \(_thread.lock\) from module {name}.store"):
            s.run(store.add_locked, "c")
        assert s.run(ns["add"], "d") == 3
    assert ns["add"]("a") == 1 and store.ITEMS == ["a"]  # in-process: the client's own module


def test_namespace_packages_of_the_app_are_the_users(dx: dspex.Client, tmp_path: Path,  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An app laid out without ``__init__.py`` files (PEP 420 namespace packages, as a ``src/``
    layout often is): its packages are the user's code, sent by value like its modules (they went
    by reference: ``MissingModule`` for ``app.core.calc.add(x)`` through the package, and the
    packages of a submodule's code were not in the session's ``sys.modules``)."""
    name = f"nsapp_{secrets.token_hex(4)}"
    (tmp_path / name / "core").mkdir(parents=True)
    (tmp_path / name / "core" / "calc.py").write_text("TOTAL = []\n\n\ndef add(x):\n    TOTAL.append(x)\n"
                                                      "    return sum(TOTAL)\n\n\ndef packages():\n    import sys\n"
                                                      "    return [list(sys.modules[n].__path__) for n in ("
                                                      f"{name!r}, {name + '.core'!r})]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        calc = importlib.import_module(f"{name}.core.calc")
        ns: dict[str, Any] = {"__name__": "__main__"}
        exec(compile(f"import {name} as app\n"  # noqa: S102 - a script of the app
                     "def via_package(x):\n    return app.core.calc.add(x)\n", "<script>", "exec"), ns)
        expected = calc.packages()
        assert expected == [[str(tmp_path / name)], [str(tmp_path / name / "core")]]  # in-process
        with dx.session("p") as s:
            assert s.run(calc.packages) == expected
            assert [s.run(calc.add, 1), s.run(ns["via_package"], 2)] == [1, 3]
    finally:
        for mod in [m for m in sys.modules if m.split(".")[0] == name]:
            sys.modules.pop(mod, None)


def test_weak_caches_of_the_app_travel_as_copies(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """A ``weakref.WeakValueDictionary`` cache (a ``WeakKeyDictionary``, a ``WeakSet`` of live
    objects) at the top of an app module goes to the session as a copy, as a list global does,
    and keeps what the session's calls put in it (pickle refuses them: every call of code using
    one was an ``EncodeError``)."""
    name = package({"cache.py": """
        import weakref


        class Thing:
            pass


        CACHE = weakref.WeakValueDictionary()
        OWNERS = weakref.WeakKeyDictionary()
        LIVE = weakref.WeakSet()
        KEPT = []


        def keep(key):
            thing = Thing()
            KEPT.append(thing)
            CACHE[key], OWNERS[thing] = thing, key
            LIVE.add(thing)
            return len(CACHE), len(OWNERS), len(LIVE), CACHE[key] is thing, sorted(OWNERS.values())
    """})
    cache = _mod(f"{name}.cache")
    with dx.session("p") as s:
        assert [s.run(cache.keep, "a"), s.run(cache.keep, "b")] == [(1, 1, 1, True, ["a"]), (2, 2, 2, True, ["a", "b"])]
    assert cache.keep("a") == (1, 1, 1, True, ["a"])  # in-process


def test_code_updated_in_place_runs_in_the_session(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """IPython's ``%autoreload`` (the notebook workflow over an app's package) updates the
    functions of an edited module in place: the same function objects, methods of its classes
    included, get the new ``__code__``. The session runs the new code, as in-process (it kept
    running the code it got first)."""
    name = package({"calc.py": """
        def rate():
            return "old"


        class Model:
            def predict(self):
                return "old " + rate()
    """})
    calc = _mod(f"{name}.calc")
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(f"import {name}.calc as calc\n"  # noqa: S102 - a notebook cell
                 "def predict():\n    return calc.Model().predict()\n", "<cell>", "exec"), ns)
    edited: dict[str, Any] = {}
    exec("def rate():\n    return 'new'\n\n\n"  # noqa: S102 - the edited module's code
         "class Model:\n    def predict(self):\n        return 'new ' + rate()\n", edited)
    with dx.session("p") as s:
        assert [s.run(calc.rate), s.run(ns["predict"])] == ["old", "old old"]
        calc.rate.__code__ = edited["rate"].__code__  # what autoreload's update_function does
        calc.Model.predict.__code__ = edited["Model"].predict.__code__
        assert [calc.rate(), ns["predict"]()] == ["new", "new new"]  # in-process
        assert [s.run(calc.rate), s.run(ns["predict"])] == ["new", "new new"]


def test_a_newtype_of_the_app_travels(dx: dspex.Client, package: Package) -> None:  # noqa: F811
    """``UserId = typing.NewType("UserId", int)`` at the top of an app module, read by the
    session's code, as in-process (pickle names a NewType by its module and name, which on the
    worker was the session's module being given that very global: every call reading it failed
    with ``ProtocolError``)."""
    name = package({"ids.py": """
        import typing

        UserId = typing.NewType("UserId", int)


        def make(n):
            return UserId(n), UserId.__supertype__ is int, UserId.__qualname__, UserId.__module__
    """})
    ids = _mod(f"{name}.ids")
    expected = ids.make(5)
    assert expected == (5, True, "UserId", f"{name}.ids")  # in-process
    with dx.session("p") as s:
        assert s.run(ids.make, 5) == expected
        assert s.run(lambda: ids.UserId is ids.UserId and ids.make(6)[0]) == 6
