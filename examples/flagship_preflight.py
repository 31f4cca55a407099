"""The flagship's preflight: before any stack starts, check that the model endpoint answers and that
one small ``dspy.Predict`` parses, in this process, with the flow's own LM bounds.

What cannot work is an early error (:class:`LMUnusable`, exit 11): nothing listens at ``--api-base``,
the key is refused, the server does not serve the model (not in its ``/models``, or a 404), the
answer is empty or only echoes the field's placeholder (``{category}``), the server ignored the
token cap. What degrades is a warning with the likely cause: an answer cut at ``max_tokens``
(``finish_reason=length``), an answer that does not parse, a slow answer. ``--no-preflight`` skips it.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from flagship_lm import LMSpec, failure_kind, hint_for

Out = Callable[[str], None]
PROBE_SIGNATURE = "ticket -> category"
PROBE_TICKET = "The status page shows a blank screen since this morning."


class LMUnusable(Exception):
    """The LM endpoint cannot serve the flow at all. Not a DspexError: dspex itself is fine."""

    code = "lm_unusable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def served_name(model: str) -> str:
    """The model name a server sees: ``openai/qwen2.5-0.5b`` -> ``qwen2.5-0.5b``."""
    return model.split("/", 1)[1] if "/" in model else model


def check_models(spec: LMSpec, timeout: float) -> str:
    """``GET {api_base}/models``: a refused connection, a refused key or a model the list does not
    name is an error; a server without the route (404) or a slow one is left to the Predict probe.
    Returns what was seen."""
    base = (spec.api_base or "").rstrip("/")
    request = urllib.request.Request(f"{base}/models")
    key = spec.kwargs.get("api_key")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = json.loads(resp.read() or b"{}")
        names = [str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)]
        name = served_name(spec.model)
        if names and name not in names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            prefix = spec.model.split("/", 1)[0] + "/" if "/" in spec.model else ""
            raise LMUnusable(f"{base} does not serve model {name!r}: its /models lists {shown} (use --model "
                             f"{prefix}{names[0]}, or give the server that name: llama-server --alias, "
                             "llama_cpp.server --model_alias)")
        return f"{base}/models lists {', '.join(names[:5]) or 'no models'}"
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise LMUnusable(f"{base} refused the API key (HTTP {err.code}): set the provider's key variable "
                             "(or none for a local server without auth)") from None
        return f"{base}/models answered HTTP {err.code} (not every server has it)"
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ConnectionRefusedError) or "refused" in str(reason).lower():
            raise LMUnusable(f"nothing is listening at {base} (connection refused): start the model server "
                             "(docs/flagship.md has a llama.cpp recipe) or fix --api-base; "
                             "--no-preflight skips this check") from None
        if isinstance(reason, TimeoutError) or "timed out" in str(reason).lower():
            return f"{base}/models did not answer within {timeout:g}s"
        raise LMUnusable(f"cannot reach {base}: {reason} (fix --api-base)") from None
    except TimeoutError:
        return f"{base}/models did not answer within {timeout:g}s"


def _finish_reason(entry: dict[str, Any]) -> str | None:
    response = entry.get("response")
    reason = getattr(response, "finish_reason", None)
    if reason is None:
        choices = getattr(response, "choices", None) or []
        reason = getattr(choices[0], "finish_reason", None) if choices else None
    return None if reason is None else str(reason)


def probe(spec: LMSpec) -> dict[str, Any]:
    """One tiny Predict with the flow's task bounds (no cache): what came back and how long it took."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy
    from dspy.utils.exceptions import AdapterParseError, LMError

    lm = dspy.LM(spec.model, **{**spec.lm_kwargs(0.0), "cache": False})
    t0 = time.perf_counter()
    found: dict[str, Any] = {"ok": False, "error": None, "answer": None}
    try:
        with dspy.context(lm=lm):
            pred = dspy.Predict(PROBE_SIGNATURE)(ticket=PROBE_TICKET)
        found.update(ok=True, answer=str(pred.category))
    except AdapterParseError as err:
        found["error"] = ("AdapterParseError", str(err))
    except LMError as err:
        found["error"] = (type(err).__name__, str(err))
    found["seconds"] = round(time.perf_counter() - t0, 3)
    entries = list(lm.history)
    found["calls"] = len(entries)
    if entries:
        last = entries[-1]
        found["finish_reason"] = _finish_reason(last)
        outputs = last.get("outputs") or [""]
        text = outputs[0].get("text", "") if isinstance(outputs[0], dict) else str(outputs[0] or "")
        found["empty"] = not text.strip()
        found["completion_tokens"] = (last.get("usage") or {}).get("completion_tokens")
    return found


