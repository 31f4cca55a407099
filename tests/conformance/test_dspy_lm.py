"""DSPy's own tests/clients/test_lm.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test function
is the program, run in-process and through a session (``run.check``: its asserts hold on either side,
it returns None); pytest's ``tmp_path``, and a ``monkeypatch`` made where the program runs, are passed
to the tests that take them (``harness.run_dspy_test``).

Not here:
- takes DSPy's fixture ``litellm_test_server``: ``test_chat_lms_can_be_queried``,
  ``test_dspy_cache``, ``test_text_lms_can_be_queried``, ``test_lm_calls_support_callables``,
  ``test_lm_calls_support_pydantic_models``, ``test_responses_api_tool_calls``;
- fails in-process on DSPy 3.4.1: ``test_rollout_id_bypasses_cache``,
  ``test_zero_temperature_rollout_warns_once``,
  ``test_rollout_id_with_default_temperature_does_not_warn``,
  ``test_lm_wraps_litellm_errors_with_metadata``,
  ``test_lm_preserves_existing_lm_error_without_self_cause``,
  ``test_lm_preserves_existing_lm_error_without_self_cause_async``,
  ``test_retry_number_set_correctly``, ``test_retry_made_on_system_errors``,
  ``test_lm_supports_reasoning_with_litellm_capability_api``,
  ``test_base_lm_forward_contract_defaults_to_legacy``,
  ``test_base_lm_forward_contract_accepts_explicit_values``,
  ``test_base_lm_forward_contract_rejects_unknown_values``,
  ``test_base_lm_validates_typed_lm_response``,
  ``test_base_lm_warns_when_inherited_legacy_forward_returns_lm_response``,
  ``test_base_lm_errors_when_explicit_legacy_forward_returns_lm_response``,
  ``test_base_lm_inherited_legacy_forward_returning_lm_response_errors_on_direct_call``,
  ``test_base_lm_experimental_call_returns_lm_response_through_legacy_bridge``,
  ``test_base_lm_explicit_lm_request_returns_lm_response_without_experimental``,
  ``test_base_lm_legacy_bridge_records_typed_history_and_usage_once``,
  ``test_base_lm_typed_forward_contract_uses_lm_request``,
  ``test_base_lm_typed_forward_contract_rejects_non_lm_response_at_call_time``,
  ``test_base_lm_request_call_rejects_mixed_inputs``,
  ``test_base_lm_experimental_direct_messages_support_system_user_and_assistant_turns``,
  ``test_base_lm_experimental_direct_messages_support_tool_call_transcripts``,
  ``test_base_lm_experimental_direct_messages_can_reuse_lm_response_as_assistant_turn``,
  ``test_base_lm_async_explicit_lm_request_returns_lm_response``,
  ``test_exponential_backoff_retry``, ``test_logprobs_included_when_requested``,
  ``test_async_lm_call``, ``test_async_lm_call_with_cache``, ``test_lm_history_size_limit``,
  ``test_disable_history``, ``test_responses_api``,
  ``test_responses_api_cache_hit_preserves_outputs_and_skips_usage``,
  ``test_responses_api_joins_multiple_text_outputs``, ``test_reasoning_effort_responses_api``,
  ``test_call_reasoning_model_with_chat_api``, ``test_responses_api_with_image_input``,
  ``test_responses_api_with_pydantic_model_input``, ``test_responses_api_with_none_usage``,
  ``test_responses_api_with_none_usage_async``,
  ``test_openai_format_responses_request_maps_tools_choices_and_config``,
  ``test_responses_request_converts_assistant_tool_calls_and_tool_results``,
  ``test_lm_responses_does_not_validate_reasoning_temperature_client_side``,
  ``test_responses_to_lm_response_normalizes_mixed_text_reasoning_and_tool_calls``.
"""

import json
import tempfile
from pathlib import Path
from unittest import mock

import dspy
import litellm
import pydantic
import pytest
from dspy.utils.usage_tracker import track_usage
from litellm.types.llms.openai import ResponseAPIUsage, ResponsesAPIResponse
from litellm.utils import Choices, Message, ModelResponse

