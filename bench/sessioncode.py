"""Group ``code``: what a session's by-value code costs: the first ``s.run`` of a client process,
and per call after the first, a 1,000-line user module and a 100 MB module global.

The user modules are written to a temp dir that only the client has on its path, and the worker
runs in an empty working directory, so the code reaches it by value. The baseline of each
per-call figure is measured in the same run: the same session code sent in full with every call
(a session whose cache is off, as every call was before sessions remembered code), a tiny user
function through a session, and the function in-process. Blocks alternate, the order rotating
each round; figures are medians.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    Config,
    Row,
    Stack,
    Workspace,
    alternate,
    base_env,
    median,
    ms,
    quantile,
    us,
    verdict,
)

FIRST_CALL_TARGET = "≤ 30 ms over a warm call"
BIG_MODULE_TARGET = "≤ +1 ms per call after the first"
BIG_GLOBAL_TARGET = "first call pays, later calls ~ms"

TINY = '''
def entry(x=1):
    return x + 1
'''

BIG_GLOBAL = '''
BIG = b"x" * 100_000_000


def size():
    return len(BIG)
'''

FIRST_CALL = '''
import json
import sys
import time

t0 = time.perf_counter()
import dspex  # noqa: E402
if sys.argv[2] == "dspy":
    import dspy
    from dspy.utils import DummyLM

    dspy.configure(lm=DummyLM([{"answer": "a"}]))
from tiny_user import entry  # noqa: E402

imported = time.perf_counter() - t0
with dspex.connect(sys.argv[1], timeout=60) as dx:
    s = dx.session("p")
    t = time.perf_counter()
    s.run(entry, 1)
    first = time.perf_counter() - t
    warm = []
    for _ in range(40):
        t = time.perf_counter()
        s.run(entry, 1)
        warm.append(time.perf_counter() - t)
    s.close()
warm.sort()
print(json.dumps({"import": imported, "first": first, "warm": warm[len(warm) // 2]}))
'''


def big_module_source(functions: int = 100) -> str:
    """A user module of about 1,000 lines: ``entry`` reaches every function and table in it."""
    parts = ['"""A generated user module of about 1,000 lines."""\n\nimport math\n']
    for i in range(functions):
        parts.append(textwrap.dedent(f'''
            TABLE_{i} = {{"scale": {i + 1}, "name": "step {i}"}}


            def step_{i}(x, depth):
                """Step {i}: scale by its table, then the next step."""
                scaled = x * TABLE_{i}["scale"] % 97
                if depth <= 0:
                    return scaled
                return {f"step_{i + 1}(scaled, depth - 1)" if i + 1 < functions else "scaled"}
        '''))
    parts.append(textwrap.dedent('''

        class Pipeline:
            """Runs the steps."""

            def __init__(self, depth):
                self.depth = depth

            def run(self, x):
                return step_0(x, self.depth) + int(math.sqrt(self.depth))


        def entry(x=1):
            return Pipeline(len(TABLES)).run(x)


        TABLES = [TABLE_0, TABLE_1]
    '''))
    return "".join(parts)


def _write_user_code(root: Path) -> Path:
    user = root / "user"
    user.mkdir(exist_ok=True)
    (user / "tiny_user.py").write_text(TINY)
    (user / "big_user.py").write_text(big_module_source())
    (user / "global_user.py").write_text(BIG_GLOBAL)
    (user / "first_call.py").write_text(FIRST_CALL)
    return user


def _first_call(cfg: Config, st: Stack, user: Path) -> Row:
    runs = 2 if cfg.smoke else 7
    results: dict[str, list[dict[str, float]]] = {"plain": [], "dspy": []}
    env = base_env(st.run_dir)
    for r in range(runs):
        for kind in (("plain", "dspy") if r % 2 == 0 else ("dspy", "plain")):
            out = subprocess.run([sys.executable, str(user / "first_call.py"), st.frontend, kind], env=env,
                                 cwd=user, capture_output=True, text=True, timeout=120, check=True)
            results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
        cfg.log(f"  first call {r + 1}/{runs}: " + ", ".join(
            f"{k} first {v[-1]['first'] * 1e3:.1f} ms warm {v[-1]['warm'] * 1e3:.2f} ms" for k, v in results.items()))
    over = {k: median([x["first"] - x["warm"] for x in v]) for k, v in results.items()}
    first = {k: median([x["first"] for x in v]) for k, v in results.items()}
    warm = {k: median([x["warm"] for x in v]) for k, v in results.items()}
    data: dict[str, Any] = {k: {"first_ms": first[k] * 1e3, "warm_ms": warm[k] * 1e3, "over_warm_ms": over[k] * 1e3,
                                "import_ms": median([x["import"] for x in v]) * 1e3, "raw": v}
                            for k, v in results.items()}
    return Row("code.first_call", "first s.run of a client process over a warm call (tiny user function)",
               f"+{ms(over['plain'])} (with dspy imported and an LM configured: +{ms(over['dspy'])})",
               f"warm call {ms(warm['plain'])}", f"first {ms(first['plain'])}",
               FIRST_CALL_TARGET, "" if cfg.smoke else verdict(max(over.values()) <= 0.030), data=data)


def _per_call(cfg: Config, name: str, label: str, target: str, session: Any, full: Any, fn: Callable[[], Any],
              tiny: Callable[[], Any], per_round: int, ok: Callable[[dict[str, Any]], bool]) -> Row:
    """Per-call figures of ``fn`` after its first call: cached session, sent in full every call
    (``full``, a session whose cache is off), a tiny function through the session, in-process."""
    t = time.perf_counter()
    session.run(fn)
    first = time.perf_counter() - t
    full.run(fn)
    rounds = cfg.n_rounds(7, 2)
    systems = {"session": lambda: session.run(fn), "sent_every_call": lambda: full.run(fn),
               "tiny_session": lambda: session.run(tiny), "inprocess": fn}
    lat = alternate(systems, rounds, per_round, cfg, warmup=2)  # a block of the slow path is a few calls
    p50 = {k: median([quantile(b, 0.5) for b in v]) for k, v in lat.items()}
    extra = median([quantile(a, 0.5) - quantile(b, 0.5) for a, b in zip(lat["session"], lat["tiny_session"])])
    ratio = median([quantile(a, 0.5) / quantile(b, 0.5) for a, b in zip(lat["sent_every_call"], lat["session"])])
    data: dict[str, Any] = {"first_call_ms": first * 1e3, "p50_us": {k: v * 1e6 for k, v in p50.items()},
            "extra_over_tiny_us": extra * 1e6, "sent_every_call_vs_session": ratio, "rounds": rounds,
            "calls_per_block": per_round,
            "raw_p50_us": {k: [quantile(b, 0.5) * 1e6 for b in v] for k, v in lat.items()}}
    return Row(name, label, f"{us(p50['session'])} per call after a first of {ms(first)} "
               f"(+{us(extra)} over a tiny function)",
               f"sent every call {ms(p50['sent_every_call'])}; tiny function {us(p50['tiny_session'])}; "
               f"in-process {us(p50['inprocess'])}", f"{ratio:.0f}× faster than sent every call", target,
               "" if cfg.smoke else verdict(ok(data)), data=data)


def code(cfg: Config) -> list[Row]:
    ws = Workspace()
    client = None
    added = False
    try:
        root = Path(ws.root)
        empty = root / "empty"
        empty.mkdir()
        user = _write_user_code(root)
        st = Stack(ws, "co")
        st.start_broker("p:strict_queue")
        st.start_worker("p", cwd=str(empty))
        client = st.client(timeout=120)
        st.wait_workers("p", 1, 90, client=client)
        rows = [_first_call(cfg, st, user)]
        sys.path.insert(0, str(user))
        added = True
        import big_user
        import global_user
        import tiny_user

        session, full = client.session("p"), client.session("p")
        full.sender.keep = False  # every call sends all it references: the baseline
        source_kb = len((user / "big_user.py").read_text()) / 1024
        lines = (user / "big_user.py").read_text().count("\n")
        row = _per_call(cfg, "code.big_module", f"a {lines}-line user module ({source_kb:.0f} KB), per call after "
                        "its first", BIG_MODULE_TARGET, session, full, big_user.entry, tiny_user.entry,
                        10 if cfg.smoke else 60, lambda d: d["extra_over_tiny_us"] <= 1000)
        row.data.update(lines=lines, source_kb=source_kb)
        rows.append(row)
        rows.append(_per_call(cfg, "code.big_global", "a 100 MB module global, per call after the first",
                              BIG_GLOBAL_TARGET, session, full, global_user.size, tiny_user.entry, 2 if cfg.smoke else 3,
                              lambda d: d["p50_us"]["session"] <= 5000))
        session.close(timeout=30)
        full.close(timeout=30)
        return rows
    finally:
        if added:
            sys.path.remove(str(user))
            for name in ("big_user", "global_user", "tiny_user"):
                sys.modules.pop(name, None)
        if client is not None:
            client.close()
        ws.close()


ROWS = ["code.first_call", "code.big_module", "code.big_global"]
