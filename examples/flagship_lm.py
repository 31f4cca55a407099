"""The flagship's LM settings: which model, its keys, the bounds every call gets, and what a failed
call means (its type, the adapter, a hint) -- plain data, no dspy import.

Real models get bounded calls by default: ``max_tokens`` per role (triage/insights vs GEPA's
reflection), an LM ``timeout`` shorter than dspex's call timeout, and ``num_retries`` with dspy's
exponential backoff for rate limits, 5xx and dropped connections. Settings come from flags, else
``DSPEX_*`` variables, else the defaults below.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from offline_lm import OFFLINE_LABEL, OFFLINE_MODEL, is_offline_model

from dspex.errors import ConfigError, DspexError, RemoteError

# Provider -> environment variables that hold its key (any one is enough). Providers not listed
# are checked with litellm.validate_environment when litellm is installed.
PROVIDER_KEYS: dict[str, tuple[str, ...]] = {
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "groq": ("GROQ_API_KEY",),
    "mistral": ("MISTRAL_API_KEY",),
    "deepseek": ("DEEPSEEK_API_KEY",),
    "openrouter": ("OPENROUTER_API_KEY",),
    "together_ai": ("TOGETHERAI_API_KEY", "TOGETHER_API_KEY"),
    "fireworks_ai": ("FIREWORKS_AI_API_KEY", "FIREWORKS_API_KEY"),
    "cohere": ("COHERE_API_KEY",),
    "xai": ("XAI_API_KEY",),
    "perplexity": ("PERPLEXITYAI_API_KEY",),
}
KEYLESS_PROVIDERS = frozenset({"ollama", "ollama_chat", "hosted_vllm", "vllm", "lm_studio", "llamafile"})
DUMMY_API_KEY = "dspex-local-no-key"
LM_ENGINES = ("auto", "lm15", "litellm")

# Defaults for real models. A triage answer is ~60 tokens and a ChainOfThought insight ~300;
# GEPA's reflection writes a whole instruction. dspy's ChatAdapter falls back to JSONAdapter on a
# parse failure, so one Predict makes up to 2 LM calls, each retried num_retries times.
DEFAULT_MAX_TOKENS = 512
DEFAULT_REFLECTION_MAX_TOKENS = 2048
DEFAULT_LM_TIMEOUT = 60.0
DEFAULT_NUM_RETRIES = 2
ADAPTER_ATTEMPTS = 2
CALL_MARGIN_S = 15.0

# The flagship's exit codes (docs/flagship.md). 1, 2 and 4 mean what they mean for every dspexctl
# command; 9, 10 and 11 are the flagship's own, and no other dspexctl command uses them (3 and 5-8
# are the states of `pools status`).
EXIT_OK = 0
EXIT_FAILED = 1  # could not run: the flow stopped on an error
EXIT_USAGE = 2  # a bad option, a missing key, a bad config
EXIT_UNREACHABLE = 4  # the dspex stack (broker/supervisord) cannot be reached
EXIT_COMPLETED_WITH_FAILURES = 9  # the flow completed; some LM calls failed and scored 0
EXIT_LM_TOO_SLOW = 10  # a call outlived dspex's call timeout: the LM is slower than the bounds allow
EXIT_LM_UNUSABLE = 11  # the preflight found the LM endpoint refusing, missing or rejecting the key

ENV = {
    "max_tokens": "DSPEX_MAX_TOKENS", "reflection_max_tokens": "DSPEX_REFLECTION_MAX_TOKENS",
    "timeout": "DSPEX_LM_TIMEOUT", "num_retries": "DSPEX_LM_NUM_RETRIES", "extra": "DSPEX_LM_KWARGS",
    "cache": "DSPEX_LM_CACHE",
}


@dataclass(frozen=True)
class LMBounds:
    """Limits every LM call of the flow gets (real models only: the offline engine needs none)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    reflection_max_tokens: int = DEFAULT_REFLECTION_MAX_TOKENS
    timeout: float = DEFAULT_LM_TIMEOUT
    num_retries: int = DEFAULT_NUM_RETRIES
    cache: bool = True
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def call_timeout(self) -> float:
        """dspex's timeout for one LM-backed call: longer than anything the LM bounds allow (all
        retries of one attempt, or both adapter attempts), so the LM gives up first and the flow
        records a failure instead of abandoning a busy worker."""
        worst = self.timeout * max(self.num_retries + 1, ADAPTER_ATTEMPTS)
        backoff = sum(min(2 ** a, 60) for a in range(self.num_retries))
        return float(worst + backoff + CALL_MARGIN_S)

    def describe(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.extra)
        return (f"max_tokens {self.max_tokens} (triage/insights), {self.reflection_max_tokens} (GEPA reflection); "
                f"LM timeout {self.timeout:g}s, num_retries {self.num_retries}; dspex call timeout "
                f"{self.call_timeout:g}s; cache {'on' if self.cache else 'off (--no-cache)'}{extra}")


