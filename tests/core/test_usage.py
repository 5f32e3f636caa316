"""Reading token usage from provider responses: ``TokenUsage.from_response`` and streams.

Responses are built with the real ``openai`` and ``anthropic`` SDK classes
(validated pydantic construction, complete as the SDK returns them), and as
plain dicts for Google Gemini and LiteLLM. Every expected ``TokenUsage`` is
worked out by hand in the test.

Inputs tried:

- OpenAI Chat Completions: ``ChatCompletion`` with ``CompletionUsage`` whose
  ``prompt_tokens`` include ``prompt_tokens_details.cached_tokens`` (and
  ``completion_tokens_details.reasoning_tokens``, already in
  ``completion_tokens``); no ``prompt_tokens_details``; details with
  ``cached_tokens`` 0 or None; no ``usage`` at all. Stream: a
  ``ChatCompletionChunk`` with ``usage=None``; the final chunk with
  ``choices=[]`` carrying ``usage``; a whole stream (role, content, finish and
  usage chunks) through ``usage_from_stream`` and ``StreamUsage``. The same
  as ``model_dump()`` dicts and as hand-written dicts.
- OpenAI Responses: ``Response`` / ``ResponseUsage`` / ``InputTokensDetails`` /
  ``OutputTokensDetails`` (``input_tokens`` include ``cached_tokens``,
  ``output_tokens`` include reasoning); ``ResponseCompletedEvent`` alone and at
  the end of a stream of ``response.created`` / ``response.in_progress`` /
  ``response.output_text.delta`` events; the same as dicts.
- Anthropic Messages: ``Message`` / ``Usage`` with cache writes (and the
  ``CacheCreation`` breakdown) and cache reads; cache fields None; dicts.
  Stream: ``message_start`` (input, cache counts, output 1),
  ``content_block_start``, three ``content_block_delta``,
  ``content_block_stop``, ``message_delta`` (cumulative output) and
  ``message_stop``; a ``message_delta`` that also reports input and cache
  counts (newer API) and overrides ``message_start``; several deltas (the
  last one wins, they are not summed); a stream cut off after
  ``message_start``; ``from_response`` on a ``message_start`` event and on a
  ``message_delta`` event alone.
- Google Gemini dicts (``usage_metadata``): cached part of
  ``prompt_token_count``, output = candidates + thoughts, missing thoughts /
  cached counts, an attribute-style object, a stream of running totals, an
  empty ``usage_metadata``.
- LiteLLM ``ModelResponse`` as an OpenAI-shaped dict, whole and streamed.
- No usage: None, ``{}``, a dict without ``usage``, ``{"usage": None}``, an
  ``object()``, a namespace without ``usage``, a string, a ``ChatCompletion``
  without usage, Anthropic ``content_block_delta`` / ``message_stop`` events,
  a ``response.created`` event, an empty stream.
- Malformed usage (``InvalidInput`` naming the field): -1, 1.5, "10", True,
  False-as-count, 10**11, 10**10 + 1, NaN, inf, -1.0, a Decimal, a list, None
  for a required count, cached tokens > prompt tokens (OpenAI chat, Responses,
  Gemini), a missing ``completion_tokens``, an empty usage dict, a usage
  dict of unknown keys, bad nested ``cached_tokens``, bad Anthropic cache
  fields, bad Gemini counts, SDK objects built with ``model_construct``
  around bad counts, bad counts inside Anthropic stream events.
  Accepted: 10.0 (read as the int 10), 0 and 10**10 (the bounds).
- ``TokenUsage`` itself: defaults, -1, 1.5, 10.0, "10", True, False, None,
  10**10 + 1 on each field; 10**10 accepted; ``prompt_total``, ``total``,
  ``+`` (and ``+`` with a non-``TokenUsage``, a sum over the limit), frozen,
  keyword-only, ``from_response`` of a ``TokenUsage``.
- Hypothesis: random counts (cached <= prompt, up to 10**10) through OpenAI
  chat dicts and SDK objects; OpenAI chunk streams of random length where
  only the last chunk carries usage; Anthropic streams with random cumulative
  output counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from anthropic.types import (
    CacheCreation,
    Message,
    MessageDeltaUsage,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    TextDelta,
    Usage,
)
from anthropic.types.raw_message_delta_event import Delta as AnthropicDelta
from hypothesis import example, given
from hypothesis import strategies as st
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseUsage,
)
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from creditmeter import InvalidInput, StreamUsage, TokenUsage, usage_from_stream
from creditmeter.usage import MAX_TOKENS, _chat_completion_usage, _read_any, _read_response

# --- builders of SDK objects --------------------------------------------------------


def openai_usage(
    prompt: int,
    completion: int,
    *,
    cached: int | None = None,
    reasoning: int | None = None,
    with_details: bool = True,
) -> CompletionUsage:
    """A ``CompletionUsage`` as the Chat Completions API returns it."""
    return CompletionUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=(
            PromptTokensDetails(audio_tokens=0, cached_tokens=cached) if with_details else None
        ),
        completion_tokens_details=(
            CompletionTokensDetails(
                reasoning_tokens=reasoning or 0,
                audio_tokens=0,
                accepted_prediction_tokens=0,
                rejected_prediction_tokens=0,
            )
            if with_details
            else None
        ),
    )


def chat_completion(usage: CompletionUsage | None) -> ChatCompletion:
    return ChatCompletion(
        id="chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        object="chat.completion",
        created=1741570283,
        model="gpt-4o-2024-08-06",
        choices=[
            Choice(
                index=0,
                message=ChatCompletionMessage(
                    role="assistant", content="Hello! How can I help?", refusal=None
                ),
                logprobs=None,
                finish_reason="stop",
            )
        ],
        usage=usage,
        service_tier="default",
        system_fingerprint="fp_fc9f1d7035",
    )


def chat_chunk(
    *,
    content: str | None = None,
    role: Any = None,
    finish_reason: Any = None,
    usage: CompletionUsage | None = None,
    final: bool = False,
) -> ChatCompletionChunk:
    """One chunk of a streamed chat completion; ``final`` is the usage chunk (no choices)."""
    choices = (
        []
        if final
        else [
            ChunkChoice(
                index=0,
                delta=ChoiceDelta(role=role, content=content),
                logprobs=None,
                finish_reason=finish_reason,
            )
        ]
    )
    return ChatCompletionChunk(
        id="chatcmpl-123",
        object="chat.completion.chunk",
        created=1694268190,
        model="gpt-4o-mini",
        system_fingerprint="fp_44709d6fcb",
        choices=choices,
        usage=usage,
    )


def chat_stream(usage: CompletionUsage, *, words: int = 3) -> list[ChatCompletionChunk]:
    """A whole stream with ``stream_options={"include_usage": True}``."""
    chunks = [chat_chunk(role="assistant", content="")]
    chunks += [chat_chunk(content=f"word{i} ") for i in range(words)]
    chunks.append(chat_chunk(finish_reason="stop"))
    chunks.append(chat_chunk(usage=usage, final=True))
    return chunks


def responses_usage(
    input_tokens: int, output_tokens: int, *, cached: int = 0, reasoning: int = 0
) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=input_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached, cache_write_tokens=0),
        output_tokens=output_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning),
        total_tokens=input_tokens + output_tokens,
    )


def response(usage: ResponseUsage | None, *, status: Any = "completed") -> Response:
    output: list[Any] = (
        [
            ResponseOutputMessage(
                id="msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
                type="message",
                role="assistant",
                status="completed",
                content=[ResponseOutputText(type="output_text", text="Hi there.", annotations=[])],
            )
        ]
        if status == "completed"
        else []
    )
    return Response(
        id="resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
        object="response",
        created_at=1741476777.0,
        status=status,
        model="gpt-4o-2024-08-06",
        output=output,
        parallel_tool_calls=True,
        tool_choice="auto",
        tools=[],
        temperature=1.0,
        top_p=1.0,
        truncation="disabled",
        usage=usage,
    )


def anthropic_usage(
    input_tokens: int,
    output_tokens: int,
    *,
    cache_write: int | None = None,
    cache_read: int | None = None,
) -> Usage:
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_creation_input_tokens=cache_write,
        cache_read_input_tokens=cache_read,
        cache_creation=(
            CacheCreation(ephemeral_5m_input_tokens=cache_write, ephemeral_1h_input_tokens=0)
            if cache_write is not None
            else None
        ),
        service_tier="standard",
    )


def anthropic_message(usage: Usage, *, streaming_start: bool = False) -> Message:
    return Message(
        id="msg_013Zva2CMHLNnXjNJJKqJ2EF",
        type="message",
        role="assistant",
        model="claude-sonnet-4-5-20250929",
        content=[] if streaming_start else [TextBlock(type="text", text="Hi! My name is Claude.")],
        stop_reason=None if streaming_start else "end_turn",
        stop_sequence=None,
        usage=usage,
    )


def message_start(usage: Usage) -> RawMessageStartEvent:
    return RawMessageStartEvent(
        type="message_start", message=anthropic_message(usage, streaming_start=True)
    )


def content_block_delta(text: str) -> RawContentBlockDeltaEvent:
    return RawContentBlockDeltaEvent(
        type="content_block_delta", index=0, delta=TextDelta(type="text_delta", text=text)
    )


def message_delta(output_tokens: int, **counts: Any) -> RawMessageDeltaEvent:
    return RawMessageDeltaEvent(
        type="message_delta",
        delta=AnthropicDelta(stop_reason="end_turn", stop_sequence=None),
        usage=MessageDeltaUsage(output_tokens=output_tokens, **counts),
    )


def anthropic_stream(start: Usage, *deltas: RawMessageDeltaEvent) -> list[Any]:
    """message_start, a text block of three deltas, the given message_deltas, message_stop."""
    return [
        message_start(start),
        RawContentBlockStartEvent(
            type="content_block_start", index=0, content_block=TextBlock(type="text", text="")
        ),
        content_block_delta("Hello"),
        content_block_delta(", "),
        content_block_delta("world"),
        RawContentBlockStopEvent(type="content_block_stop", index=0),
        *deltas,
        RawMessageStopEvent(type="message_stop"),
    ]


def gemini_response(**metadata: Any) -> dict[str, Any]:
    """A Gemini ``GenerateContentResponse`` as a dict (snake_case, as the SDK dumps it)."""
    return {
        "candidates": [
            {
                "content": {"parts": [{"text": "Hello."}], "role": "model"},
                "finish_reason": "STOP",
                "index": 0,
            }
        ],
        "model_version": "gemini-2.5-pro",
        "response_id": "abc123",
        "usage_metadata": metadata,
    }


def litellm_response(usage: dict[str, Any] | None) -> dict[str, Any]:
    """A LiteLLM ``ModelResponse`` as a dict (OpenAI shape)."""
    result: dict[str, Any] = {
        "id": "chatcmpl-565d891b-a42e-4c39-8d14-82a1f5208885",
        "created": 1734366691,
        "model": "claude-3-5-sonnet-20241022",
        "object": "chat.completion",
        "system_fingerprint": None,
        "choices": [
            {
                "finish_reason": "stop",
                "index": 0,
                "message": {"content": "Hello!", "role": "assistant", "tool_calls": None},
            }
        ],
    }
    if usage is not None:
        result["usage"] = usage
    return result


# --- OpenAI Chat Completions --------------------------------------------------------


def test_openai_chat_cached_tokens_go_to_cache_read_and_the_rest_to_input() -> None:
    # 2006 prompt tokens, of which 1920 cached; 300 completion tokens incl. 192 reasoning.
    completion = chat_completion(openai_usage(2006, 300, cached=1920, reasoning=192))
    assert TokenUsage.from_response(completion) == TokenUsage(
        input=86, output=300, cache_write=0, cache_read=1920
    )


def test_openai_chat_without_prompt_tokens_details_reads_no_cache() -> None:
    completion = chat_completion(openai_usage(19, 10, with_details=False))
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is None
    assert TokenUsage.from_response(completion) == TokenUsage(input=19, output=10)


@pytest.mark.parametrize("cached", [0, None])
def test_openai_chat_details_with_zero_or_null_cached_tokens(cached: int | None) -> None:
    completion = chat_completion(openai_usage(57, 17, cached=cached))
    assert TokenUsage.from_response(completion) == TokenUsage(input=57, output=17)


def test_openai_chat_fully_cached_prompt() -> None:
    completion = chat_completion(openai_usage(1024, 1, cached=1024))
    assert TokenUsage.from_response(completion) == TokenUsage(input=0, output=1, cache_read=1024)


def test_openai_chat_usage_object_alone_is_read() -> None:
    assert TokenUsage.from_response(
        SimpleNamespace(usage=openai_usage(100, 5, cached=64))
    ) == TokenUsage(input=36, output=5, cache_read=64)


def test_openai_chat_completion_without_usage_reads_none() -> None:
    assert TokenUsage.from_response(chat_completion(None)) is None


def test_openai_streamed_chunk_without_usage_reads_none() -> None:
    chunk = chat_chunk(content="Hello")
    assert chunk.usage is None
    assert TokenUsage.from_response(chunk) is None


def test_openai_final_streamed_chunk_with_empty_choices_carries_usage() -> None:
    chunk = chat_chunk(usage=openai_usage(1200, 80, cached=1024), final=True)
    assert chunk.choices == []
    assert TokenUsage.from_response(chunk) == TokenUsage(input=176, output=80, cache_read=1024)


def test_openai_stream_usage_comes_from_the_final_chunk() -> None:
    chunks = chat_stream(openai_usage(1200, 80, cached=1024))
    expected = TokenUsage(input=176, output=80, cache_read=1024)
    assert usage_from_stream(chunks) == expected
    assert usage_from_stream(iter(chunks)) == expected  # any iterable, read once

    collector = StreamUsage()
    for chunk in chunks[:-1]:
        collector.add(chunk)
    assert collector.usage is None  # nothing reported before the usage chunk
    collector.add(chunks[-1])
    assert collector.usage == expected
    assert collector.chunks == len(chunks) == 6


def test_openai_stream_without_include_usage_reads_none() -> None:
    chunks = chat_stream(openai_usage(1, 1))[:-1]  # no final usage chunk
    assert usage_from_stream(chunks) is None


def test_openai_chat_completion_as_model_dump_dict() -> None:
    completion = chat_completion(openai_usage(2006, 300, cached=1920, reasoning=192))
    expected = TokenUsage(input=86, output=300, cache_read=1920)
    assert TokenUsage.from_response(completion.model_dump()) == expected
    assert TokenUsage.from_response(completion.model_dump(mode="json")) == expected
    no_details = chat_completion(openai_usage(19, 10, with_details=False)).model_dump()
    assert no_details["usage"]["prompt_tokens_details"] is None
    assert TokenUsage.from_response(no_details) == TokenUsage(input=19, output=10)


def test_openai_chat_completion_as_hand_written_dicts() -> None:
    cached = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [],
        "usage": {
            "prompt_tokens": 2006,
            "completion_tokens": 300,
            "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 192},
        },
    }
    assert TokenUsage.from_response(cached) == TokenUsage(input=86, output=300, cache_read=1920)
    bare = {"usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}}
    assert TokenUsage.from_response(bare) == TokenUsage(input=19, output=10)
    assert TokenUsage.from_response({"usage": None}) is None


def test_openai_stream_as_dicts() -> None:
    chunks = [c.model_dump() for c in chat_stream(openai_usage(300, 40, cached=128))]
    assert chunks[0]["usage"] is None
    assert TokenUsage.from_response(chunks[0]) is None
    assert usage_from_stream(chunks) == TokenUsage(input=172, output=40, cache_read=128)


# --- OpenAI Responses ---------------------------------------------------------------


def test_openai_responses_cached_input_and_output_with_reasoning() -> None:
    # 1200 input tokens incl. 1024 cached; 500 output tokens incl. 320 reasoning.
    resp = response(responses_usage(1200, 500, cached=1024, reasoning=320))
    assert TokenUsage.from_response(resp) == TokenUsage(
        input=176, output=500, cache_write=0, cache_read=1024
    )


def test_openai_responses_without_cache() -> None:
    resp = response(responses_usage(36, 87))
    assert TokenUsage.from_response(resp) == TokenUsage(input=36, output=87)


def test_openai_responses_without_usage_reads_none() -> None:
    assert TokenUsage.from_response(response(None, status="in_progress")) is None


def test_openai_responses_completed_event() -> None:
    event = ResponseCompletedEvent(
        type="response.completed",
        sequence_number=7,
        response=response(responses_usage(1200, 500, cached=1024, reasoning=320)),
    )
    assert TokenUsage.from_response(event) == TokenUsage(input=176, output=500, cache_read=1024)
    assert TokenUsage.from_response(event.model_dump()) == TokenUsage(
        input=176, output=500, cache_read=1024
    )


def test_openai_responses_stream_reads_the_completed_event() -> None:
    in_progress = response(None, status="in_progress")
    events: list[Any] = [
        ResponseCreatedEvent(type="response.created", sequence_number=0, response=in_progress),
        ResponseInProgressEvent(
            type="response.in_progress", sequence_number=1, response=in_progress
        ),
    ]
    events += [
        ResponseTextDeltaEvent(
            type="response.output_text.delta",
            sequence_number=2 + i,
            item_id="msg_1",
            output_index=0,
            content_index=0,
            delta=word,
            logprobs=[],
        )
        for i, word in enumerate(["Hi", " there", "."])
    ]
    events.append(
        ResponseCompletedEvent(
            type="response.completed",
            sequence_number=5,
            response=response(responses_usage(2000, 64, cached=1536)),
        )
    )
    assert TokenUsage.from_response(events[0]) is None
    expected = TokenUsage(input=464, output=64, cache_read=1536)
    assert usage_from_stream(events) == expected
    assert usage_from_stream(e.model_dump() for e in events) == expected
    collector = StreamUsage()
    for event in events:
        collector.add(event)
    assert collector.chunks == 6
    assert collector.usage == expected


def test_openai_responses_as_dict() -> None:
    resp = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "usage": {
            "input_tokens": 328,
            "input_tokens_details": {"cached_tokens": 256},
            "output_tokens": 52,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 380,
        },
    }
    assert TokenUsage.from_response(resp) == TokenUsage(input=72, output=52, cache_read=256)


# --- Anthropic Messages -------------------------------------------------------------


def test_anthropic_message_cache_fields_map_to_cache_write_and_read() -> None:
    # input_tokens excludes the cache: 50 uncached + 1200 written + 3000 read.
    message = anthropic_message(anthropic_usage(50, 400, cache_write=1200, cache_read=3000))
    usage = TokenUsage.from_response(message)
    assert usage == TokenUsage(input=50, output=400, cache_write=1200, cache_read=3000)
    assert usage is not None
    assert usage.prompt_total == 4250


def test_anthropic_message_with_null_cache_fields() -> None:
    message = anthropic_message(anthropic_usage(2095, 503))
    assert message.usage.cache_creation_input_tokens is None
    assert message.usage.cache_read_input_tokens is None
    assert TokenUsage.from_response(message) == TokenUsage(input=2095, output=503)


def test_anthropic_message_with_zero_cache_fields() -> None:
    message = anthropic_message(anthropic_usage(12, 6, cache_write=0, cache_read=0))
    assert TokenUsage.from_response(message) == TokenUsage(input=12, output=6)


def test_anthropic_message_as_dict() -> None:
    message = anthropic_message(anthropic_usage(50, 400, cache_write=1200, cache_read=3000))
    expected = TokenUsage(input=50, output=400, cache_write=1200, cache_read=3000)
    assert TokenUsage.from_response(message.model_dump()) == expected
    assert TokenUsage.from_response(
        {"type": "message", "usage": {"input_tokens": 9, "output_tokens": 3}}
    ) == TokenUsage(input=9, output=3)


def test_anthropic_stream_input_from_start_and_output_from_last_delta() -> None:
    events = [
        message_start(anthropic_usage(25, 1, cache_write=100, cache_read=2000)),
        content_block_delta("Hello"),
        content_block_delta(", "),
        content_block_delta("world"),
        message_delta(57),
    ]
    expected = TokenUsage(input=25, output=57, cache_write=100, cache_read=2000)
    assert usage_from_stream(events) == expected
    collector = StreamUsage()
    for event in events:
        collector.add(event)
    assert collector.chunks == 5
    assert collector.usage == expected


def test_anthropic_full_stream_counts_every_event() -> None:
    events = anthropic_stream(
        anthropic_usage(25, 1, cache_write=100, cache_read=2000), message_delta(57)
    )
    collector = StreamUsage()
    seen = []
    for event in events:
        collector.add(event)
        seen.append(collector.usage)
    assert collector.chunks == len(events) == 8
    # After message_start the input side is known and output is the provisional 1.
    assert seen[0] == TokenUsage(input=25, output=1, cache_write=100, cache_read=2000)
    assert collector.usage == TokenUsage(input=25, output=57, cache_write=100, cache_read=2000)
    assert usage_from_stream(e.model_dump() for e in events) == collector.usage


def test_anthropic_message_delta_with_input_counts_overrides_message_start() -> None:
    # Newer API: message_delta reports cumulative input and cache counts too.
    events = anthropic_stream(
        anthropic_usage(25, 1, cache_write=100, cache_read=2000),
        message_delta(
            57, input_tokens=30, cache_creation_input_tokens=0, cache_read_input_tokens=2100
        ),
    )
    assert usage_from_stream(events) == TokenUsage(
        input=30, output=57, cache_write=0, cache_read=2100
    )


def test_anthropic_message_delta_null_input_fields_keep_message_start_counts() -> None:
    delta = message_delta(57, input_tokens=None, cache_read_input_tokens=None)
    events = anthropic_stream(anthropic_usage(25, 1, cache_read=2000), delta)
    assert usage_from_stream(events) == TokenUsage(input=25, output=57, cache_read=2000)


def test_anthropic_cumulative_deltas_are_not_summed() -> None:
    events = anthropic_stream(anthropic_usage(10, 1), message_delta(20), message_delta(45))
    assert usage_from_stream(events) == TokenUsage(input=10, output=45)


def test_anthropic_stream_cut_off_after_message_start() -> None:
    events = [message_start(anthropic_usage(300, 1, cache_read=50)), content_block_delta("Hi")]
    assert usage_from_stream(events) == TokenUsage(input=300, output=1, cache_read=50)


def test_anthropic_message_start_event_read_by_from_response() -> None:
    event = message_start(anthropic_usage(25, 1, cache_write=100))
    assert TokenUsage.from_response(event) == TokenUsage(input=25, output=1, cache_write=100)


def test_anthropic_message_delta_event_alone_read_by_from_response() -> None:
    assert TokenUsage.from_response(message_delta(57)) == TokenUsage(output=57)


def test_anthropic_events_without_usage_read_none() -> None:
    assert TokenUsage.from_response(content_block_delta("Hi")) is None
    assert TokenUsage.from_response(RawMessageStopEvent(type="message_stop")) is None


# --- Google Gemini ------------------------------------------------------------------


def test_gemini_cached_prompt_and_thoughts() -> None:
    # 1500 prompt tokens incl. 1024 cached; output = 200 candidates + 300 thoughts.
    resp = gemini_response(
        prompt_token_count=1500,
        cached_content_token_count=1024,
        candidates_token_count=200,
        thoughts_token_count=300,
        total_token_count=2000,
    )
    assert TokenUsage.from_response(resp) == TokenUsage(
        input=476, output=500, cache_write=0, cache_read=1024
    )


def test_gemini_missing_thoughts_and_cached_counts_are_zero() -> None:
    resp = gemini_response(prompt_token_count=8, candidates_token_count=12, total_token_count=20)
    assert TokenUsage.from_response(resp) == TokenUsage(input=8, output=12)


def test_gemini_null_thoughts_count_is_zero() -> None:
    resp = gemini_response(
        prompt_token_count=8,
        cached_content_token_count=None,
        candidates_token_count=12,
        thoughts_token_count=None,
    )
    assert TokenUsage.from_response(resp) == TokenUsage(input=8, output=12)


def test_gemini_attribute_style_object() -> None:
    # google-genai returns pydantic objects; attribute access must work like dict access.
    metadata = SimpleNamespace(
        prompt_token_count=40,
        cached_content_token_count=32,
        candidates_token_count=5,
        thoughts_token_count=7,
    )
    resp = SimpleNamespace(candidates=[], usage_metadata=metadata)
    assert TokenUsage.from_response(resp) == TokenUsage(input=8, output=12, cache_read=32)


def test_gemini_stream_last_running_total_wins() -> None:
    chunks = [
        gemini_response(prompt_token_count=100, candidates_token_count=3),
        gemini_response(prompt_token_count=100, candidates_token_count=9),
        gemini_response(prompt_token_count=100, candidates_token_count=15, thoughts_token_count=40),
    ]
    assert usage_from_stream(chunks) == TokenUsage(input=100, output=55)


def test_gemini_response_without_usage_metadata_reads_none() -> None:
    resp = gemini_response()
    del resp["usage_metadata"]
    assert TokenUsage.from_response(resp) is None


def test_gemini_empty_usage_metadata_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="usage_metadata"):
        TokenUsage.from_response(gemini_response())


# --- LiteLLM ------------------------------------------------------------------------


def test_litellm_model_response_dict() -> None:
    resp = litellm_response(
        {
            "completion_tokens": 12,
            "prompt_tokens": 2048,
            "total_tokens": 2060,
            "completion_tokens_details": None,
            "prompt_tokens_details": {"audio_tokens": None, "cached_tokens": 2000},
        }
    )
    assert TokenUsage.from_response(resp) == TokenUsage(input=48, output=12, cache_read=2000)


def test_litellm_model_response_without_details() -> None:
    resp = litellm_response({"completion_tokens": 7, "prompt_tokens": 11, "total_tokens": 18})
    assert TokenUsage.from_response(resp) == TokenUsage(input=11, output=7)


def test_litellm_stream_dicts() -> None:
    chunks: list[dict[str, Any]] = [
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
        }
        for w in ("a", "b", "c")
    ]
    chunks.append(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {
                "prompt_tokens": 500,
                "completion_tokens": 3,
                "total_tokens": 503,
                "prompt_tokens_details": {"cached_tokens": 400},
            },
        }
    )
    assert usage_from_stream(chunks) == TokenUsage(input=100, output=3, cache_read=400)


def test_litellm_model_response_without_usage_reads_none() -> None:
    assert TokenUsage.from_response(litellm_response(None)) is None


# --- no usage at all ----------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        None,
        {},
        {"id": "chatcmpl-1", "choices": []},
        {"usage": None},
        {"usage": None, "usage_metadata": None},
        object(),
        SimpleNamespace(id="x", choices=[]),
        SimpleNamespace(usage=None),
        "usage",
        42,
        [],
    ],
    # A plain object's repr holds its address: the same id in every process (pytest-xdist
    # workers collect the tests apart, and their lists must match).
    ids=lambda obj: "object()" if type(obj) is object else repr(obj),
)
def test_objects_without_usage_read_none(obj: object) -> None:
    assert TokenUsage.from_response(obj) is None


def test_empty_stream_reads_none() -> None:
    assert usage_from_stream([]) is None
    collector = StreamUsage()
    assert collector.usage is None
    assert collector.chunks == 0


# --- malformed usage ----------------------------------------------------------------


def chat_usage(**overrides: Any) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
    usage.update(overrides)
    return {"usage": usage}


MALFORMED = [
    pytest.param(chat_usage(prompt_tokens=-1), "usage.prompt_tokens", id="negative"),
    pytest.param(chat_usage(completion_tokens=1.5), "usage.completion_tokens", id="1.5"),
    pytest.param(chat_usage(prompt_tokens="10"), "usage.prompt_tokens", id="str-10"),
    pytest.param(chat_usage(prompt_tokens=True), "usage.prompt_tokens", id="True"),
    pytest.param(chat_usage(completion_tokens=False), "usage.completion_tokens", id="False"),
    pytest.param(chat_usage(prompt_tokens=10**11), "usage.prompt_tokens", id="10**11"),
    pytest.param(chat_usage(prompt_tokens=MAX_TOKENS + 1), "usage.prompt_tokens", id="max+1"),
    pytest.param(chat_usage(prompt_tokens=math.nan), "usage.prompt_tokens", id="nan"),
    pytest.param(chat_usage(completion_tokens=math.inf), "usage.completion_tokens", id="inf"),
    pytest.param(chat_usage(completion_tokens=-1.0), "usage.completion_tokens", id="-1.0"),
    pytest.param(chat_usage(prompt_tokens=1e11), "usage.prompt_tokens", id="1e11"),
    pytest.param(chat_usage(prompt_tokens=Decimal(10)), "usage.prompt_tokens", id="Decimal"),
    pytest.param(chat_usage(prompt_tokens=[10]), "usage.prompt_tokens", id="list"),
    pytest.param(
        chat_usage(prompt_tokens_details={"cached_tokens": 101}),
        "usage.prompt_tokens",
        id="cached>prompt",
    ),
    pytest.param(
        chat_usage(prompt_tokens_details={"cached_tokens": -5}),
        "usage.prompt_tokens_details.cached_tokens",
        id="cached-negative",
    ),
    pytest.param(
        chat_usage(prompt_tokens_details={"cached_tokens": "5"}),
        "usage.prompt_tokens_details.cached_tokens",
        id="cached-str",
    ),
    pytest.param(
        {"usage": {"prompt_tokens": 100, "total_tokens": 100}},
        "usage.completion_tokens",
        id="missing-completion_tokens",
    ),
    pytest.param(
        {"usage": {"completion_tokens": 10}}, "usage.prompt_tokens", id="missing-prompt_tokens"
    ),
    pytest.param(
        chat_usage(completion_tokens=None), "usage.completion_tokens", id="null-completion"
    ),
    pytest.param({"usage": {}}, "usage", id="empty-usage"),
    pytest.param(
        {"usage": {"tokens_used": 10, "cost": 0.2}}, "tokens_used", id="unknown-keys-only"
    ),
    pytest.param(
        {
            "usage": {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 11},
                "output_tokens": 1,
            }
        },
        "usage.input_tokens",
        id="responses-cached>input",
    ),
    pytest.param(
        {
            "usage": {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 1.5},
                "output_tokens": 1,
            }
        },
        "usage.input_tokens_details.cached_tokens",
        id="responses-cached-1.5",
    ),
    pytest.param(
        {"usage": {"input_tokens": 10, "input_tokens_details": {}, "output_tokens": "1"}},
        "usage.output_tokens",
        id="responses-output-str",
    ),
    pytest.param(
        {"usage": {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": "5"}},
        "usage.cache_read_input_tokens",
        id="anthropic-cache-read-str",
    ),
    pytest.param(
        {"usage": {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": -1}},
        "usage.cache_creation_input_tokens",
        id="anthropic-cache-write-negative",
    ),
    pytest.param(
        {"usage": {"input_tokens": -3, "output_tokens": 1}},
        "usage.input_tokens",
        id="anthropic-input-negative",
    ),
    pytest.param(
        {"usage": {"input_tokens": 3}}, "usage.output_tokens", id="anthropic-missing-output"
    ),
    pytest.param(
        {"usage_metadata": {"prompt_token_count": 10, "cached_content_token_count": 11}},
        "usage_metadata.prompt_token_count",
        id="gemini-cached>prompt",
    ),
    pytest.param(
        {"usage_metadata": {"prompt_token_count": 10, "candidates_token_count": -1}},
        "usage_metadata.candidates_token_count",
        id="gemini-candidates-negative",
    ),
    pytest.param(
        {"usage_metadata": {"prompt_token_count": 10, "thoughts_token_count": 2.5}},
        "usage_metadata.thoughts_token_count",
        id="gemini-thoughts-2.5",
    ),
    pytest.param(
        {"usage_metadata": {"prompt_token_count": 10**11}},
        "usage_metadata.prompt_token_count",
        id="gemini-prompt-10**11",
    ),
]


@pytest.mark.parametrize(("response", "field"), MALFORMED)
def test_malformed_usage_raises_invalid_input_naming_the_field(
    response: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        TokenUsage.from_response(response)
    assert field in str(info.value)


@pytest.mark.parametrize(("response", "field"), MALFORMED)
def test_malformed_usage_in_a_stream_raises_invalid_input(
    response: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        usage_from_stream([{"choices": []}, response])
    assert field in str(info.value)


def test_malformed_usage_in_sdk_objects_built_without_validation() -> None:
    # The SDKs build responses with model_construct (no validation), so bad data reaches us.
    bad_prompt = ChatCompletion.model_construct(
        id="chatcmpl-1",
        object="chat.completion",
        created=0,
        model="gpt-4o",
        choices=[],
        usage=CompletionUsage.model_construct(
            prompt_tokens=-1, completion_tokens=1, total_tokens=0
        ),
    )
    with pytest.raises(InvalidInput, match=r"usage\.prompt_tokens"):
        TokenUsage.from_response(bad_prompt)

    bad_cache = Message.model_construct(
        id="msg_1",
        type="message",
        role="assistant",
        model="claude-sonnet-4-5",
        content=[],
        stop_reason="end_turn",
        stop_sequence=None,
        usage=Usage.model_construct(input_tokens=1, output_tokens=1, cache_read_input_tokens=0.5),
    )
    with pytest.raises(InvalidInput, match=r"usage\.cache_read_input_tokens"):
        TokenUsage.from_response(bad_cache)

    bad_responses = response(
        ResponseUsage.model_construct(
            input_tokens=10,
            input_tokens_details=InputTokensDetails.model_construct(
                cached_tokens=20, cache_write_tokens=0
            ),
            output_tokens=1,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
            total_tokens=11,
        )
    )
    with pytest.raises(InvalidInput, match=r"usage\.input_tokens"):
        TokenUsage.from_response(bad_responses)


def test_malformed_counts_in_anthropic_stream_events() -> None:
    start = message_start(Usage.model_construct(input_tokens="25", output_tokens=1))
    with pytest.raises(InvalidInput, match=r"message\.usage\.input_tokens"):
        usage_from_stream([start])
    delta = RawMessageDeltaEvent.model_construct(
        type="message_delta",
        delta=AnthropicDelta(stop_reason="end_turn"),
        usage=MessageDeltaUsage.model_construct(output_tokens=-4),
    )
    with pytest.raises(InvalidInput, match=r"usage\.output_tokens"):
        usage_from_stream([message_start(anthropic_usage(25, 1)), delta])


def test_whole_float_counts_are_accepted_as_ints_eg_10_0_reads_10() -> None:
    usage = TokenUsage.from_response(
        {
            "usage": {
                "prompt_tokens": 10.0,
                "completion_tokens": 5.0,
                "prompt_tokens_details": {"cached_tokens": 4.0},
            }
        }
    )
    assert usage == TokenUsage(input=6, output=5, cache_read=4)
    assert usage is not None
    assert all(type(n) is int for n in (usage.input, usage.output, usage.cache_read))


def test_count_bounds_zero_and_max_are_accepted() -> None:
    assert TokenUsage.from_response(chat_usage(prompt_tokens=0, completion_tokens=0)) == (
        TokenUsage()
    )
    assert TokenUsage.from_response(
        chat_usage(prompt_tokens=MAX_TOKENS, completion_tokens=MAX_TOKENS)
    ) == TokenUsage(input=MAX_TOKENS, output=MAX_TOKENS)


# --- TokenUsage itself --------------------------------------------------------------

FIELDS = ["input", "output", "cache_write", "cache_read"]


def test_token_usage_defaults_to_zero() -> None:
    usage = TokenUsage()
    assert (usage.input, usage.output, usage.cache_write, usage.cache_read) == (0, 0, 0, 0)
    assert usage.prompt_total == 0
    assert usage.total == 0


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(
    "value",
    [-1, 1.5, 10.0, "10", True, False, None, MAX_TOKENS + 1, 10**11, Decimal(1)],
    ids=repr,
)
def test_token_usage_rejects_bad_counts_naming_the_field(field: str, value: Any) -> None:
    # Unlike provider responses, TokenUsage itself takes ints only: 10.0 is refused here.
    with pytest.raises(InvalidInput, match=field):
        TokenUsage(**{field: value})


@pytest.mark.parametrize("field", FIELDS)
def test_token_usage_accepts_the_largest_count(field: str) -> None:
    assert getattr(TokenUsage(**{field: MAX_TOKENS}), field) == MAX_TOKENS


def test_token_usage_totals_and_addition() -> None:
    a = TokenUsage(input=100, output=20, cache_write=30, cache_read=400)
    b = TokenUsage(input=1, output=2, cache_write=3, cache_read=4)
    assert a.prompt_total == 530
    assert a.total == 550
    assert a + b == TokenUsage(input=101, output=22, cache_write=33, cache_read=404)
    assert (a + b).total == a.total + b.total
    assert a + TokenUsage() == a


def test_token_usage_addition_with_other_types_is_a_type_error() -> None:
    usage = TokenUsage(input=1)
    with pytest.raises(TypeError):
        _ = usage + 1  # type: ignore[operator]
    with pytest.raises(TypeError):
        _ = usage + {"input": 1}  # type: ignore[operator]


def test_token_usage_sum_over_the_limit_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="input"):
        _ = TokenUsage(input=MAX_TOKENS) + TokenUsage(input=1)


def test_token_usage_is_frozen_and_keyword_only() -> None:
    usage = TokenUsage(input=1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        usage.input = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        TokenUsage(1, 2)  # type: ignore[call-arg]


def test_from_response_of_a_token_usage_is_itself() -> None:
    usage = TokenUsage(input=5, output=6, cache_write=7, cache_read=8)
    assert TokenUsage.from_response(usage) is usage


# --- properties ---------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=MAX_TOKENS)


@st.composite
def prompt_and_cached(draw: st.DrawFn) -> tuple[int, int]:
    prompt = draw(counts)
    cached = draw(st.integers(min_value=0, max_value=prompt))
    return prompt, cached


@given(prompt_and_cached(), counts, st.booleans())
def test_openai_chat_dicts_round_trip(
    prompt_cached: tuple[int, int], completion: int, with_details: bool
) -> None:
    prompt, cached = prompt_cached
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if with_details:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    else:
        cached = 0
    expected = TokenUsage(input=prompt - cached, output=completion, cache_read=cached)
    assert TokenUsage.from_response({"usage": usage}) == expected
    assert TokenUsage.from_response({"usage": usage}).prompt_total == prompt  # type: ignore[union-attr]


@given(prompt_and_cached(), counts)
def test_openai_chat_sdk_objects_round_trip(
    prompt_cached: tuple[int, int], completion: int
) -> None:
    prompt, cached = prompt_cached
    completion_obj = chat_completion(openai_usage(prompt, completion, cached=cached))
    assert TokenUsage.from_response(completion_obj) == TokenUsage(
        input=prompt - cached, output=completion, cache_read=cached
    )


@given(prompt_and_cached(), counts, st.integers(min_value=0, max_value=20), st.booleans())
def test_openai_stream_reads_usage_from_the_last_chunk_only(
    prompt_cached: tuple[int, int], completion: int, words: int, as_dicts: bool
) -> None:
    prompt, cached = prompt_cached
    chunks: list[Any] = chat_stream(openai_usage(prompt, completion, cached=cached), words=words)
    if as_dicts:
        chunks = [c.model_dump() for c in chunks]

    def one_pass() -> Iterator[Any]:
        yield from chunks

    expected = TokenUsage(input=prompt - cached, output=completion, cache_read=cached)
    assert usage_from_stream(one_pass()) == expected
    collector = StreamUsage()
    for chunk in chunks:
        collector.add(chunk)
    assert collector.chunks == words + 3
    assert collector.usage == expected


@given(
    counts,
    counts,
    counts,
    st.lists(st.integers(min_value=1, max_value=MAX_TOKENS), min_size=1, max_size=5).map(sorted),
)
def test_anthropic_stream_output_is_the_last_cumulative_delta(
    input_tokens: int, cache_write: int, cache_read: int, outputs: list[int]
) -> None:
    events = anthropic_stream(
        anthropic_usage(input_tokens, 1, cache_write=cache_write, cache_read=cache_read),
        *(message_delta(n) for n in outputs),
    )
    assert usage_from_stream(events) == TokenUsage(
        input=input_tokens, output=outputs[-1], cache_write=cache_write, cache_read=cache_read
    )


def test_openai_cache_writes_are_part_of_the_prompt():
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 300, "cache_write_tokens": 200},
    }
    assert TokenUsage.from_response({"usage": usage}) == TokenUsage(
        input=500, output=10, cache_read=300, cache_write=200
    )


def test_gemini_rest_json_is_camel_case():
    body = {
        "usageMetadata": {
            "promptTokenCount": 120,
            "cachedContentTokenCount": 20,
            "candidatesTokenCount": 7,
            "thoughtsTokenCount": 3,
        }
    }
    assert TokenUsage.from_response(body) == TokenUsage(input=100, output=10, cache_read=20)


def test_mapping_classes_are_remembered_within_a_bound() -> None:
    """Reading responses of many classes keeps at most 256 of them in the cache of kinds."""
    from collections import UserDict  # noqa: PLC0415

    from creditmeter import usage as usage_module  # noqa: PLC0415

    for number in range(300):
        mapping_class = type(f"Usage{number}", (UserDict,), {})
        read = TokenUsage.from_response(
            mapping_class({"usage": {"prompt_tokens": number, "completion_tokens": 1}})
        )
        assert read == TokenUsage(input=number, output=1)
        assert len(usage_module._KINDS) <= usage_module._CLASSES_LIMIT


def test_counts_read_from_responses_build_the_same_usage() -> None:
    """The readers build TokenUsage without re-running its validators: the same record."""
    from creditmeter.usage import counted_usage  # noqa: PLC0415

    built = counted_usage(1000, 200, 30, 500)
    made = TokenUsage(input=1000, output=200, cache_write=30, cache_read=500)
    assert type(built) is TokenUsage  # not the subclass it was built as
    assert built == made
    assert hash(built) == hash(made)
    assert repr(built) == repr(made)
    assert built.prompt_total == 1530
    assert built + made == TokenUsage(input=2000, output=400, cache_write=60, cache_read=1000)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.input = 0  # type: ignore[misc]


# The ChatCompletion fast path must give what the general reader gives, or step aside.
# Tried: counts that are ints, None, floats (whole and not), bools, strings, negative and
# above 10**10; details absent, None, or with cached/cache-write counts exceeding the prompt;
# extra (undeclared) fields on the response and on the usage; a "type" field set.
_ODD_COUNTS = st.one_of(
    st.integers(min_value=-2, max_value=3),
    st.integers(min_value=10**10 - 1, max_value=10**10 + 1),
    st.none(),
    st.sampled_from([True, False, 2.0, 2.5, "3", float("nan")]),
)


def _outcome(read, response):
    try:
        return read(response)
    except InvalidInput as exc:
        return ("InvalidInput", str(exc))


@example(prompt=5, completion=1, details=(False, None), usage_extra=False, response_extra=None)
@example(prompt=5, completion=1, details=(3, 3), usage_extra=False, response_extra=None)
@example(prompt=5, completion=1, details=(2, None), usage_extra=False, response_extra=None)
@given(
    prompt=_ODD_COUNTS,
    completion=_ODD_COUNTS,
    details=st.one_of(st.none(), st.tuples(_ODD_COUNTS, _ODD_COUNTS)),
    usage_extra=st.booleans(),
    response_extra=st.sampled_from([None, "type", "other"]),
)
def test_chat_completion_fast_path_agrees_with_the_general_reader(
    prompt, completion, details, usage_extra, response_extra
):
    # openai's model_construct coerces some values: set the fields as a careless caller could.
    usage = CompletionUsage.model_construct(prompt_tokens=0, completion_tokens=0)
    usage.__dict__.update(prompt_tokens=prompt, completion_tokens=completion)
    if details is not None:
        holder = PromptTokensDetails.model_construct()
        holder.__dict__.update(cached_tokens=details[0], cache_write_tokens=details[1])
        usage.__dict__["prompt_tokens_details"] = holder
    if usage_extra:
        usage.__pydantic_extra__ = {"surprise": 1}
    response = ChatCompletion.model_construct(
        id="x", object="chat.completion", created=0, model="gpt-4o", choices=[], usage=usage
    )
    if response_extra is not None:
        response.__pydantic_extra__ = {response_extra: "message_delta"}
    fast = _chat_completion_usage(response)
    general = _outcome(_read_any, response)
    if fast is not None:
        assert fast == general
    assert _outcome(_read_response, response) == general


def test_chat_completion_fast_path_reads_a_real_response():
    response = ChatCompletion(
        id="x",
        object="chat.completion",
        created=0,
        model="gpt-4o",
        choices=[],
        usage=CompletionUsage(
            prompt_tokens=1500,
            completion_tokens=200,
            total_tokens=1700,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=500),
        ),
    )
    assert _chat_completion_usage(response) == TokenUsage(input=1000, output=200, cache_read=500)
    assert _read_any(response) == _chat_completion_usage(response)
