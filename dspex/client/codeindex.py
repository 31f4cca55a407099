"""What the client knows of its own code, process-wide: what goes by value, code objects' content
hashes, the globals a code object reads, what a module imported from where, and where an object
that cannot be pickled lives importably. Lookups are cached (bounded) by object identity.
"""

from __future__ import annotations
import __future__

import ast
import dis
import functools
import hashlib
import importlib.util
import linecache
import marshal
import re
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar

from cloudpickle import cloudpickle as _cp

from dspex.wire import byvalue, codestore, usercode
from dspex.wire.ref import Ref

BIG_BYTES = 1 << 20
BIG_ITEMS = 10_000
_SPECIAL_TYPES = (type(None), type(Ellipsis), type(NotImplemented))

_lock = threading.Lock()
_imports: dict[str, tuple[list[str], dict[str, tuple[str, str]]]] = {}
_by_reference: dict[int, tuple[Any, str, str]] = {}  # id -> (obj, module, attribute): found importable
ABSENT = object()
_CACHE_MAX = 8192
K = TypeVar("K")
V = TypeVar("V")


def _by_identity(fn: Callable[[K], V]) -> Callable[[K], V]:
    """``fn`` cached by its argument's identity (the argument is kept with its value, so its id
    cannot be reused meanwhile), in a table that is cleared when full."""
    table: dict[int, tuple[K, V]] = {}

    @functools.wraps(fn)
    def cached(arg: K) -> V:
        hit = table.get(id(arg))
        if hit is not None and hit[0] is arg:
            return hit[1]
        value = fn(arg)
        with _lock:
            if len(table) >= _CACHE_MAX:
                table.clear()  # rare: recomputing is cheap, a growing table is not
            table[id(arg)] = (arg, value)
        return value
    return cached


@_by_identity
def code_key(code: types.CodeType) -> str:
    return "c:" + hashlib.blake2b(marshal.dumps(code), digest_size=16).hexdigest()


@_by_identity
def globals_read(code: types.CodeType) -> tuple[str, ...]:
    return tuple(_cp._extract_code_globals(code))


def annotation_names(func: types.FunctionType) -> tuple[str, ...]:
    """The names a function's string annotations (``from __future__ import annotations``) read:
    ``typing.get_type_hints`` (and ``dspy.Tool``) looks them up in the function's globals."""
    annotations = getattr(func, "__annotations__", None) or {}
    return tuple(dict.fromkeys(name for value in annotations.values() if isinstance(value, str)
                               for name in _names_in(value)))


# DSPy's own pattern (SignatureMeta._detect_custom_types_from_caller): the type after a field's colon
_SIGNATURE_TYPE = re.compile(r":\s*([A-Za-z_][A-Za-z0-9_]*)")


@_by_identity
def signature_type_names(code: types.CodeType) -> tuple[str, ...]:
    """The names a string signature in ``code`` gives as field types (``dspy.Predict("text ->
    verdict: Verdict")``): DSPy looks them up in the caller's globals, which no bytecode reads."""
    found = [_SIGNATURE_TYPE.findall(c) if isinstance(c, str) else signature_type_names(c) for c in code.co_consts
             if isinstance(c, types.CodeType) or (isinstance(c, str) and "->" in c)]
    return tuple(dict.fromkeys(name for names in found for name in names))


_DEFERRED_ANNOTATIONS = __future__.annotations.compiler_flag
_ANNOTATION_MAX = 200  # a longer string constant is not an annotation (a docstring, a prompt)


