"""Offline engine: a deterministic stand-in LM so dspex runs with no key and no network.

It plugs into DSPy 3.4's custom-engine API (``dspy.LM(model, engine=OfflineEngine())``): DSPy
hands it one canonical ``dspy.lm15.Request`` per call and it returns one ``Response``. It reads
the prompt the adapter built (ChatAdapter ``[[ ## field ## ]]`` sections, JSONAdapter's JSON
object, XMLAdapter tags), answers every requested output field in that adapter's format, and
follows keyword rules written in the signature's instructions. With no rules it falls back to a
plausible keyword baseline (billing/account/feature words, else "bug"; urgency from alarm words)
that knows no "outage", so an unoptimized program gets some tickets right and some wrong.

Rule language (one rule per line, anywhere in the instructions; case-insensitive)::

    - If the ticket mentions "refund" or "charge": category=billing, urgency=medium
    - Otherwise: urgency=low

* ``If the <input field> mentions "kw1" or "kw2" ...: field=value, field=value`` -- a keyword
  matches at a word start (``"refund"`` matches "refunds"); when <input field> is not an input
  of the signature, all inputs are searched. Values may be quoted (``action="Call the bank"``).
* ``Otherwise: field=value`` -- used for a field only when no ``If`` rule set it.
* Rules are checked top to bottom; the first matching rule sets each field.

The same engine is GEPA's reflection model: when a request asks for ``new_instruction`` from
``current_instruction`` + ``examples_with_feedback`` (dspy 3.4's ``InstructionProposer``, which
formats with JSONAdapter and parses ``{"new_instruction": ...}``), it keeps the old rules and puts a
new rule in front of them for every example whose feedback says ``X mismatch: expected 'a' got
'b'``, keyed on distinctive words of that example's input. So GEPA's improvement is real: more
metric calls, more examples reflected on, more rules learned. The bare gepa prompt
(``Provide the new instructions within ``` blocks``) is answered inside ``` fences.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before anything imports litellm

import hashlib
import json
import re
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # dspy costs ~0.5 s to import; the broker only needs is_offline_model
    import dspy
    from dspy.lm15 import Request, Response

__all__ = [
    "OFFLINE_LABEL",
    "OFFLINE_MODEL",
    "RULES_HEADER",
    "AsyncOfflineEngine",
    "OfflineEngine",
    "Rule",
    "apply_rules",
    "is_offline_model",
    "offline_lm",
    "parse_rules",
    "propose_instruction",
]

OFFLINE_LABEL = "offline stand-in LM (deterministic, no network)"
OFFLINE_MODEL = "offline/triage"
RULES_HEADER = "Rules (checked top to bottom; the first matching rule sets each field):"

_RULE_RE = re.compile(
    r"^\s*(?:[-*\u2022]|\d+[.)])?\s*if\s+(?:the\s+)?(?P<field>\w+)?\s*(?:mentions|contains|includes|says)\s+"
    r"(?P<kws>.+?)\s*(?::|\bthen\b|->|=>)\s*(?P<assign>\w+\s*=.*)$", re.IGNORECASE)
_OTHERWISE_RE = re.compile(r"^\s*(?:[-*\u2022]\s*)?(?:otherwise|default|else)\s*[:,]?\s*(?P<assign>\w+\s*=.*)$",
                           re.IGNORECASE)
_ASSIGN_RE = re.compile(r"(\w+)\s*=\s*(\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^,;]+)")
_MISMATCH_RE = re.compile(r"(?P<field>[A-Za-z_][\w ]*?)\s+mismatch:\s*expected\s+(?P<q>['\"])(?P<exp>.*?)(?P=q)"
                          r"[\s,;]*got\s+(?P<q2>['\"])(?P<got>.*?)(?P=q2)", re.IGNORECASE)
_OUT_FIELD_RE = re.compile(r"^\s*\d+\.\s+`(\w+)`\s+\((.*?)\)(?::|$)")
_HEADER_RE = re.compile(r"\[\[ ## (\w+) ## \]\]")
_ALARM = ("down", "outage", "crash", "fail", "error", "blocked", "urgent", "broken")  # baseline only
_BASELINE_CATEGORIES = (  # first match wins; anything else is a "bug"
    ("billing", ("refund", "charge", "invoice", "payment", "billing")),
    ("account", ("login", "password", "sso", "account", "locked")),
    ("feature", ("feature", "request", "would like", "add support")),
)
_CATEGORY_NAMES = {"category", "label", "type", "kind", "class", "topic", "intent"}
_URGENCY_NAMES = {"urgency", "priority", "severity"}
_STOPWORDS = frozenset(["the", "and", "with", "for", "after", "before", "from", "that", "this", "have", "has", "been", "still", "when", "what", "which", "their", "there", "they", "them", "users", "user", "customer", "customers", "please", "some", "into", "onto", "over", "under", "about", "also", "just", "cannot", "does", "doesn't", "not", "multiple", "again", "days", "since", "last", "shows", "being", "were", "would", "could", "should", "while", "because", "other", "only", "more", "most", "very", "want", "need", "needs", "ticket", "issue", "problem", "getting", "get", "gets", "like", "any", "all", "our", "your", "its", "it's"])


@dataclass(frozen=True)
class Rule:
    """One instruction rule. Empty ``keywords`` means an ``Otherwise`` rule."""

    keywords: tuple[str, ...]
    assignments: tuple[tuple[str, str], ...]
    field: str = "ticket"

    def render(self) -> str:
        values = ", ".join(f"{k}={_quote(v)}" for k, v in self.assignments)
        if not self.keywords:
            return f"- Otherwise: {values}"
        return f"- If the {self.field} mentions " + " or ".join(f'"{k}"' for k in self.keywords) + f": {values}"


def _quote(value: str) -> str:
    return json.dumps(value) if re.search(r"[\s,;=\"']", value) else value


def _unquote(value: str) -> str:
    value = value.strip().rstrip(".")
    if value[:1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value.strip('"')
    return value.strip("'")


def parse_rules(instructions: str) -> list[Rule]:
    """All rules written in ``instructions``, in order (unparseable lines are prose and ignored)."""
    rules: list[Rule] = []
    for line in instructions.splitlines():
        if m := _RULE_RE.match(line):
            kws = re.findall(r"\"([^\"]+)\"|'([^']+)'", m["kws"])
            words = [a or b for a, b in kws] or [w.strip() for w in re.split(r"\bor\b|,", m["kws"]) if w.strip()]
            assign = tuple((k.lower(), _unquote(v)) for k, v in _ASSIGN_RE.findall(m["assign"]))
            if words and assign:
                rules.append(Rule(tuple(w.lower() for w in words), assign, (m["field"] or "input").lower()))
        elif m := _OTHERWISE_RE.match(line):
            assign = tuple((k.lower(), _unquote(v)) for k, v in _ASSIGN_RE.findall(m["assign"]))
            if assign:
                rules.append(Rule((), assign, "input"))
    return rules


def apply_rules(rules: list[Rule], inputs: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Field values set by the first matching rule per field, and a log of which keywords fired."""
    everything = "\n".join(inputs.values())
    values: dict[str, str] = {}
    fired: list[str] = []
    for rule in [r for r in rules if r.keywords] + [r for r in rules if not r.keywords]:
        text = inputs.get(rule.field, everything).lower()
        hit = next((k for k in rule.keywords if re.search(r"\b" + re.escape(k), text)), None)
        if rule.keywords and hit is None:
            continue
        new = {k: v for k, v in rule.assignments if k not in values}
        if new:
            values.update(new)
            fired.append(f'"{hit}"' if hit else "otherwise")
    return values, fired