from tests.conformance.harness import (
    DSPY_TEST_WARNINGS,
    AsyncRunner,
    Runner,
    arun_dspy_test,
    dspy_test_cases,
    run_dspy_test,
)


def make_response(output_blocks):
    return ResponsesAPIResponse(
        id="resp_1",
        created_at=0.0,
        error=None,
        incomplete_details=None,
        instructions=None,
        model="openai/dspy-test-model",
        object="response",
        output=output_blocks,
        metadata={},
        parallel_tool_calls=False,
        temperature=1.0,
        tool_choice="auto",
        tools=[],
        top_p=1.0,
        max_output_tokens=None,
        previous_response_id=None,
        reasoning=None,
        status="completed",
        text=None,
        truncation="disabled",
        usage=ResponseAPIUsage(input_tokens=1, output_tokens=1, total_tokens=2),
        user=None,
    )


def dspy_test_disabled_cache_skips_cache_key(monkeypatch):
    original_cache = dspy.cache
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    cache = dspy.cache

    try:
        with (
            mock.patch.object(cache, "cache_key", wraps=cache.cache_key) as cache_key_spy,
            mock.patch.object(cache, "get", wraps=cache.get) as cache_get_spy,
            mock.patch.object(cache, "put", wraps=cache.put) as cache_put_spy,
        ):

            def fake_completion(*, cache, num_retries, retry_strategy, **request):
                return ModelResponse(
                    choices=[Choices(message=Message(role="assistant", content="Hi!"))],
                    usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    model="dummy",
                )

            monkeypatch.setattr(litellm, "completion", fake_completion)

            lm = dspy.LM("dummy", model_type="chat")
            lm(messages=[{"role": "user", "content": "Hello"}])

            cache_key_spy.assert_not_called()
            cache_get_spy.assert_called_once()
            cache_put_spy.assert_called_once()
    finally:
        dspy.cache = original_cache


def dspy_test_lm_wraps_litellm_context_window_error():
    lm = dspy.LM("openai/gpt-4o-mini")
    error = litellm.ContextWindowExceededError(message="too long", llm_provider="openai", model="gpt-4o")
    wrapped = lm._wrap_litellm_exception(error)

    assert isinstance(wrapped, dspy.ContextWindowExceededError)
    assert isinstance(wrapped, dspy.LMError)
    assert wrapped.model == "gpt-4o"
    assert wrapped.provider == "openai"


def dspy_test_lm_wraps_unknown_boundary_error_as_unexpected_error():
    lm = dspy.LM("openai/gpt-4o-mini")
    wrapped = lm._wrap_litellm_exception(RuntimeError("local boundary failure"))

    assert isinstance(wrapped, dspy.LMUnexpectedError)
    assert wrapped.code == "unexpected"
    assert wrapped.model == "openai/gpt-4o-mini"


def dspy_test_reasoning_model_token_parameter():
    test_cases = [
        ("openai/o1", True),
        ("openai/o1-mini", True),
        ("openai/o1-2023-01-01", True),
        ("openai/o3", True),
        ("openai/o3-mini-2023-01-01", True),
        ("openai/gpt-5", True),
        ("openai/gpt-5-mini", True),
        ("openai/gpt-5-nano", True),
        ("azure/gpt-5-chat", False),  # gpt-5-chat is NOT a reasoning model
        ("openai/gpt-4", False),
        ("anthropic/claude-2", False),
    ]

    for model_name, is_reasoning_model in test_cases:
        lm = dspy.LM(
            model=model_name,
            temperature=1.0 if is_reasoning_model else 0.7,
            max_tokens=16_000 if is_reasoning_model else 1000,
        )
        if is_reasoning_model:
            assert "max_completion_tokens" in lm.kwargs
            assert "max_tokens" not in lm.kwargs
            assert lm.kwargs["max_completion_tokens"] == 16_000
        else:
            assert "max_completion_tokens" not in lm.kwargs
            assert "max_tokens" in lm.kwargs
            assert lm.kwargs["max_tokens"] == 1000