# The two names OpenAI-compatible servers read the token cap from: dspy 3.4's native engine sends
# max_completion_tokens, litellm sends max_tokens, and a server that reads the other one (llama-cpp-python
# knows only max_tokens) generates up to its context. A local server gets both, in extra_body, which only
# litellm can send: dspy's engine "auto" then takes litellm for these calls; "lm15" sends its one field.
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class LMSpec:
    """Which LM the flow uses and the ``dspy.LM`` keyword arguments (minus temperature) for it."""

    model: str
    offline: bool
    label: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    bounds: LMBounds = LMBounds()

    @property
    def api_base(self) -> str | None:
        base = self.kwargs.get("api_base")
        return str(base) if base else None

    @property
    def endpoint(self) -> str:
        return f"{self.model} at {self.api_base}" if self.api_base else self.model

    def lm_kwargs(self, temperature: float, role: str = "task") -> dict[str, Any]:
        """``dspy.LM`` kwargs for one role: ``task`` (triage, insights) or ``reflection`` (GEPA)."""
        if self.offline:
            return {"temperature": temperature, **self.kwargs}
        b = self.bounds
        cap = b.reflection_max_tokens if role == "reflection" else b.max_tokens
        kwargs: dict[str, Any] = {
            "temperature": temperature, "timeout": b.timeout, "num_retries": b.num_retries, "max_tokens": cap,
            # reflection never replays a cached answer: each proposal must be a fresh sample
            "cache": b.cache and role != "reflection",
        }
        if self.token_fields():
            kwargs["extra_body"] = dict.fromkeys(TOKEN_FIELDS, cap)
        kwargs.update(self.kwargs)
        kwargs.update(dict(b.extra))  # --lm-kwarg extra_body={} sends dspy's own token field only
        return kwargs

    def token_fields(self) -> tuple[str, ...]:
        """The fields the token cap is sent in besides dspy's own: both, to a local server (unless
        the native engine was asked for, which cannot send them, or --lm-kwarg gave extra_body)."""
        if not self.api_base or self.kwargs.get("engine") == "lm15" or "extra_body" in dict(self.bounds.extra):
            return ()
        return TOKEN_FIELDS

    def bounds_line(self) -> str:
        """The header's line on the bounds, with the fields the token cap is sent in."""
        if self.token_fields():
            sent = "max_tokens and max_completion_tokens (extra_body: these calls go through litellm)"
        elif self.api_base and self.kwargs.get("engine") == "lm15":
            sent = ("max_completion_tokens only (--lm-engine lm15): a server that reads only max_tokens, "
                    "as llama-cpp-python does, is not bounded by it")
        else:
            sent = "the field dspy's engine picks"
        return f"{self.bounds.describe()}; token cap sent as {sent}"

    def public(self) -> dict[str, Any]:
        """What may be shown: never the key."""
        shown = {k: v for k, v in self.kwargs.items() if not k.startswith("api_key")}
        bounds = None if self.offline else {
            "max_tokens": self.bounds.max_tokens, "reflection_max_tokens": self.bounds.reflection_max_tokens,
            "timeout_s": self.bounds.timeout, "num_retries": self.bounds.num_retries, "cache": self.bounds.cache,
            "call_timeout_s": self.bounds.call_timeout, "extra": dict(self.bounds.extra)}
        return {"model": self.model, "offline": self.offline, "label": self.label, "lm_kwargs": shown,
                "bounds": bounds}


def _provider(model: str) -> str:
    return model.split("/", 1)[0].lower() if "/" in model else ""


