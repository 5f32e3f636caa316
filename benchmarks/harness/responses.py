"""Provider responses the scenarios meter: the openai SDK's own classes, built once."""

from __future__ import annotations

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails

from creditmeter import TokenUsage

#: What ``USAGE_OBJECT`` reads as: 1,000 uncached input, 500 cache-read and 200 output tokens.
USAGE = TokenUsage(input=1000, output=200, cache_read=500)
USAGE_OBJECT = CompletionUsage(
    prompt_tokens=1500,
    completion_tokens=200,
    total_tokens=1700,
    prompt_tokens_details=PromptTokensDetails(audio_tokens=0, cached_tokens=500),
    completion_tokens_details=CompletionTokensDetails(
        reasoning_tokens=0,
        audio_tokens=0,
        accepted_prediction_tokens=0,
        rejected_prediction_tokens=0,
    ),
)
RESPONSE = ChatCompletion(
    id="chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    object="chat.completion",
    created=1741570283,
    model="gpt-4o-mini-2024-07-18",
    choices=[
        Choice(
            index=0,
            message=ChatCompletionMessage(role="assistant", content="Hello! How can I help?"),
            logprobs=None,
            finish_reason="stop",
        )
    ],
    usage=USAGE_OBJECT,
    service_tier="default",
    system_fingerprint="fp_fc9f1d7035",
)
RESPONSE_DICT = RESPONSE.model_dump()


def _chunk(delta: ChoiceDelta | None = None, finish: str | None = None) -> ChatCompletionChunk:
    """One streamed chunk; one with no delta is the final usage chunk (no choices)."""
    choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]  # type: ignore[arg-type]
    return ChatCompletionChunk(
        id="chatcmpl-123",
        object="chat.completion.chunk",
        created=1694268190,
        model="gpt-4o-mini-2024-07-18",
        system_fingerprint="fp_44709d6fcb",
        choices=choices,
        usage=USAGE_OBJECT if delta is None else None,
    )


#: A stream with ``stream_options={"include_usage": True}``: role, 7 words, stop, usage.
CHUNKS = [
    _chunk(ChoiceDelta(role="assistant", content="")),
    *(_chunk(ChoiceDelta(content=f"word{i} ")) for i in range(7)),
    _chunk(ChoiceDelta(), finish="stop"),
    _chunk(),
]
