"""Which code is the user's own (it goes by value: the other side may not be able to import it)
and which is installed (the standard library, site-packages, an editable or ``--target`` install,
dspex itself: it goes by reference, as cloudpickle does by default)."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import site
import sys
import sysconfig

# dspex's own packages are importable wherever dspex runs, even from an editable checkout
_NEVER_BY_VALUE = frozenset({"dspex", "worker", "broker", "dspexctl"})
log = logging.getLogger("dspex.byvalue")


@functools.lru_cache(maxsize=1)
def _installed_prefixes() -> tuple[str, ...]:
    paths = set()
    for scheme_path in ("stdlib", "platstdlib", "purelib", "platlib"):
        for vars_ in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
            p = sysconfig.get_paths(vars=vars_).get(scheme_path)
            if p:
                paths.add(os.path.realpath(p))
    try:
        paths.update(os.path.realpath(p) for p in site.getsitepackages())
        paths.add(os.path.realpath(site.getusersitepackages()))
    except AttributeError:  # a virtualenv's site module may lack these
        pass
    return tuple(sorted(p.rstrip(os.sep) + os.sep for p in paths))


def is_installed_file(file: str) -> bool:
    """``file`` is in the standard library or a site-packages directory."""
    return os.path.realpath(file).startswith(_installed_prefixes())


@functools.lru_cache(maxsize=1)
def _editable_top_levels() -> frozenset[str]:
    """Top-level packages of distributions installed in editable mode: importable like installed
    ones, though their files live outside site-packages. Only editable distributions are read
    (``direct_url.json``), not every distribution's file list: ``packages_distributions()`` cost
    more than the rest of a first call."""
    names: set[str] = set()
    try:
        for dist in importlib.metadata.distributions():
            url = dist.read_text("direct_url.json")
            if not url or not json.loads(url).get("dir_info", {}).get("editable"):
                continue
            top = dist.read_text("top_level.txt")
            if top:
                names.update(line.strip() for line in top.splitlines() if line.strip())
            else:
                names.update(str(f).split("/", 1)[0].removesuffix(".py") for f in dist.files or ()
                             if not str(f).split("/", 1)[0].endswith((".dist-info", ".pth")))
    except (OSError, ValueError, AttributeError) as exc:  # a broken distribution must not break sending code
        log.debug("reading editable distributions: %r", exc)
    return frozenset(names)


@functools.lru_cache(maxsize=4096)
def is_user_module(name: str) -> bool:
    """True for modules the other side may not be able to import: they go by value."""
    if name == "__main__":
        return False  # cloudpickle pickles __main__ by value already
    top = name.partition(".")[0]
    if top in _NEVER_BY_VALUE or top in sys.stdlib_module_names or name in sys.builtin_module_names:
        return False
    module = sys.modules.get(name)
    if module is None:
        return False
    file = getattr(module, "__file__", None)
    if not file:
        path = getattr(module, "__path__", None)
        if path is None:
            return True  # a module made at runtime (exec'd code)
        # a namespace package (PEP 420: no __init__.py) is the user's when a directory of it is
        return top not in _editable_top_levels() and any(isinstance(p, str) and not is_installed_file(p)
                                                          for p in path)
    if is_installed_file(file):
        return False
    if top in _editable_top_levels():
        return False
    top_file = getattr(sys.modules.get(top), "__file__", None)
    return not isinstance(top_file, str) or top not in _installed_beside(top_file)


def is_user_file(top: str, file: str) -> bool:
    """True when top-level module ``top``, found at ``file`` but not imported yet, is the user's
    own code (the rules of :func:`is_user_module`)."""
    if top in _NEVER_BY_VALUE or is_installed_file(file):
        return False
    if top in _editable_top_levels():
        return False
    return top not in _installed_beside(file)


def _installed_beside(file: str) -> frozenset[str]:
    """Top-level names of the distributions installed in the directory that holds the top-level
    module or package at ``file`` (``pip install --target``, a ``PYTHONPATH`` install, a setuptools
    develop egg-info): their code goes by reference, as it always did."""
    directory = os.path.dirname(file)
    if os.path.basename(file) == "__init__.py":
        directory = os.path.dirname(directory)
    return _distribution_tops(directory)


@functools.lru_cache(maxsize=256)
def _distribution_tops(directory: str) -> frozenset[str]:
    names: set[str] = set()
    try:
        entries = [e for e in os.listdir(directory) if e.endswith((".dist-info", ".egg-info"))]
    except OSError:
        return frozenset()
    for entry in entries:
        meta = os.path.join(directory, entry)
        try:
            with open(os.path.join(meta, "top_level.txt"), encoding="utf-8") as f:
                names.update(line.strip() for line in f if line.strip())
            continue
        except OSError:
            pass
        try:
            with open(os.path.join(meta, "RECORD"), encoding="utf-8") as f:
                for line in f:
                    first = line.split(",", 1)[0].split("/", 1)[0]
                    if first and not first.endswith((".dist-info", ".egg-info", ".pth")) and first != "..":
                        names.add(first.removesuffix(".py"))
        except OSError:
            pass
    return frozenset(names)