def placeholder(answer: str) -> bool:
    """An answer that only echoes the field: ``{category}``, ``[category]``, ``category``."""
    return re.fullmatch(r"[\[{<(]*\s*category\s*[\]}>)]*", answer.strip(), re.IGNORECASE) is not None


def preflight(spec: LMSpec, out: Out) -> dict[str, Any]:
    """Check the endpoint and one Predict; print what was found; raise :class:`LMUnusable` when the
    flow cannot work. Returns the findings (they go into ``--json`` under ``preflight``)."""
    out(f"preflight: {spec.endpoint} (--no-preflight skips this)")
    report: dict[str, Any] = {"endpoint": spec.endpoint, "warnings": []}
    if spec.api_base:
        seen = check_models(spec, timeout=min(spec.bounds.timeout, 10.0))
        report["models"] = seen
        out(f"  {seen}")
    found = probe(spec)
    report.update(found)
    warnings: list[str] = report["warnings"]
    error = found["error"]
    if error is not None:
        kind, message = error
        low = message.lower()
        what = failure_kind(kind, message)
        if what in ("connection refused", "connection failed"):
            raise LMUnusable(f"nothing answers at {spec.endpoint} ({kind}: {what}): start the model "
                             "server or fix --api-base; --no-preflight skips this check")
        if any(s in low for s in ("401", "403", "authentication", "api key", "unauthorized")):
            raise LMUnusable(f"{spec.endpoint} refused the key ({kind}): set the provider's key variable")
        if what == "model not found":
            raise LMUnusable(f"{spec.endpoint} does not serve model {spec.model!r} ({kind}): check --model")
        hint = hint_for(what, message, spec)
        warnings.append(f"{kind} ({what}): {' '.join(message.split())[:200]}" + (f" -- {hint}" if hint else ""))
    cap, used = spec.bounds.max_tokens, found.get("completion_tokens")
    if isinstance(used, int) and used > cap:
        raise LMUnusable(f"{spec.endpoint} ignored the token cap: one answer took {used} tokens with max_tokens "
                         f"{cap} (sent as {' and '.join(spec.token_fields()) or 'dspy sends it'}); an unbounded "
                         "model runs to its context on every call. Cap it on the server (llama-server -n, "
                         "vLLM --max-model-len) or send the field it reads with --lm-kwarg extra_body=...")
    if found.get("empty") or (found["ok"] and (not str(found["answer"]).strip() or placeholder(str(found["answer"])))):
        said = repr(found["answer"]) if str(found["answer"] or "").strip() else "nothing"
        raise LMUnusable(f"{spec.endpoint} answered the probe with {said} for the category: it does not do the "
                         "task (a chat template that drops DSPy's system message, or not an instruction-tuned "
                         "model; see docs/flagship.md, local models); --no-preflight skips this check")
    if found.get("finish_reason") == "length":
        warnings.append(f"the answer was cut at max_tokens={spec.bounds.max_tokens} (finish_reason=length): the "
                        "model does not stop by itself -- likely not an instruction-tuned model, or no chat "
                        "template on the server; raise --max-tokens only if answers are legitimately long")
    if found["seconds"] > spec.bounds.timeout / 2:
        warnings.append(f"one tiny answer took {found['seconds']:.1f}s (--lm-timeout {spec.bounds.timeout:g}s): "
                        "expect slow calls; raise --lm-timeout if calls time out")
    if found["ok"]:
        out(f"  probe Predict parsed in {found['seconds']:.2f}s ({found.get('calls', 0)} LM call(s)): "
            f"category={found['answer']!r}")
    for w in warnings:
        out(f"  WARNING: {w}")
    if not warnings:
        out("  the LM answers and DSPy parses it")
    return report