@pytest.mark.parametrize("model_name", ["openai/o1", "openai/gpt-5-nano", "openai/gpt-5-mini"])
def dspy_test_reasoning_model_requirements(model_name):
    # Should raise assertion error if temperature or max_tokens requirements not met
    with pytest.raises(
        dspy.LMConfigurationError,
        match=r"reasoning models require passing temperature=1\.0 or None and max_tokens >= 16000 or None",
    ):
        dspy.LM(
            model=model_name,
            temperature=0.7,  # Should be 1.0
            max_tokens=1000,  # Should be >= 16_000
        )

    # Should pass with correct parameters
    lm = dspy.LM(
        model=model_name,
        temperature=1.0,
        max_tokens=16_000,
    )
    assert lm.kwargs["max_completion_tokens"] == 16_000

    # Should pass with no parameters
    lm = dspy.LM(
        model=model_name,
    )
    assert lm.kwargs["temperature"] is None
    assert lm.kwargs["max_completion_tokens"] is None


def dspy_test_gpt_5_chat_not_reasoning_model():
    """Test that gpt-5-chat is NOT treated as a reasoning model."""
    # Should NOT raise validation error - gpt-5-chat is not a reasoning model
    lm = dspy.LM(
        model="openai/gpt-5-chat",
        temperature=0.7,  # Can be any value
        max_tokens=1000,  # Can be any value
    )
    # Should use max_tokens, not max_completion_tokens
    assert "max_completion_tokens" not in lm.kwargs
    assert "max_tokens" in lm.kwargs
    assert lm.kwargs["max_tokens"] == 1000
    assert lm.kwargs["temperature"] == 0.7


def dspy_test_base_lm_init_uses_lm_defaults_and_isolates_callback_list():
    callbacks = [object()]
    lm = dspy.BaseLM("custom-model", callbacks=callbacks)

    assert lm.kwargs == {"temperature": None, "max_tokens": None}
    assert lm.num_retries == 3
    assert lm.callbacks == callbacks
    assert lm.callbacks is not callbacks


# BaseLM direct-call compatibility tests.
#
# These cover the staged typed LM migration: legacy calls still return lists by default, explicit LMRequest calls and
# experimental direct calls return LMResponse, and typed-LM subclasses receive normalized LMRequest objects.


def dspy_test_base_lm_default_call_keeps_legacy_outputs():
    class CustomLM(dspy.BaseLM):
        def forward(self, prompt=None, messages=None, **kwargs):
            assert prompt == "Query"
            assert messages is None
            return ModelResponse(
                choices=[Choices(message=Message(role="assistant", content="Hi!"))],
                usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                model="custom-model",
            )

    assert CustomLM("custom-model")("Query") == ["Hi!"]


def _model_response(text: str) -> ModelResponse:
    return ModelResponse(
        choices=[Choices(message=Message(role="assistant", content=text))],
        usage={},
        model="custom-model",
    )