@_by_identity
def deferred_annotation_names(code: types.CodeType) -> tuple[str, ...]:
    """The names the annotations of functions and classes that ``code`` defines when it runs read,
    under ``from __future__ import annotations`` (strings among its constants: ``"list[Tag]"``).
    ``typing.get_type_hints``, DSPy (``Tool``, a Signature's fields) and Pydantic resolve them in
    the module's globals, which no bytecode reads."""
    if not code.co_flags & _DEFERRED_ANNOTATIONS:
        return ()
    names: dict[str, None] = {}
    for const in code.co_consts:
        for item in const if isinstance(const, tuple) else (const,):  # a function's are one tuple
            if isinstance(item, str) and len(item) <= _ANNOTATION_MAX:
                names.update(dict.fromkeys(_names_in(item)))
            elif isinstance(item, types.CodeType):
                names.update(dict.fromkeys(deferred_annotation_names(item)))
    return tuple(names)


def names_a_type(value: Any) -> bool:
    """What a name in an annotation or a string signature stands for: a class, a module, a typing
    construct or alias (``Optional``, ``Mood = Literal[...]``)."""
    return isinstance(value, (type, types.ModuleType, types.GenericAlias, types.UnionType)) \
        or type(value).__module__ == "typing"


@functools.lru_cache(maxsize=4096)
def _names_in(annotation: str) -> tuple[str, ...]:
    try:
        tree = ast.parse(annotation, mode="eval")
    except (SyntaxError, ValueError):  # not an annotation: a lone surrogate, a null byte
        return ()
    return tuple(dict.fromkeys(node.id for node in ast.walk(tree) if isinstance(node, ast.Name)))


@_by_identity
def imports_in(code: types.CodeType) -> tuple[tuple[str, int, tuple[str, ...]], ...]:
    """``(name, level, fromlist)`` of every ``import`` statement in a code object's body and in
    the bodies it defines (nested functions, classes, comprehensions)."""
    found: list[tuple[str, int, tuple[str, ...]]] = []
    todo = [code]
    while todo:
        co = todo.pop()
        consts: list[Any] = []
        for ins in dis.get_instructions(co):
            if ins.opname == "LOAD_CONST":
                consts = [*consts[-1:], ins.argval]
                continue
            if ins.opname == "IMPORT_NAME" and len(consts) == 2 and isinstance(consts[0], int):
                fromlist = consts[1] if isinstance(consts[1], tuple) else ()
                found.append((str(ins.argval), consts[0], tuple(str(n) for n in fromlist)))
            consts = []
        todo.extend(c for c in co.co_consts if isinstance(c, types.CodeType))
    return tuple(dict.fromkeys(found))


def user_modules_imported(code: types.CodeType, g: dict[str, Any]) -> list[types.ModuleType]:
    """The user modules an ``import`` in ``code`` (run with globals ``g``) binds or reads: the
    module named, its parent packages and the submodules its ``from`` list names, as they are
    loaded in this process (an import the client never ran is not known here)."""
    out: list[types.ModuleType] = []
    for name, level, fromlist in imports_in(code):
        if level:
            try:
                name = importlib.util.resolve_name("." * level + name, codestore.package_of(g))
            except (ImportError, ValueError):
                continue
        parts = name.split(".")
        names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] + [f"{name}.{n}" for n in fromlist]
        for full in names:
            module = sys.modules.get(full) or _import_user_module(full)
            if isinstance(module, types.ModuleType) and full != "__main__" and user_module(module):
                out.append(module)
    return out