def parse_lm_kwarg(item: str) -> tuple[str, Any]:
    """``K=V`` -> (K, V) with V read as JSON when it is JSON (``top_p=0.9``, ``stop=["\\n"]``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
        raise ConfigError(f"--lm-kwarg wants KEY=VALUE, got {item!r}")
    if key.startswith("api_key"):
        raise ConfigError("pass keys through the provider's environment variable, not --lm-kwarg")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _number(value: Any, name: str, kind: type, minimum: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {value!r}")
    return number


def resolve_bounds(*, max_tokens: int | None = None, reflection_max_tokens: int | None = None,
                   lm_timeout: float | None = None, num_retries: int | None = None,
                   lm_kwargs: tuple[str, ...] | list[str] = (), no_cache: bool = False,
                   env: Mapping[str, str] | None = None) -> LMBounds:
    """Flags first, then ``DSPEX_*`` variables, then the defaults."""
    env = os.environ if env is None else env

    def pick(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else (env.get(ENV[key]) or default)

    extra = [parse_lm_kwarg(x) for x in (env.get(ENV["extra"]) or "").split()] + [parse_lm_kwarg(x) for x in lm_kwargs]
    cache_env = (env.get(ENV["cache"]) or "1").strip().lower() not in ("0", "false", "no", "off")
    return LMBounds(
        max_tokens=_number(pick(max_tokens, "max_tokens", DEFAULT_MAX_TOKENS), "--max-tokens", int, 1),
        reflection_max_tokens=_number(pick(reflection_max_tokens, "reflection_max_tokens",
                                           DEFAULT_REFLECTION_MAX_TOKENS), "--reflection-max-tokens", int, 1),
        timeout=_number(pick(lm_timeout, "timeout", DEFAULT_LM_TIMEOUT), "--lm-timeout", float, 0.1),
        num_retries=_number(pick(num_retries, "num_retries", DEFAULT_NUM_RETRIES), "--num-retries", int, 0),
        cache=cache_env and not no_cache, extra=tuple(dict(extra).items()))


def resolve_lm(model: str | None = None, api_base: str | None = None, *, engine: str | None = None,
               env: Mapping[str, str] | None = None, bounds: LMBounds | None = None) -> LMSpec:
    """The LM from ``model`` / ``DSPEX_MODEL``; the offline engine when none is given.

    A real model whose provider key is missing raises :class:`dspex.ConfigError` (one line) before
    anything starts. With ``api_base`` (a local OpenAI-compatible server) a dummy key is used when
    none is set. The key found here is passed to ``dspy.LM(api_key=...)`` on the worker, so workers
    started without it in their environment still work (dspy keeps ``api_*`` out of its history).
    """
    env = os.environ if env is None else env
    model = (model or env.get("DSPEX_MODEL") or "").strip()
    engine = (engine or env.get("DSPEX_LM_ENGINE") or "").strip() or None
    if engine is not None and engine not in LM_ENGINES:
        raise ConfigError(f"unknown LM engine {engine!r}: use one of {', '.join(LM_ENGINES)}")
    bounds = bounds if bounds is not None else resolve_bounds(env=env)
    if is_offline_model(model):
        return LMSpec(model or OFFLINE_MODEL, True, OFFLINE_LABEL, bounds=bounds)
    kwargs: dict[str, Any] = {}
    notes: list[str] = []
    if api_base:
        kwargs["api_base"] = api_base
    if engine is not None:
        kwargs["engine"] = engine
    provider = _provider(model)
    names = PROVIDER_KEYS.get(provider, ())
    if not provider and re.match(r"(gpt-|o\d|chatgpt-|text-)", model):
        names = PROVIDER_KEYS["openai"]  # litellm treats bare OpenAI names as openai/...
    key = next((env[n] for n in names if env.get(n)), None)
    if key:
        kwargs["api_key"] = key
    elif api_base:
        kwargs["api_key"] = DUMMY_API_KEY
        notes.append(f"no {names[0] if names else 'API key'} set: using a dummy key for {api_base}")
    elif names:
        either = " or ".join(names)
        raise ConfigError(f"model {model!r} needs an API key: set {either} (or pass --api-base for a local "
                          f"OpenAI-compatible server; with no --model the offline stand-in LM is used)")
    elif provider not in KEYLESS_PROVIDERS:
        missing = _litellm_missing_keys(model)
        if missing:
            raise ConfigError(f"model {model!r} needs {', '.join(missing)} in the environment "
                              f"(litellm.validate_environment); with no --model the offline stand-in LM is used")
    where = f" at {api_base}" if api_base else ""
    return LMSpec(model, False, f"{model}{where}", kwargs, tuple(notes), bounds)


def _litellm_missing_keys(model: str) -> list[str]:
    """Keys litellm says ``model`` needs and the environment lacks; [] when litellm cannot tell."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its import fetches prices otherwise
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import litellm

            report = litellm.validate_environment(model)
    except Exception:  # noqa: BLE001 - no litellm, or it cannot map the model: let the call tell
        return []
    return [] if report.get("keys_in_environment") else [str(k) for k in report.get("missing_keys", [])]


# --------------------------------------------------------------------------- failed calls

_ADAPTER_RE = re.compile(r"Adapter (\w+) failed to parse")


def failure_kind(error: str, message: str) -> str:
    """What happened to a failed call, in words: ``unparsed``, ``timed out``, ``connection refused``..."""
    low = message.lower()
    if error == "AdapterParseError":
        return "unparsed"
    if "refused" in low or "failed to connect" in low:
        return "connection refused"
    if "connection error" in low or "connection reset" in low or "disconnected" in low:
        return "connection failed"
    if "timed out" in low or "timeout" in error.lower():
        return "timed out"
    if "429" in low or "rate limit" in low or "ratelimit" in error.lower():
        return "rate limited"
    if "context" in low and ("window" in low or "length" in low):
        return "context too long"
    if "does not exist" in low or "not found" in low or "404" in low:
        return "model not found"
    if error in ("LMServerError", "InternalServerError") or re.search(r"\b5\d\d\b", low):
        return "server error"
    return "failed"


