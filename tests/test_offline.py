"""The offline engine: adapter-format answers, rule following, determinism, history, and real GEPA gains.

All in-process; no network (the engine never opens a connection, and dspy's custom-engine path
never imports litellm). setup.cfg turns warnings into errors, so any adapter fallback warning fails.
"""

from __future__ import annotations

import copy
import pickle
import time
from typing import Any

import dspy
import pytest
from offline_lm import (
    OFFLINE_LABEL,
    RULES_HEADER,
    OfflineEngine,
    apply_rules,
    is_offline_model,
    offline_lm,
    parse_rules,
    propose_instruction,
)

TICKETS = {
    "INC-001": ("Checkout fails with a 500 error for EU users after last deploy.", "outage", "high"),
    "INC-002": ("Refund still not received after 10 business days.", "billing", "medium"),
    "INC-003": ("Requesting a bulk export feature for analytics dashboards.", "feature", "low"),
    "INC-004": ("Admin login locked after SSO update; multiple users blocked.", "account", "high"),
    "INC-005": ("CSV export shows incorrect timezone offsets in reports.", "bug", "medium"),
    "HOLDOUT-01": ("Customer cannot update billing address in the portal.", "billing", "medium"),
}
SIG = "ticket -> category, urgency, action"
REFUND_RULE = '- If the ticket mentions "refund" or "charge": category=billing, urgency=low'


def _examples(ids: list[str]) -> list[dspy.Example]:
    return [dspy.Example(ticket=TICKETS[i][0], category=TICKETS[i][1], urgency=TICKETS[i][2]).with_inputs("ticket")
            for i in ids]


TRAIN = _examples(["INC-001", "INC-002", "INC-003"])


def metric(gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None) -> dspy.Prediction:
    notes, score = [], 0.0
    for field in ("category", "urgency"):
        want, got = str(gold[field]).strip().lower(), str(getattr(pred, field, "")).strip().lower()
        if want == got:
            score += 0.5
        else:
            notes.append(f"{field.capitalize()} mismatch: expected '{want}' got '{got}'.")
    return dspy.Prediction(score=score, feedback=" ".join(notes) or "Perfect match. Keep the intent and be concise.")


def mean_score(program: dspy.Module, lm: dspy.LM, examples: list[dspy.Example]) -> float:
    with dspy.context(lm=lm):
        return sum(metric(ex, program(**ex.inputs())).score for ex in examples) / len(examples)


@pytest.fixture
def lm() -> dspy.LM:
    return offline_lm(temperature=0.2)


def test_predict_answers_every_field_in_chat_format(lm: dspy.LM) -> None:
    with dspy.context(lm=lm):
        pred = dspy.Predict(SIG)(ticket=TICKETS["INC-002"][0])
    assert pred.category and pred.urgency and pred.action
    assert "[[ ## completed ## ]]" in lm.history[-1]["outputs"][0]
    assert len(lm.history) == 1  # one call: no JSONAdapter fallback retry


@pytest.mark.parametrize("adapter", [dspy.JSONAdapter(), dspy.XMLAdapter()], ids=["json", "xml"])
def test_other_adapters_parse(lm: dspy.LM, adapter: dspy.Adapter) -> None:
    with dspy.context(lm=lm, adapter=adapter):
        pred = dspy.Predict(SIG)(ticket=TICKETS["INC-001"][0])
        typed = dspy.Predict("ticket -> is_urgent: bool, words: int")(ticket="Site is down")
    assert {"category", "urgency", "action"} <= set(pred.keys())
    assert isinstance(typed.is_urgent, bool) and isinstance(typed.words, int)


def test_chain_of_thought_has_reasoning(lm: dspy.LM) -> None:
    with dspy.context(lm=lm):
        pred = dspy.ChainOfThought("ticket -> summary, root_cause")(ticket=TICKETS["INC-001"][0])
    assert pred.reasoning and pred.summary and pred.root_cause


def test_unoptimized_default_is_a_plausible_keyword_baseline(lm: dspy.LM) -> None:
    """Not one label for everything: some tickets right, some wrong, room for GEPA to improve."""
    score = mean_score(dspy.Predict(SIG), lm, TRAIN)
    assert 0.5 <= score < 1.0
    with dspy.context(lm=lm):
        labels = {tid: dspy.Predict(SIG)(ticket=text).category for tid, (text, _, _) in TICKETS.items()}
    assert len(set(labels.values())) >= 3, labels
    assert labels["INC-002"] == "billing" and labels["INC-004"] == "account" and labels["INC-003"] == "feature"
    assert labels["INC-001"] != "outage"  # what GEPA has to learn