class _TypedContractLM(dspy.BaseLM):
    """Test double that records normalized requests received through the typed LM contract."""

    forward_contract = "typed_lm"

    def __init__(self, *args, outputs: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.outputs = outputs
        self.requests = []

    def forward(self, request):
        assert isinstance(request, dspy.LMRequest)
        self.requests.append(request)
        return dspy.LMResponse.from_text(self.outputs[len(self.requests) - 1], model=request.model)


def _direct_lm_case(lm_kind: str, outputs: list[str]):
    """Return a direct-call test double and helpers for inspecting normalized messages."""
    if lm_kind == "current_lm":
        patcher = mock.patch(
            "dspy.clients.lm.litellm_completion",
            side_effect=[_model_response(output) for output in outputs],
        )
        completion = patcher.start()
        lm = dspy.LM("custom-model", cache=False)

        def get_messages(index: int) -> list[dict[str, object]]:
            return completion.call_args_list[index].kwargs["request"]["messages"]

        def get_request(index: int):
            return None

        return lm, get_messages, get_request, patcher

    if lm_kind == "typed_lm":
        lm = _TypedContractLM("custom-model", outputs=outputs)

        def get_messages(index: int) -> list[dict[str, object]]:
            from dspy.clients.openai_format import to_openai_chat_request

            return to_openai_chat_request(lm.requests[index])["messages"]

        def get_request(index: int):
            return lm.requests[index]

        return lm, get_messages, get_request, None

    raise ValueError(f"Unknown lm_kind: {lm_kind}")


def dspy_test_base_lm_tracks_usage_for_custom_subclasses():
    class CustomLM(dspy.BaseLM):
        def forward(self, prompt=None, messages=None, **kwargs):
            return ModelResponse(
                choices=[Choices(message=Message(role="assistant", content="Hi!"))],
                usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                model="custom-model",
            )

    lm = CustomLM(model="custom-model")

    with track_usage() as usage_tracker:
        lm("Query")

    total_usage = usage_tracker.get_total_tokens()["custom-model"]
    assert total_usage["prompt_tokens"] == 1
    assert total_usage["completion_tokens"] == 1
    assert total_usage["total_tokens"] == 2


def dspy_test_base_lm_copy_is_shallow_runtime_copy_with_isolated_dspy_state():
    class CustomLM(dspy.BaseLM):
        pass

    callback = object()
    client = object()
    lm = CustomLM(model="custom-model", callbacks=[callback], temperature=0.1)
    lm.client = client
    lm.extra_state = {"mutable": []}
    lm.history = [{"prompt": "original"}]

    copied_lm = lm.copy(temperature=0.2, rollout_id=1)

    assert copied_lm is not lm
    assert copied_lm.client is client
    assert copied_lm.extra_state is lm.extra_state
    assert copied_lm.history == []
    assert copied_lm.history is not lm.history
    assert copied_lm.callbacks == [callback]
    assert copied_lm.callbacks is not lm.callbacks
    assert copied_lm.kwargs == {"temperature": 0.2, "max_tokens": None, "rollout_id": 1}
    assert lm.kwargs == {"temperature": 0.1, "max_tokens": None}


def dspy_test_dump_state():
    lm = dspy.LM(
        model="openai/gpt-4o-mini",
        model_type="chat",
        temperature=1,
        max_tokens=100,
        num_retries=10,
        launch_kwargs={"temperature": 1},
        train_kwargs={"temperature": 5},
    )

    assert lm.dump_state() == {
        "_dspy_lm_class": "dspy.clients.lm.LM",
        "model": "openai/gpt-4o-mini",
        "model_type": "chat",
        "temperature": 1,
        "max_tokens": 100,
        "num_retries": 10,
        "cache": True,
        "finetuning_model": None,
        "launch_kwargs": {"temperature": 1},
        "train_kwargs": {"temperature": 5},
    }


def dspy_test_reasoning_model_dump_state_uses_constructor_max_tokens():
    lm = dspy.LM(
        model="openai/gpt-5-nano",
        temperature=1.0,
        max_tokens=16_000,
        cache=False,
        num_retries=1,
    )

    state = lm.dump_state()

    assert lm.kwargs["max_completion_tokens"] == 16_000
    assert "max_completion_tokens" not in state
    assert state["max_tokens"] == 16_000


def dspy_test_dump_state_preserves_enabled_developer_role():
    lm = dspy.LM("openai/gpt-4o-mini", use_developer_role=True)

    assert lm.dump_state()["use_developer_role"] is True
    assert dspy.LM.load_state(lm.dump_state()).use_developer_role is True


def dspy_test_dump_state_ignores_internal_class_marker_kwarg():
    lm = dspy.LM(
        model="openai/gpt-4o-mini",
        **{"_dspy_lm_class": "malicious.module.LM"},
    )

    dumped_state = lm.dump_state()

    assert dumped_state["_dspy_lm_class"] == "dspy.clients.lm.LM"
    assert lm.kwargs["_dspy_lm_class"] == "malicious.module.LM"


def dspy_test_load_state():
    lm = dspy.LM(
        model="openai/gpt-4o-mini",
        model_type="chat",
        temperature=1,
        max_tokens=100,
        num_retries=10,
        launch_kwargs={"temperature": 1},
        train_kwargs={"temperature": 5},
    )

    loaded_lm = dspy.LM.load_state(lm.dump_state())

    assert isinstance(loaded_lm, dspy.LM)
    assert loaded_lm.dump_state() == lm.dump_state()


def dspy_test_reasoning_model_load_state_round_trips_canonical_state():
    lm = dspy.LM(
        model="openai/gpt-5-nano",
        temperature=1.0,
        max_tokens=16_000,
        cache=False,
        num_retries=1,
    )

    loaded_lm = dspy.BaseLM.load_state(lm.dump_state())

    assert isinstance(loaded_lm, dspy.LM)
    assert loaded_lm.kwargs["max_completion_tokens"] == 16_000
    assert loaded_lm.dump_state() == lm.dump_state()


def dspy_test_reasoning_model_load_state_accepts_max_completion_tokens_alias():
    state = {
        "_dspy_lm_class": "dspy.clients.lm.LM",
        "model": "openai/gpt-5-nano",
        "model_type": "chat",
        "cache": False,
        "num_retries": 1,
        "temperature": 1.0,
        "max_completion_tokens": 16_000,
        "finetuning_model": None,
        "launch_kwargs": {},
        "train_kwargs": {},
    }

    loaded_lm = dspy.BaseLM.load_state(state)

    assert isinstance(loaded_lm, dspy.LM)
    assert loaded_lm.kwargs["max_completion_tokens"] == 16_000
    assert "max_completion_tokens" not in loaded_lm.dump_state()
    assert loaded_lm.dump_state()["max_tokens"] == 16_000


def dspy_test_lm_load_state_forwards_allow_custom_lm_class(monkeypatch):
    calls = []
    original_load_state = dspy.BaseLM.load_state.__func__

    def spy_load_state(cls, state, *, allow_custom_lm_class=False):
        calls.append(allow_custom_lm_class)
        return original_load_state(cls, state, allow_custom_lm_class=allow_custom_lm_class)

    monkeypatch.setattr(dspy.BaseLM, "load_state", classmethod(spy_load_state))

    dspy.LM.load_state(dspy.LM("openai/gpt-4o-mini").dump_state(), allow_custom_lm_class=True)

    assert calls == [True]


def dspy_test_lm_replaces_system_with_developer_role():
    with mock.patch("dspy.clients.lm.litellm_responses_completion", return_value={"choices": []}) as mock_completion:
        lm = dspy.LM(
            "openai/gpt-4o-mini",
            cache=False,
            model_type="responses",
            use_developer_role=True,
        )
        lm.forward(messages=[{"role": "system", "content": "hi"}])
        assert mock_completion.call_args.kwargs["request"]["messages"][0]["role"] == "developer"


def dspy_test_api_key_not_saved_in_json():
    lm = dspy.LM(
        model="openai/gpt-4o-mini",
        model_type="chat",
        temperature=1.0,
        max_tokens=100,
        api_key="sk-test-api-key-12345",
    )

    predict = dspy.Predict("question -> answer")
    predict.lm = lm

    with tempfile.TemporaryDirectory() as tmpdir:
        json_path = Path(tmpdir) / "program.json"
        predict.save(json_path)

        with open(json_path) as f:
            saved_state = json.load(f)

        # Verify API key is not in the saved state
        assert "api_key" not in saved_state.get("lm", {}), "API key should not be saved in JSON"

        # Verify other attributes are saved
        assert saved_state["lm"]["model"] == "openai/gpt-4o-mini"
        assert saved_state["lm"]["temperature"] == 1.0
        assert saved_state["lm"]["max_tokens"] == 100


def dspy_test_responses_api_converts_images_correctly():
    from dspy.clients.lm import _convert_chat_request_to_responses_request

    # Test with base64 image
    request_with_base64_image = {
        "model": "openai/gpt-5-mini",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What's in this image?"},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
                        },
                    },
                ],
            }
        ],
    }

    result = _convert_chat_request_to_responses_request(request_with_base64_image)

    assert "input" in result
    assert len(result["input"]) == 1
    assert result["input"][0]["role"] == "user"

    content = result["input"][0]["content"]
    assert len(content) == 2

    # First item should be text converted to input_text format
    assert content[0]["type"] == "input_text"
    assert content[0]["text"] == "What's in this image?"

    # Second item should be converted to input_image format
    assert content[1]["type"] == "input_image"
    assert (
        content[1]["image_url"]
        == "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )

    # Test with URL image
    request_with_url_image = {
        "model": "openai/gpt-5-mini",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/image.jpg"}}]}
        ],
    }

    result = _convert_chat_request_to_responses_request(request_with_url_image)

    content = result["input"][0]["content"]
    assert len(content) == 1
    assert content[0]["type"] == "input_image"
    assert content[0]["image_url"] == "https://example.com/image.jpg"