@dataclass(frozen=True)
class Failure:
    """One LM-backed prediction of the flow that failed and was scored 0 (``dspy.Evaluate`` style).

    ``error`` is the cause: the first LM error inside the prediction when there was one (DSPy's
    ChatAdapter retries with JSONAdapter after any error, so a timed-out call often surfaces as the
    retry's parse error), else the error the prediction raised; ``then`` is that final error when it
    differs."""

    step: str
    item: str
    error: str  # the cause's type name, e.g. AdapterParseError, LMTransportError
    message: str
    hint: str = ""
    adapter: str | None = None
    session: str | None = None
    worker: str | None = None
    seconds: float | None = None
    then: str | None = None
    kind: str = "failed"

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def label(self) -> str:
        return f"{self.error} ({self.adapter})" if self.adapter and self.kind == "unparsed" else self.error

    def tag(self) -> str:
        """What stands in for the answer on the console: ``<unparsed>``, ``<timed out>``..."""
        return f"<{self.kind}>"


def error_type(err: BaseException) -> str:
    """The user-facing type of a failure: the remote exception's class for a RemoteError."""
    if isinstance(err, RemoteError):
        return err.type_name or "RemoteError"
    return type(err).__name__


def hint_for(kind: str, message: str, spec: LMSpec) -> str:
    """What to do about a failed LM call, by what happened (:func:`failure_kind`)."""
    low = message.lower()
    where = spec.api_base or spec.model
    if kind == "unparsed":
        if "empty or null" in low:
            return ("the model returned nothing: its chat template may drop the system message DSPy puts the "
                    "instructions in, or the server's token cap is 0")
        return ("the answer does not follow DSPy's field format: likely not an instruction-tuned model, or the "
                "server has no chat template for it (see docs/flagship.md, local models); a truncated answer "
                f"needs a larger --max-tokens (now {spec.bounds.max_tokens})")
    if kind == "timed out":
        return (f"the LM did not answer within --lm-timeout {spec.bounds.timeout:g}s: raise it for a slow model, "
                "or cap the answer length on the server")
    if kind in ("connection refused", "connection failed"):
        return f"nothing answers at {where}: start the model server or fix --api-base"
    if kind == "rate limited":
        return f"rate limited after {spec.bounds.num_retries} retries: raise --num-retries or slow down"
    if kind == "context too long":
        return "the prompt does not fit the model's context: use a model with a longer context"
    if kind == "model not found":
        return f"{where} does not serve model {spec.model!r}: check --model against the server's /models"
    if kind == "server error":
        return f"the server at {where} failed the call after {spec.bounds.num_retries} retries: see its log"
    return ""


def make_failure(step: str, item: str, error: str, message: str, spec: LMSpec, *, then: str | None = None,
                 session: str | None = None, worker: str | None = None, seconds: float | None = None) -> Failure:
    kind = failure_kind(error, message)
    m = _ADAPTER_RE.search(message) or _ADAPTER_RE.search(then or "")
    return Failure(step, item, error, " ".join(message.split())[:500], hint_for(kind, message, spec),
                   m[1] if m else None, session, worker, None if seconds is None else round(seconds, 3),
                   " ".join(then.split())[:300] if then else None, kind)


def failure_of(step: str, item: str, err: DspexError, spec: LMSpec, *, session: str | None = None,
               worker: str | None = None, seconds: float | None = None) -> Failure:
    """The failure record of a call that raised (a RemoteError from the worker)."""
    return make_failure(step, item, error_type(err), err.message or str(err), spec, session=session,
                        worker=worker, seconds=seconds)


def failure_from_record(step: str, item: str, record: dict[str, Any], spec: LMSpec, *, session: str | None = None,
                        worker: str | None = None, seconds: float | None = None) -> Failure:
    """The failure record of a prediction the worker reported as data (``dspex_answer``, the ledger)."""
    return make_failure(step, item, str(record.get("error") or "Exception"), str(record.get("message") or ""),
                        spec, then=record.get("then"), session=session, worker=worker, seconds=seconds)


def count_line(failures: list[Failure], total: int, what: str) -> str:
    """``2/5 tickets failed: AdapterParseError ×2``; '' when none failed."""
    if not failures:
        return ""
    return f"{len(failures)}/{total} {what} failed: {kinds_text(failures)}"


def kinds_text(failures: list[Failure]) -> str:
    """``AdapterParseError ×2, LMTransportError (timed out) ×1``."""
    kinds = Counter(f.error if f.kind in ("unparsed", "failed") else f"{f.error} ({f.kind})" for f in failures)
    return ", ".join(f"{k} \u00d7{n}" for k, n in kinds.most_common())