def _import_user_module(name: str) -> types.ModuleType | None:
    """The user module ``name``, imported here if it is not loaded yet (in-process the call would
    import it in this very process); None for a name that is not one of the user's modules (the
    standard library's, an installed package's: the worker imports those itself, and nothing of
    theirs is imported here), or that does not import."""
    top = name.partition(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return None
    loaded = sys.modules.get(top)
    if loaded is None:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
        if not origin or not usercode.is_user_file(top, origin):
            return None
    elif not user_module(loaded):
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - not a module (``from pkg import function``), or broken: the worker says
        return None


def imported_names(module_name: str) -> dict[str, tuple[str, str]]:
    """``{name: (module, attribute)}`` for the module-level ``from X import Y [as name]`` of a
    module's source (in ``if``/``try`` blocks too), relative imports resolved."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        return {}
    lines = linecache.getlines(file)
    hit = _imports.get(module_name)
    if hit is not None and hit[0] is lines:
        return hit[1]
    found: dict[str, tuple[str, str]] = {}
    try:
        tree = ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        tree = ast.Module(body=[], type_ignores=[])
    package = getattr(module, "__package__", None) or ""
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                try:
                    source = importlib.util.resolve_name("." * node.level + source, package)
                except (ImportError, ValueError):
                    continue
            for alias in node.names:
                if alias.name != "*":
                    found[alias.asname or alias.name] = (source, alias.name)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for part in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, part, ()):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    with _lock:
        _imports[module_name] = (lines, found)
    return found


def find_importable(obj: Any) -> tuple[str, str] | None:
    """``(module, attribute)`` of a module the worker can import whose attribute is ``obj``,
    remembered for :func:`imported_reference`."""
    for name, module in list(sys.modules.items()):
        if name == "__main__" or not isinstance(module, types.ModuleType) or usercode.is_user_module(name):
            continue
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for attr, value in items:
            if value is obj:
                with _lock:
                    _by_reference[id(obj)] = (obj, name, attr)
                return name, attr
    return None


def is_big(value: Any) -> bool:
    t = type(value)
    if t in (bytes, bytearray, str):
        return len(value) >= BIG_BYTES
    if t in (list, tuple, dict, set, frozenset):
        return len(value) >= BIG_ITEMS
    if t is Ref:
        return False  # a handle: its getattr would be a round trip to its object
    nbytes = getattr(value, "nbytes", None)  # numpy arrays, memoryviews
    return isinstance(nbytes, int) and nbytes >= BIG_BYTES


def user_module(module: types.ModuleType) -> bool:
    name = module.__name__
    return name == "__main__" or usercode.is_user_module(name) or _cp._is_registered_pickle_by_value(module)


def user_globals(module_name: str) -> list[tuple[str, Any]]:
    """The globals of user module ``module_name`` as they are now (none when it is not loaded,
    or not the user's)."""
    module = sys.modules.get(module_name)
    return list(vars(module).items()) if module is not None and user_module(module) else []


def functions_of(cls: type) -> list[types.FunctionType]:
    out: list[types.FunctionType] = []
    for value in vars(cls).values():
        value = getattr(value, "__func__", value)  # classmethod / staticmethod
        if isinstance(value, property):
            out.extend(f for f in (value.fget, value.fset, value.fdel) if isinstance(f, types.FunctionType))
        elif isinstance(value, types.FunctionType):
            out.append(value)
    return out


@_by_identity
def by_value(obj: Any) -> bool:
    """A function or class the worker cannot import, or a user module."""
    t = type(obj)
    if t is types.ModuleType:
        return user_module(obj)
    if t is not types.FunctionType and not isinstance(obj, type):
        return False
    if obj in _SPECIAL_TYPES or obj in _cp._BUILTIN_TYPE_NAMES:
        return False
    byvalue.register_user_module(getattr(obj, "__module__", None))
    try:
        return not _cp._should_pickle_by_reference(obj)
    except Exception:  # noqa: BLE001 - an odd __module__: cloudpickle would fail later, by value
        return True


def imported_reference(module_name: str | None, name: str, value: Any) -> tuple[str, str] | None:
    """``(module, attribute)`` when global ``name`` of user module ``module_name`` is ``value``
    imported from a module the worker can import, or :func:`find_importable` found it there
    earlier: send it by reference."""
    found = imported_names(module_name).get(name) if module_name else None
    if found is not None and not usercode.is_user_module(found[0]):
        module = sys.modules.get(found[0])
        if module is not None and getattr(module, found[1], ABSENT) is value:
            return found
    hit = _by_reference.get(id(value))
    return (hit[1], hit[2]) if hit is not None and hit[0] is value else None