def dspy_test_responses_api_converts_files_correctly():
    from dspy.clients.lm import _convert_chat_request_to_responses_request

    # Test with file data (base64 encoded)
    request_with_file = {
        "model": "openai/gpt-5-mini",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Analyze this file"},
                    {
                        "type": "file",
                        "file": {
                            "file_data": "data:text/plain;base64,SGVsbG8gV29ybGQ=",
                            "filename": "test.txt",
                        },
                    },
                ],
            }
        ],
    }

    result = _convert_chat_request_to_responses_request(request_with_file)

    assert "input" in result
    assert len(result["input"]) == 1
    assert result["input"][0]["role"] == "user"

    content = result["input"][0]["content"]
    assert len(content) == 2

    # First item should be text converted to input_text format
    assert content[0]["type"] == "input_text"
    assert content[0]["text"] == "Analyze this file"

    # Second item should be converted to input_file format
    assert content[1]["type"] == "input_file"
    assert content[1]["file_data"] == "data:text/plain;base64,SGVsbG8gV29ybGQ="
    assert content[1]["filename"] == "test.txt"

    # Test with file_id
    request_with_file_id = {
        "model": "openai/gpt-5-mini",
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "file",
                        "file": {
                            "file_id": "file-abc123",
                            "filename": "document.pdf",
                        },
                    }
                ],
            }
        ],
    }

    result = _convert_chat_request_to_responses_request(request_with_file_id)

    content = result["input"][0]["content"]
    assert len(content) == 1
    assert content[0]["type"] == "input_file"
    assert content[0]["file_id"] == "file-abc123"
    assert content[0]["filename"] == "document.pdf"

    # Test with all file fields
    request_with_all_fields = {
        "model": "openai/gpt-5-mini",
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "file",
                        "file": {
                            "file_data": "data:application/pdf;base64,JVBERi0xLjQ=",
                            "file_id": "file-xyz789",
                            "filename": "report.pdf",
                        },
                    }
                ],
            }
        ],
    }

    result = _convert_chat_request_to_responses_request(request_with_all_fields)

    content = result["input"][0]["content"]
    assert content[0]["type"] == "input_file"
    assert content[0]["file_data"] == "data:application/pdf;base64,JVBERi0xLjQ="
    assert content[0]["file_id"] == "file-xyz789"
    assert content[0]["filename"] == "report.pdf"