# --------------------------------------------------------------------------- prompt reading


@dataclass
class _Prompt:
    adapter: str  # "chat" | "json" | "xml" | "text"
    instructions: str = ""
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (name, annotation text)


def _text_of(content: Any) -> str:
    from dspy.lm15 import TextPart

    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = content.parts if hasattr(content, "parts") else content
    return "\n".join(p.text for p in parts if isinstance(p, TextPart))


def _read_prompt(system: str, user: str) -> _Prompt:
    """Recover adapter, instructions, input values and output fields from an adapter-built prompt."""
    if "Respond with a JSON object" in user or "Outputs will be a JSON object" in system:
        adapter = "json"
    elif "wrapped in XML tags" in user:
        adapter = "xml"
    elif "[[ ## completed ## ]]" in system + user:
        adapter = "chat"
    else:
        return _Prompt("text")
    prompt = _Prompt(adapter)
    if m := re.search(r"your objective is:[^\n]*\n(.*)\Z", system, re.DOTALL):
        prompt.instructions = textwrap.dedent(m[1]).strip()
    if m := re.search(r"Your output fields are:\n(.*?)(?:\nAll interactions will be structured|\Z)", system, re.DOTALL):
        prompt.outputs = [(f.group(1), f.group(2)) for f in map(_OUT_FIELD_RE.match, m[1].splitlines()) if f]
    if not prompt.outputs:  # no field list: fall back to the user message's reminder
        names = re.findall(r"`(?:\[\[ ## )?<?(\w+)>?(?: ## \]\])?`", user.split("Respond with", 1)[-1])
        prompt.outputs = [(n, "str") for n in names if n != "completed"]
    body = re.split(r"\n\s*Respond with (?:the corresponding output fields|a JSON object)", user)[0]
    if adapter == "xml":
        found = {m[1]: m[2].strip() for m in re.finditer(r"<(\w+)>\n?(.*?)\n?</\1>", body, re.DOTALL)}
    else:
        chunks = _HEADER_RE.split(body)
        found = {name: value.strip() for name, value in zip(chunks[1::2], chunks[2::2])}
    declared = re.search(r"Your input fields are:\n(.*?)\nYour output fields are:", system, re.DOTALL)
    names = [f[1] for f in map(_OUT_FIELD_RE.match, declared[1].splitlines()) if f] if declared else list(found)
    prompt.inputs = {n: found[n] for n in names if n in found}
    return prompt