def test_instruction_rules_change_the_answer(lm: dspy.LM) -> None:
    base = dspy.Predict(SIG)
    ruled = dspy.Predict(base.signature.with_instructions(base.signature.instructions + "\n" + REFUND_RULE))
    with dspy.context(lm=lm):
        before, after = base(ticket=TICKETS["INC-002"][0]), ruled(ticket=TICKETS["INC-002"][0])
        untouched = ruled(ticket=TICKETS["INC-003"][0])
    assert (before.category, before.urgency, after.category, after.urgency) == ("billing", "medium", "billing", "low")
    assert (untouched.category, untouched.urgency) == ("feature", "medium")  # the rule's keywords do not occur there


def test_rule_language() -> None:
    rules = parse_rules('Intro prose.\n- If the ticket mentions "refund" or \'charge\': category=billing, '
                       'action="Refund it, then reply"\n* Otherwise: urgency=low\nif ticket contains sso -> category=account')
    assert [r.keywords for r in rules] == [("refund", "charge"), (), ("sso",)]
    values, fired = apply_rules(rules, {"ticket": "Charged twice; SSO broken"})
    assert values == {"category": "billing", "action": "Refund it, then reply", "urgency": "low"}
    assert fired == ['"charge"', "otherwise"]
    assert parse_rules(rules[0].render()) == [rules[0]]


def test_determinism_without_cache() -> None:
    lm = offline_lm(temperature=0.9, cache=False)
    with dspy.context(lm=lm):
        first = dspy.Predict(SIG)(ticket=TICKETS["INC-004"][0])
        second = dspy.Predict(SIG)(ticket=TICKETS["INC-004"][0])
    assert first.toDict() == second.toDict()
    assert lm.history[0]["outputs"] == lm.history[1]["outputs"]


def test_history_entries_carry_model_usage_cost_response(lm: dspy.LM) -> None:
    with dspy.context(lm=lm):
        dspy.Predict(SIG)(ticket=TICKETS["INC-005"][0])
    entry = lm.history[-1]
    assert entry["model"] == "offline/triage"
    assert entry["usage"]["prompt_tokens"] > 0 and entry["usage"]["completion_tokens"] > 0
    assert "cost" in entry  # DSPy prices custom engines as unknown (None); it never charges
    assert entry["response"].provider_data["label"] == OFFLINE_LABEL


def test_engine_copies_pickles_and_saves(lm: dspy.LM) -> None:
    state = lm.dump_state()
    assert state["engine"]["class"] == "offline_lm:OfflineEngine"
    for clone in (copy.deepcopy(lm), pickle.loads(pickle.dumps(lm)), lm.copy(),
                  dspy.LM.load_state(state, allow_custom_lm_class=True)):
        with dspy.context(lm=clone):
            assert dspy.Predict(SIG)(ticket="x").category == "bug"
    assert pickle.loads(pickle.dumps(OfflineEngine())) == OfflineEngine()


def test_is_offline_model() -> None:
    assert is_offline_model(None) and is_offline_model("") and is_offline_model("offline/triage")
    assert not is_offline_model("gemini/gemini-flash-lite-latest")


def test_reflection_learns_rules_from_feedback() -> None:
    current = "Given the fields `ticket`, produce the fields `category`, `urgency`, `action`.\n" + REFUND_RULE
    examples = [
        {"Inputs": {"ticket": TICKETS["INC-004"][0]}, "Generated Outputs": {"category": "bug", "urgency": "high"},
         "Feedback": "Category mismatch: expected 'account' got 'bug'."},
        {"Inputs": {"ticket": TICKETS["INC-005"][0]}, "Generated Outputs": {"category": "bug", "urgency": "medium"},
         "Feedback": "Perfect match. Keep the intent and be concise."},
    ]
    new = propose_instruction(current, examples)
    assert new.startswith("Given the fields") and RULES_HEADER in new
    rules = parse_rules(new)
    assert rules[-1] == parse_rules(REFUND_RULE)[0]  # old rule kept, after the learned one
    assert dict(rules[0].assignments) == {"category": "account", "urgency": "high"}
    assert apply_rules(rules, {"ticket": TICKETS["INC-004"][0]})[0]["category"] == "account"