def dspy_test_responses_api_preserves_multi_message_structure():
    from dspy.clients.lm import _convert_chat_request_to_responses_request

    request = {
        "model": "openai/gpt-5-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": [{"type": "text", "text": "6"}]},
            {"role": "user", "content": "And 4+4?"},
        ],
    }

    result = _convert_chat_request_to_responses_request(request)

    assert "input" in result
    assert len(result["input"]) == 6

    assert result["input"][0]["role"] == "system"
    assert result["input"][0]["content"] == [{"type": "input_text", "text": "You are a helpful assistant."}]

    assert result["input"][1]["role"] == "user"
    assert result["input"][1]["content"] == [{"type": "input_text", "text": "What is 2+2?"}]

    # Assistant history replays model output, which the Responses API types as
    # "output_text"; "input_text" on an assistant item is rejected with a 400.
    assert result["input"][2]["role"] == "assistant"
    assert result["input"][2]["content"] == [{"type": "output_text", "text": "4"}]

    assert result["input"][3]["role"] == "user"
    assert result["input"][3]["content"] == [{"type": "input_text", "text": "And 3+3?"}]
    assert result["input"][4]["role"] == "assistant"
    assert result["input"][4]["content"] == [{"type": "output_text", "text": "6"}]
    assert result["input"][5]["role"] == "user"
    assert result["input"][5]["content"] == [{"type": "input_text", "text": "And 4+4?"}]