# --------------------------------------------------------------------------- answering


def _snippet(text: str, words: int = 10) -> str:
    first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]
    parts = first.split()
    return " ".join(parts[:words]) + ("..." if len(parts) > words else "")


def _keywords(text: str, exclude: set[str] | frozenset[str] = frozenset(), limit: int = 3) -> list[str]:
    """Distinctive words of ``text``: long, not filler, not shared with the other examples."""
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]*", text)]
    seen: list[str] = []
    for w in words:
        if len(w) >= 4 and w not in _STOPWORDS and w not in seen:
            seen.append(w)
    pool = [w for w in seen if w not in exclude] or seen or words[:1]
    return sorted(pool, key=lambda w: (-len(w), pool.index(w)))[:limit]


def _literal_options(annotation: str) -> list[str]:
    return re.findall(r"'([^']*)'", annotation) if annotation.startswith("Literal") else []


def _default_value(name: str, annotation: str, text: str) -> str:
    """The untrained baseline: a plausible keyword triage (billing, account, feature words; "bug"
    otherwise) that knows no "outage" and rates urgency by alarm words only, so an unoptimized
    program gets some tickets right and some wrong, and GEPA's learned rules have work to do."""
    lowered = text.lower()
    if options := _literal_options(annotation):
        return next((o for o in options if o.lower() in lowered), options[0])
    if name in _CATEGORY_NAMES:
        return next((label for label, words in _BASELINE_CATEGORIES
                     if any(re.search(r"\b" + w, lowered) for w in words)), "bug")
    if name in _URGENCY_NAMES:
        return "high" if any(re.search(r"\b" + a, lowered) for a in _ALARM) else "medium"
    return ""


def _typed(value: str, annotation: str, text: str) -> Any:
    """A value of the field's declared type, so adapters parse it without complaint."""
    a = annotation.lower()
    if a.startswith("bool"):
        return value.lower() in ("true", "yes", "1") if value else False
    if a.startswith(("int", "float")):
        try:
            return int(value) if a.startswith("int") else float(value)
        except ValueError:
            return len(text.split())
    if a.startswith(("list", "dict", "tuple", "set")):
        return [value] if value and a.startswith("list") else ([] if not a.startswith("dict") else {})
    return value


def _answer_fields(prompt: _Prompt) -> dict[str, Any]:
    """Values for every output field: rules first, then the keyword baseline, then short derived text."""
    names = {n for n, _ in prompt.outputs}
    if {"new_instruction", "improved_instruction"} & names and "current_instruction" in prompt.inputs:
        target = "new_instruction" if "new_instruction" in names else "improved_instruction"
        proposal = propose_instruction(prompt.inputs["current_instruction"],
                                       _examples(prompt.inputs.get("examples_with_feedback", "")))
        return {n: (proposal if n == target else "Added keyword rules from the feedback.") for n in names}
    if "shortened_instruction" in names:
        return {n: prompt.inputs.get("instruction", "") for n in names}
    text = "\n".join(prompt.inputs.values())
    ruled, fired = apply_rules(parse_rules(prompt.instructions), prompt.inputs)
    values: dict[str, Any] = {}
    for name, annotation in prompt.outputs:
        raw = ruled.get(name) or _default_value(name, annotation, text)
        values[name] = _typed(raw, annotation, text) if raw or not annotation.startswith("str") else raw
    labels = {n: v for n, v in values.items() if isinstance(v, str) and v}
    why = (f"Instruction rules matched {', '.join(fired)}." if fired
           else "No instruction rule matched; using the generic default.")
    key = (_keywords(text, limit=1) or ["the report"])[0]
    derived = {
        "reasoning": why + ("" if not labels else " So: " + ", ".join(f"{k}={v}" for k, v in labels.items()) + "."),
        "action": f"Acknowledge, reproduce '{_snippet(text, 8)}', and route to the "
                  f"{labels.get('category', 'support')} queue.",
        "summary": _snippet(text, 12),
        "root_cause": f"Unconfirmed; the report centres on '{key}' and needs investigation.",
    }
    for name, annotation in prompt.outputs:
        if values[name] == "" and annotation.startswith("str"):
            values[name] = derived.get(name, f"{name.replace('_', ' ')}: {_snippet(text, 12)}")
    return values


