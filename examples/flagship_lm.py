"""The flagship's LM settings: which model, its keys, the bounds every call gets, and what a failed
call means (its type, the adapter, a hint) -- plain data, no dspy import.

Real models get bounded calls by default (issue 11): ``max_tokens`` per role (triage/insights vs
GEPA's reflection), an LM ``timeout`` shorter than dspex's call timeout, and ``num_retries`` with
dspy's exponential backoff for rate limits, 5xx and dropped connections. Settings come from flags,
else ``DSPEX_*`` variables, else the defaults below.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from dspex.errors import ConfigError, DspexError, RemoteError
from examples.offline_lm import OFFLINE_LABEL, OFFLINE_MODEL, is_offline_model

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
# command; 3, 5 and 6 are the flagship's own.
EXIT_OK = 0
EXIT_FAILED = 1  # could not run: the flow stopped on an error
EXIT_USAGE = 2  # a bad option, a missing key, a bad config
EXIT_COMPLETED_WITH_FAILURES = 3  # the flow completed; some LM calls failed and scored 0
EXIT_UNREACHABLE = 4  # the dspex stack (broker/supervisord) cannot be reached
EXIT_LM_TOO_SLOW = 5  # a call outlived dspex's call timeout: the LM is slower than the bounds allow
EXIT_LM_UNUSABLE = 6  # the preflight found the LM endpoint refusing, missing or rejecting the key

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
        return worst + backoff + CALL_MARGIN_S

    def describe(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.extra)
        return (f"max_tokens {self.max_tokens} (triage/insights), {self.reflection_max_tokens} (GEPA reflection); "
                f"LM timeout {self.timeout:g}s, num_retries {self.num_retries}; dspex call timeout "
                f"{self.call_timeout:g}s; cache {'on' if self.cache else 'off (--no-cache)'}{extra}")


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
        kwargs: dict[str, Any] = {
            "temperature": temperature, "timeout": b.timeout, "num_retries": b.num_retries,
            "max_tokens": b.reflection_max_tokens if role == "reflection" else b.max_tokens,
            # reflection never replays a cached answer: each proposal must be a fresh sample
            "cache": b.cache and role != "reflection",
        }
        kwargs.update(self.kwargs)
        kwargs.update(dict(b.extra))
        return kwargs

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


@dataclass(frozen=True)
class Failure:
    """One LM-backed call of the flow that failed and was scored 0 (``dspy.Evaluate`` style)."""

    step: str
    item: str
    error: str  # the exception's type name, e.g. AdapterParseError, LMTransportError
    message: str
    hint: str = ""
    adapter: str | None = None
    session: str | None = None
    worker: str | None = None
    seconds: float | None = None

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def label(self) -> str:
        return f"{self.error} ({self.adapter})" if self.adapter else self.error


def error_type(err: BaseException) -> str:
    """The user-facing type of a failure: the remote exception's class for a RemoteError."""
    if isinstance(err, RemoteError):
        return err.type_name or "RemoteError"
    return type(err).__name__


def hint_for(kind: str, message: str, spec: LMSpec) -> str:
    """What to do about a failed LM call, by its type and message."""
    low = message.lower()
    if kind == "AdapterParseError":
        if "empty or null" in low:
            return ("the model returned nothing: its chat template may drop the system message DSPy puts the "
                    "instructions in, or the server's token cap is 0")
        return ("the answer does not follow DSPy's field format: likely not an instruction-tuned model, or the "
                "server has no chat template for it (see docs/flagship.md, local models); a truncated answer "
                f"needs a larger --max-tokens (now {spec.bounds.max_tokens})")
    if "timed out" in low or "timeout" in kind.lower():
        return (f"the LM did not answer within --lm-timeout {spec.bounds.timeout:g}s: raise it for a slow model, "
                "or cap the answer length on the server")
    if "refused" in low or "failed to connect" in low:
        return f"nothing answers at {spec.api_base or spec.model}: start the model server or fix --api-base"
    if "rate" in low and "limit" in low or "429" in low:
        return f"rate limited after {spec.bounds.num_retries} retries: raise --num-retries or slow down"
    if "context" in low and ("window" in low or "length" in low):
        return "the prompt does not fit the model's context: use a model with a longer context"
    return ""


def failure_of(step: str, item: str, err: DspexError, spec: LMSpec, *, session: str | None = None,
               worker: str | None = None, seconds: float | None = None) -> Failure:
    kind = error_type(err)
    message = err.message or str(err)
    m = _ADAPTER_RE.search(message)
    return Failure(step, item, kind, " ".join(message.split())[:500], hint_for(kind, message, spec),
                   m[1] if m else None, session, worker, None if seconds is None else round(seconds, 3))


def count_line(failures: list[Failure], total: int, what: str) -> str:
    """``2/5 tickets failed: AdapterParseError ×2``; '' when none failed."""
    if not failures:
        return ""
    kinds = Counter(f.error for f in failures)
    return f"{len(failures)}/{total} {what} failed: " + ", ".join(f"{k} \u00d7{n}" for k, n in kinds.most_common())