async def dspy_test_streaming_passes_headers_correctly():
    from dspy.clients.lm import _get_stream_completion_fn

    custom_headers = {"Authorization": "Bearer my-custom-token"}
    request = {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "test"}],
    }

    mock_stream = mock.AsyncMock()
    mock_stream.send = mock.AsyncMock()

    async def empty_async_generator():
        return
        yield  # Make it a generator

    with mock.patch("dspy.settings") as mock_settings:
        mock_settings.send_stream = mock_stream
        mock_settings.caller_predict = None
        mock_settings.track_usage = False

        with mock.patch("litellm.acompletion") as mock_acompletion:
            mock_acompletion.return_value = empty_async_generator()

            stream_fn = _get_stream_completion_fn(request, {}, sync=False, headers=custom_headers)
            assert stream_fn is not None

            with mock.patch("litellm.stream_chunk_builder", return_value={}):
                await stream_fn()

            # Verify headers were passed to litellm.acompletion
            mock_acompletion.assert_called_once()
            call_kwargs = mock_acompletion.call_args.kwargs
            assert call_kwargs["headers"]["Authorization"] == "Bearer my-custom-token"


# ---------------------------------------------------------------------------
# Responses API request contract: the shapes DSPy must emit for tools,
# tool_choice, messages, and config on model_type="responses".
# ---------------------------------------------------------------------------


def _chat_shaped_weather_tool():
    return {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get weather.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }


def _responses_text_response():
    return make_response(
        [
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "OK", "annotations": []}],
                "id": "msg_1",
                "status": "completed",
            }
        ]
    )


class ContractSchema(pydantic.BaseModel):
    answer: str


def dspy_test_lm_responses_passes_hosted_tools_through_unchanged():
    response = _responses_text_response()
    hosted_tool = {"type": "web_search", "search_context_size": "low"}
    flat_tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    }

    with mock.patch("litellm.responses", autospec=True, return_value=response) as responses:
        lm = dspy.LM("openai/dspy-test-model", model_type="responses", cache=False)
        lm("What is in the news?", tools=[hosted_tool, _chat_shaped_weather_tool(), flat_tool])

    sent_tools = responses.call_args.kwargs["tools"]
    assert sent_tools[0] == hosted_tool
    assert sent_tools[1]["name"] == "get_weather"
    assert sent_tools[2] == flat_tool


def dspy_test_lm_responses_passes_native_tool_choice_shapes_through():
    response = _responses_text_response()
    for native_choice in (
        {"type": "function", "name": "get_weather"},
        {"type": "web_search_preview"},
        {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_weather"}]},
    ):
        with mock.patch("litellm.responses", autospec=True, return_value=response) as responses:
            lm = dspy.LM("openai/dspy-test-model", model_type="responses", cache=False)
            lm("What is the weather?", tools=[_chat_shaped_weather_tool()], tool_choice=native_choice)

        assert responses.call_args.kwargs["tool_choice"] == native_choice


def dspy_test_lm_responses_tolerates_native_content_and_sdk_message_dumps():
    response = _responses_text_response()

    with mock.patch("litellm.responses", autospec=True, return_value=response) as responses:
        lm = dspy.LM("openai/dspy-test-model", model_type="responses", cache=False)
        lm(
            messages=[
                {"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]},
                # An assistant message dict dumped from an OpenAI SDK response.
                {"role": "assistant", "content": "hi", "refusal": None, "annotations": [], "function_call": None},
                {"role": "user", "content": [{"type": "output_text", "text": "Again."}]},
                {
                    "id": "msg_1",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "hello", "annotations": []}],
                },
            ]
        )

    sent = responses.call_args.kwargs["input"]
    assert sent[0]["content"] == [{"type": "input_text", "text": "Say hi."}]
    assert sent[1] == {"role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}
    assert sent[2]["content"] == [{"type": "input_text", "text": "Again."}]
    assert sent[3] == {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]}