def _render(prompt: _Prompt, values: dict[str, Any]) -> str:
    ordered = {n: values[n] for n, _ in prompt.outputs}
    if prompt.adapter == "json":
        return json.dumps(ordered, indent=2, ensure_ascii=False)
    as_text = {n: v if isinstance(v, str) else json.dumps(v) for n, v in ordered.items()}
    if prompt.adapter == "xml":
        return "\n\n".join(f"<{n}>\n{v.replace('&', '&amp;').replace('<', '&lt;')}\n</{n}>" for n, v in as_text.items())
    return "\n\n".join(f"[[ ## {n} ## ]]\n{v}" for n, v in as_text.items()) + "\n\n[[ ## completed ## ]]"


# --------------------------------------------------------------------------- reflection


def _examples(raw: str) -> list[dict[str, Any]]:
    """Reflective examples from JSON (dspy's proposer) or gepa's '# Example N' markdown."""
    try:
        data = json.loads(raw)
        return [d for d in (data if isinstance(data, list) else [data]) if isinstance(d, dict)]
    except ValueError:
        pass
    examples = []
    for block in re.split(r"^# Example \d+\s*$", raw, flags=re.MULTILINE)[1:]:
        sections = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", block, re.MULTILINE | re.DOTALL))
        inputs = dict(re.findall(r"^### (.+?)\n(.*?)(?=^### |\Z)", sections.get("Inputs", ""), re.MULTILINE | re.DOTALL))
        examples.append({"Inputs": {k: v.strip() for k, v in inputs.items()} or sections.get("Inputs", ""),
                         "Generated Outputs": sections.get("Generated Outputs", ""),
                         "Feedback": sections.get("Feedback", "").strip()})
    return examples


def propose_instruction(current: str, examples: list[dict[str, Any]]) -> str:
    """A better instruction: the old prose and rules, with one learned rule per mismatched example in front."""
    old_rules = parse_rules(current)
    old_lines = {r.render() for r in old_rules}
    prose = [ln for ln in current.splitlines()
             if not (_RULE_RE.match(ln) or _OTHERWISE_RE.match(ln)) and ln.strip() != RULES_HEADER]
    texts = []
    for ex in examples:
        inputs = ex.get("Inputs", {})
        texts.append(inputs if isinstance(inputs, dict) else {"input": str(inputs)})
    new_rules: list[Rule] = []
    for i, ex in enumerate(examples):
        mismatches = {m["field"].strip().lower().replace(" ", "_"): m["exp"]
                      for m in _MISMATCH_RE.finditer(str(ex.get("Feedback", "")))}
        if not mismatches:
            continue
        outputs = ex.get("Generated Outputs")
        kept = {k: str(v) for k, v in (outputs.items() if isinstance(outputs, dict) else ())
                if k not in mismatches and re.fullmatch(r"[\w-]{1,30}", str(v))}  # labels, not prose
        inputs = {k: str(v) for k, v in texts[i].items()}
        field_name = next(iter(inputs), "input")
        others = {w.lower() for j, t in enumerate(texts) if j != i for v in t.values()
                  for w in re.findall(r"[A-Za-z][A-Za-z'-]*", str(v))}
        rule = Rule(tuple(_keywords(inputs.get(field_name, ""), others)),
                    tuple({**kept, **mismatches}.items()), field_name)
        if rule.keywords and rule.render() not in old_lines and rule not in new_rules:
            new_rules.append(rule)
    if not new_rules:
        return current.strip()
    superseded = {r.keywords for r in new_rules}
    rules = new_rules + [r for r in old_rules if r.keywords not in superseded]
    return "\n".join(prose).strip() + "\n\n" + RULES_HEADER + "\n" + "\n".join(r.render() for r in rules)