def test_reflection_through_gepas_proposer() -> None:
    """dspy 3.4's InstructionProposer asks via JSONAdapter and parses {"new_instruction": ...}."""
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    dataset = {"self": [{"Inputs": {"ticket": TICKETS["INC-002"][0]},
                         "Generated Outputs": {"category": "bug", "urgency": "medium", "action": "Look."},
                         "Feedback": "Category mismatch: expected 'billing' got 'bug'."}]}
    reflection = offline_lm(temperature=0.9)
    with dspy.context(lm=reflection):
        out = InstructionProposer()(candidate={"self": "Triage the ticket."}, reflective_dataset=dataset,
                                    components_to_update=["self"])
    assert parse_rules(out["self"])[0].assignments == (("urgency", "medium"), ("category", "billing"))
    assert reflection.history[-1]["outputs"][0].lstrip().startswith("{")


def _run_gepa(budget: int) -> tuple[dspy.Module, float, float]:
    task_lm, reflection_lm = offline_lm(temperature=0.2), offline_lm(temperature=0.9)
    program = dspy.Predict(SIG)
    started = time.perf_counter()
    with dspy.context(lm=task_lm):
        optimized = dspy.GEPA(metric, reflection_lm=reflection_lm, max_metric_calls=budget,
                              reflection_minibatch_size=1, track_stats=True).compile(
            program, trainset=TRAIN, valset=TRAIN)
    elapsed = time.perf_counter() - started
    baseline, score = mean_score(program, task_lm, TRAIN), mean_score(optimized, task_lm, TRAIN)
    print(f"\nGEPA budget={budget}: baseline={baseline:.3f} optimized={score:.3f} "
          f"metric_calls={optimized.detailed_results.total_metric_calls} time={elapsed:.2f}s")
    return optimized, baseline, score


def test_gepa_improves_with_budget_30() -> None:
    optimized, baseline, score = _run_gepa(30)
    assert score > baseline
    assert parse_rules(optimized.signature.instructions)  # the gain comes from learned rules


def test_gepa_small_budget_stays_within_it() -> None:
    optimized, baseline, score = _run_gepa(3)
    assert optimized.detailed_results.total_metric_calls <= 3
    assert score >= baseline


def test_bare_gepa_template_gets_a_fenced_instruction(lm: dspy.LM) -> None:
    """gepa's own default proposer (not used by dspy.GEPA) sends a plain prompt and reads ``` fences."""
    from gepa.strategies.instruction_proposal import InstructionProposalSignature as Proposal

    prompt = Proposal.prompt_renderer({"current_instruction_doc": "Triage the ticket.", "dataset_with_feedback": [
        {"Inputs": {"ticket": TICKETS["INC-003"][0]}, "Generated Outputs": {"category": "bug", "urgency": "medium"},
         "Feedback": "Category mismatch: expected 'feature' got 'bug'. Urgency mismatch: expected 'low' got 'medium'."}]})
    new = Proposal.output_extractor(lm(prompt)[0])["new_instruction"]
    assert new.startswith("Triage the ticket.")
    assert apply_rules(parse_rules(new), {"ticket": TICKETS["INC-003"][0]})[0] == {"category": "feature",
                                                                                      "urgency": "low"}


def test_async_call(lm: dspy.LM) -> None:
    import asyncio

    async def run() -> dspy.Prediction:
        with dspy.context(lm=lm):
            return await dspy.Predict(SIG).acall(ticket=TICKETS["INC-001"][0])

    assert asyncio.run(run()).urgency == "high"


def test_streaming_listener_sees_field_chunks(lm: dspy.LM) -> None:
    import asyncio

    program = dspy.streamify(dspy.Predict(SIG),
                             stream_listeners=[dspy.streaming.StreamListener(signature_field_name="action")])

    async def run() -> tuple[list[str], dspy.Prediction]:
        chunks, final = [], None
        with dspy.context(lm=lm):
            async for item in program(ticket="Site is down"):
                if isinstance(item, dspy.streaming.StreamResponse):
                    chunks.append(item.chunk)
                elif isinstance(item, dspy.Prediction):
                    final = item
        assert final is not None
        return chunks, final

    chunks, final = asyncio.run(run())
    assert len(chunks) > 3 and "".join(chunks).strip() == final.action
    assert "'Site is down'" in final.action  # the input stops before the adapter's "Respond with ..." reminder