def dspy_test_lm_responses_explicit_reasoning_wins_over_constructor_effort():
    response = _responses_text_response()

    with mock.patch("litellm.responses", autospec=True, return_value=response) as responses:
        lm = dspy.LM("openai/dspy-test-model", model_type="responses", cache=False, reasoning_effort="low")
        lm("Say hi.", reasoning={"effort": "high"})

    sent = responses.call_args.kwargs
    assert sent["reasoning"] == {"effort": "high"}
    assert "reasoning_effort" not in sent


def dspy_test_lm_responses_forwards_raw_base64_file_data_verbatim():
    response = _responses_text_response()
    raw_base64 = "JVBERi0xLjQK"

    with mock.patch("litellm.responses", autospec=True, return_value=response) as responses:
        lm = dspy.LM("openai/dspy-test-model", model_type="responses", cache=False)
        lm(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Read this."},
                        {"type": "file", "file": {"file_data": raw_base64, "filename": "doc.pdf"}},
                    ],
                }
            ]
        )

    file_item = responses.call_args.kwargs["input"][0]["content"][1]
    assert file_item["type"] == "input_file"
    assert file_item["file_data"] == raw_base64


pytestmark = DSPY_TEST_WARNINGS

# -- the cases: DSPy's test functions as programs, in-process and through a session --


SYNC_TESTS = [dspy_test_disabled_cache_skips_cache_key, dspy_test_lm_wraps_litellm_context_window_error,
    dspy_test_lm_wraps_unknown_boundary_error_as_unexpected_error, dspy_test_reasoning_model_token_parameter,
    dspy_test_reasoning_model_requirements, dspy_test_gpt_5_chat_not_reasoning_model,
    dspy_test_base_lm_init_uses_lm_defaults_and_isolates_callback_list,
    dspy_test_base_lm_default_call_keeps_legacy_outputs, dspy_test_base_lm_tracks_usage_for_custom_subclasses,
    dspy_test_base_lm_copy_is_shallow_runtime_copy_with_isolated_dspy_state, dspy_test_dump_state,
    dspy_test_reasoning_model_dump_state_uses_constructor_max_tokens,
    dspy_test_dump_state_preserves_enabled_developer_role, dspy_test_dump_state_ignores_internal_class_marker_kwarg,
    dspy_test_load_state, dspy_test_reasoning_model_load_state_round_trips_canonical_state,
    dspy_test_reasoning_model_load_state_accepts_max_completion_tokens_alias,
    dspy_test_lm_load_state_forwards_allow_custom_lm_class, dspy_test_lm_replaces_system_with_developer_role,
    dspy_test_api_key_not_saved_in_json, dspy_test_responses_api_converts_images_correctly,
    dspy_test_responses_api_converts_files_correctly, dspy_test_responses_api_preserves_multi_message_structure,
    dspy_test_lm_responses_passes_hosted_tools_through_unchanged,
    dspy_test_lm_responses_passes_native_tool_choice_shapes_through,
    dspy_test_lm_responses_tolerates_native_content_and_sdk_message_dumps,
    dspy_test_lm_responses_explicit_reasoning_wins_over_constructor_effort,
    dspy_test_lm_responses_forwards_raw_base64_file_data_verbatim]


@pytest.mark.parametrize(("dspy_test", "kwargs"), dspy_test_cases(SYNC_TESTS))
def test_lm_tests_of_dspy(run: Runner, dspy_test, kwargs, tmp_path) -> None:
    assert run.check(run_dspy_test, dspy_test, tmp_path, **kwargs) is None  # its asserts held where it ran


ASYNC_TESTS = [dspy_test_streaming_passes_headers_correctly]


@pytest.mark.parametrize(("dspy_test", "kwargs"), dspy_test_cases(ASYNC_TESTS))
def test_async_lm_tests_of_dspy(arun: AsyncRunner, dspy_test, kwargs, tmp_path) -> None:
    async def main(arun: AsyncRunner) -> None:
        return await arun(arun_dspy_test, dspy_test, tmp_path, **kwargs)

    assert arun.check(main) is None  # its asserts held where it ran