def _answer_bare(text: str) -> str:
    """Plain prompts: gepa's own reflection template gets a fenced instruction, anything else a note."""
    m = re.search(r"instructions to perform a task for me:\s*```\n?(.*?)\n?```(.*)", text, re.DOTALL)
    if m and "```" in m[2]:
        side = re.search(r"```\n?(.*?)\n?```", m[2], re.DOTALL)
        return "```\n" + propose_instruction(m[1], _examples(side[1] if side else "")) + "\n```"
    return f"[{OFFLINE_LABEL}] {_snippet(text, 20)}"


# --------------------------------------------------------------------------- engines


class OfflineEngine:
    """DSPy 3.4 custom engine (``complete``/``stream``/``close``); stateless, so pickling, deepcopy and
    ``LM.copy()`` are trivial, and ``dump_state``/``load_state`` let ``lm.dump_state()`` save it."""

    label = OFFLINE_LABEL

    def complete(self, request: Request) -> Response:
        """Answer one request deterministically (temperature and seed are ignored on purpose)."""
        from dspy.clients.engines.base import validate_request
        from dspy.lm15 import Message, Response, TextPart, Usage

        validate_request(request)
        system = _text_of(request.system)
        users = [m for m in request.messages if m.role == "user"]
        user = _text_of(users[-1]) if users else ""
        if system and system.startswith("Your input fields are"):  # adapter-built prompt
            prompt = _read_prompt(system, user)
            reply = _answer_bare(user) if prompt.adapter == "text" else _render(prompt, _answer_fields(prompt))
        else:
            reply = _answer_bare("\n".join(filter(None, [system, user])))
        seen = len(system.split()) + sum(len(_text_of(m).split()) for m in request.messages)
        digest = hashlib.sha256(reply.encode()).hexdigest()[:16]
        return Response(id=f"offline-{digest}", model=request.model, message=Message.assistant([TextPart(reply)]),
                        finish_reason="stop", usage=Usage(input_tokens=seen, output_tokens=len(reply.split())),
                        provider_data={"offline": True, "label": OFFLINE_LABEL})

    def stream(self, request: Request) -> Iterator[Any]:
        """The answer as word-sized text deltas, so DSPy's StreamListeners see fields arrive piecewise."""
        from dspy.lm15 import StreamDeltaEvent, StreamEndEvent, StreamStartEvent, TextDelta

        response = self.complete(request)
        yield StreamStartEvent(id=response.id, model=response.model)
        for piece in re.findall(r"\s*\S+", response.text or "") or [""]:
            yield StreamDeltaEvent(delta=TextDelta(text=piece, part_index=0))
        yield StreamEndEvent(finish_reason=response.finish_reason, usage=response.usage,
                             provider_data=response.provider_data)

    def close(self) -> None:
        """Nothing to release: the engine owns no connection."""

    def dump_state(self) -> dict[str, Any]:
        return {"label": OFFLINE_LABEL}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> OfflineEngine:
        return cls()

    def __eq__(self, other: object) -> bool:  # stateless: any two engines answer alike
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class AsyncOfflineEngine:
    """Async counterpart so ``await program.acall(...)`` works too (DSPy needs a separate object)."""

    def __init__(self) -> None:
        self._sync = OfflineEngine()

    async def complete(self, request: Request) -> Response:
        return self._sync.complete(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        for event in self._sync.stream(request):
            yield event

    async def aclose(self) -> None:
        """Nothing to release."""

    def dump_state(self) -> dict[str, Any]:
        return {"label": OFFLINE_LABEL}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncOfflineEngine:
        return cls()


def is_offline_model(model: str | None) -> bool:
    """True when no real model was chosen (None/"") or the model string names the offline engine."""
    return not model or model.startswith("offline/")


def offline_lm(model: str = OFFLINE_MODEL, **kwargs: Any) -> dspy.LM:
    """A ``dspy.LM`` backed by the offline engine. Response caching defaults to off: answering costs
    microseconds, and a disk cache would replay answers of an older engine version."""
    import dspy

    kwargs.setdefault("cache", False)
    return dspy.LM(model, engine=OfflineEngine(), async_engine=AsyncOfflineEngine(), **kwargs)
