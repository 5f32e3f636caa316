"""Token counts of one model call, and reading them from what provider SDKs return.

``TokenUsage.from_response`` understands OpenAI Chat Completions and
Responses, Anthropic Messages, Google Gemini and LiteLLM results, as SDK
objects or plain dicts. ``StreamUsage`` does the same over the chunks or
events of a stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from creditmeter._settable import check_builder, settable
from creditmeter.exceptions import InvalidInput

__all__ = ["MAX_TOKENS", "StreamUsage", "TokenUsage", "usage_from_stream"]

MAX_TOKENS = 10**10
"""The largest token count of one kind accepted in one call; more is taken as corrupt data."""


def _check_count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not int:
        raise InvalidInput(
            f"token count {attribute.name} must be an int, got {type(value).__name__} {value!r}"
        )
    if not 0 <= value <= MAX_TOKENS:
        raise InvalidInput(f"token count {attribute.name} must be in 0..10**10, got {value!r}")


@attrs.frozen(kw_only=True)
class TokenUsage:
    """Tokens used by one model call, split by how each kind is priced.

    ``input`` counts uncached prompt tokens only; ``cache_write`` and
    ``cache_read`` are prompt tokens written to or read from a provider's
    prompt cache; ``output`` counts completion tokens (reasoning included).
    """

    input: int = attrs.field(default=0, validator=_check_count)
    output: int = attrs.field(default=0, validator=_check_count)
    cache_write: int = attrs.field(default=0, validator=_check_count)
    cache_read: int = attrs.field(default=0, validator=_check_count)

    @property
    def prompt_total(self) -> int:
        """All prompt tokens: uncached input plus cache writes and reads."""
        return self.input + self.cache_write + self.cache_read

    @property
    def total(self) -> int:
        """All tokens of the call."""
        return self.input + self.cache_write + self.cache_read + self.output

    @classmethod
    def from_response(cls, response: Any) -> TokenUsage | None:
        """Read the usage a provider reported in a response, or ``None`` if it reported none.

        Accepts SDK objects or plain dicts of: OpenAI Chat Completions (also a
        streamed chunk carrying ``usage``), OpenAI Responses, Anthropic
        Messages (also ``message_start`` / ``message_delta`` events), Google
        Gemini (``usage_metadata``) and LiteLLM ``ModelResponse``. Counts that
        are negative, not whole numbers or absurdly large raise
        ``InvalidInput`` naming the field.
        """
        return _read_response(response)

    def __add__(self, other: TokenUsage) -> TokenUsage:
        if not isinstance(other, TokenUsage):
            return NotImplemented
        return TokenUsage(
            input=self.input + other.input,
            output=self.output + other.output,
            cache_write=self.cache_write + other.cache_write,
            cache_read=self.cache_read + other.cache_read,
        )


# --- reading provider responses -------------------------------------------------


def _get(obj: Any, name: str) -> Any:  # noqa: PLR0911 - one return per kind of object
    """``obj[name]`` for mappings, ``obj.name`` for objects; ``None`` when absent.

    SDK responses are pydantic models, on which a missing attribute costs an
    exception (about 4 µs): their fields are read from ``__dict__``, and a
    field they lack from their extras.
    """
    if obj is None:
        return None
    if type(obj) is dict:
        return obj.get(name)
    kind = _KINDS.get(type(obj))
    if kind is None:
        kind = _kind_of(type(obj))
    if kind is _PYDANTIC:
        value = obj.__dict__.get(name, _MISSING)
        if value is not _MISSING:
            return value
        extra = getattr(obj, "__pydantic_extra__", None)  # undeclared fields
        return extra.get(name) if extra else None
    fields = getattr(obj, "__dict__", None)
    if fields is not None and name in fields:
        return fields[name]
    if kind is _MAPPING:
        return obj.get(name)
    return getattr(obj, name, None)


_PYDANTIC, _MAPPING, _OTHER = "pydantic", "mapping", "other"
_MISSING = object()
# What each class of response is: isinstance() against an ABC, and looking a model's
# fields up, cost more than this lookup. Bounded: classes made at run time come and go.
_KINDS: dict[type, str] = {}
_CLASSES_LIMIT = 256


def _kind_of(cls: type) -> str:
    if getattr(cls, "__pydantic_fields__", None) is not None and not issubclass(cls, Mapping):
        kind = _PYDANTIC
    elif issubclass(cls, Mapping):
        kind = _MAPPING
    else:
        kind = _OTHER
    if len(_KINDS) >= _CLASSES_LIMIT:
        _KINDS.clear()
    _KINDS[cls] = kind
    return kind


def _count(obj: Any, name: str, *, where: str, required: bool = True) -> int:
    value = _get(obj, name)
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    field = f"{where}.{name}"
    if value is None:
        if required:
            raise InvalidInput(f"usage field {field} is missing")
        return 0
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise InvalidInput(f"usage field {field} must be a whole number, got {value!r}")
    if not 0 <= value <= MAX_TOKENS:
        raise InvalidInput(f"usage field {field} must be in 0..10**10, got {value!r}")
    return value


def counted_usage(input: int, output: int, cache_write: int, cache_read: int) -> TokenUsage:  # noqa: A002
    """``TokenUsage`` of counts that ``_count`` (or ``_cached_part``) checked already.

    Its own validators would check them again: a quarter of reading a response.
    """
    usage = _new(_SettableUsage)
    usage.input = input
    usage.output = output
    usage.cache_write = cache_write
    usage.cache_read = cache_read
    usage.__class__ = TokenUsage
    return usage  # type: ignore[no-any-return]


_new = object.__new__
_SettableUsage = settable(TokenUsage)
check_builder(TokenUsage, counted_usage)


def _cached_part(total: int, cached: int, *, where: str) -> int:
    if cached > total:
        raise InvalidInput(f"usage field {where}: {cached} cached tokens exceed {total} in all")
    return total - cached


def _cache_details(usage: Any, holder: str) -> tuple[int, int]:
    """The cached (read) and cache-write token counts of an OpenAI usage's details."""
    details = _get(usage, holder)
    if details is None:
        return 0, 0
    where = f"usage.{holder}"
    return (
        _count(details, "cached_tokens", where=where, required=False),
        _count(details, "cache_write_tokens", where=where, required=False),
    )


def _openai_chat(usage: Any) -> TokenUsage:
    # prompt_tokens counts every prompt token; cache reads and writes are parts of it.
    prompt = _count(usage, "prompt_tokens", where="usage")
    cached, written = _cache_details(usage, "prompt_tokens_details")
    return counted_usage(
        _cached_part(prompt, cached + written, where="usage.prompt_tokens"),
        _count(usage, "completion_tokens", where="usage"),
        written,
        cached,
    )


def _openai_responses(usage: Any) -> TokenUsage:
    total = _count(usage, "input_tokens", where="usage")
    cached, written = _cache_details(usage, "input_tokens_details")
    return counted_usage(
        _cached_part(total, cached + written, where="usage.input_tokens"),
        _count(usage, "output_tokens", where="usage"),
        written,
        cached,
    )


def _anthropic(usage: Any, *, delta: bool = False) -> TokenUsage:
    # Anthropic's input_tokens excludes cache reads and writes. A message_delta
    # event may leave input_tokens out (None): it reports output only.
    return counted_usage(
        _count(usage, "input_tokens", where="usage", required=not delta),
        _count(usage, "output_tokens", where="usage"),
        _count(usage, "cache_creation_input_tokens", where="usage", required=False),
        _count(usage, "cache_read_input_tokens", where="usage", required=False),
    )


_GEMINI_FIELDS = {
    "prompt_token_count": "promptTokenCount",
    "cached_content_token_count": "cachedContentTokenCount",
    "candidates_token_count": "candidatesTokenCount",
    "thoughts_token_count": "thoughtsTokenCount",
}


def _gemini(metadata: Any) -> TokenUsage:
    where = "usage_metadata"
    counts: dict[str, int] = {}
    for name, camel in _GEMINI_FIELDS.items():
        key = name if _get(metadata, name) is not None else camel  # REST JSON is camelCase
        counts[name] = _count(metadata, key, where=where, required=False)
        if _get(metadata, key) is None:
            counts.pop(name)
    if not counts:
        raise InvalidInput("usage field usage_metadata has no token counts")
    prompt = counts.get("prompt_token_count", 0)
    cached = counts.get("cached_content_token_count", 0)
    return TokenUsage(
        input=_cached_part(prompt, cached, where=f"{where}.prompt_token_count"),
        output=counts.get("candidates_token_count", 0) + counts.get("thoughts_token_count", 0),
        cache_read=cached,
    )


def _from_usage(usage: Any) -> TokenUsage:
    """Read a usage object of whichever provider shape it has."""
    if _get(usage, "prompt_tokens") is not None or _get(usage, "completion_tokens") is not None:
        return _openai_chat(usage)
    if _get(usage, "input_tokens_details") is not None:
        return _openai_responses(usage)
    if _get(usage, "input_tokens") is not None or _get(usage, "output_tokens") is not None:
        return _anthropic(usage)
    if _get(usage, "prompt_token_count") is not None or _get(usage, "promptTokenCount") is not None:
        return _gemini(usage)
    if isinstance(usage, Mapping) and not usage:
        raise InvalidInput("usage is empty")
    raise InvalidInput(f"usage has no token counts this library knows: {usage!r:.200}")


def _pydantic_fields(obj: Any) -> dict[str, Any] | None:
    """A pydantic model's declared fields (``__dict__``), if ``obj`` is one with no extras."""
    kind = _KINDS.get(type(obj))
    if kind is None:
        kind = _kind_of(type(obj))
    if kind is not _PYDANTIC or getattr(obj, "__pydantic_extra__", None):
        return None
    fields: dict[str, Any] = obj.__dict__
    return fields


def _chat_completion_usage(response: Any) -> TokenUsage | None:  # noqa: PLR0911 - each way to give up
    """An OpenAI ``ChatCompletion``'s usage read straight from its fields; ``None`` otherwise.

    The common response of a metered call, read in half the time of the
    general path. Anything unusual (another shape, a count that is not a plain
    whole number in range, extra fields) gives ``None``: the general path then
    reads it, or raises its error.
    """
    # Each level's fields as _pydantic_fields reads them, inline for a class known to be
    # a model and an object without extras: three frames fewer on every metered call.
    kinds = _KINDS
    fields = (
        response.__dict__
        if kinds.get(type(response)) is _PYDANTIC
        and not getattr(response, "__pydantic_extra__", None)
        else _pydantic_fields(response)
    )
    if fields is None or fields.get("type") is not None:
        return None
    held = fields.get("usage")  # None in most stream chunks: nothing more to look up
    if held is None:
        return None
    usage = (
        held.__dict__
        if kinds.get(type(held)) is _PYDANTIC and not getattr(held, "__pydantic_extra__", None)
        else _pydantic_fields(held)
    )
    if usage is None:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (  # plain counts: ints (not bools) in range
        type(prompt) is int
        and type(completion) is int
        and 0 <= prompt <= MAX_TOKENS
        and 0 <= completion <= MAX_TOKENS
    ):
        return None
    cached: object = 0
    written: object = 0
    holder = usage.get("prompt_tokens_details")
    if holder is not None:
        details = (
            holder.__dict__
            if kinds.get(type(holder)) is _PYDANTIC
            and not getattr(holder, "__pydantic_extra__", None)
            else _pydantic_fields(holder)
        )
        if details is None:
            return None
        cached, written = details.get("cached_tokens"), details.get("cache_write_tokens")
        cached, written = 0 if cached is None else cached, 0 if written is None else written
    if (
        not (  # plain counts: ints (not bools) in range
            type(cached) is int
            and type(written) is int
            and 0 <= cached <= MAX_TOKENS
            and 0 <= written <= MAX_TOKENS
        )
        or cached + written > prompt
    ):
        return None
    return counted_usage(prompt - cached - written, completion, written, cached)


def _read_response(response: Any) -> TokenUsage | None:
    """The usage a response reports: the common ``ChatCompletion`` first, then any shape."""
    found = _chat_completion_usage(response)
    return found if found is not None else _read_any(response)


def _read_any(response: Any) -> TokenUsage | None:  # noqa: PLR0911 - one return per shape
    if response is None:
        return None
    if isinstance(response, TokenUsage):
        return response
    kind = _get(response, "type")
    if kind == "message_start":  # an Anthropic stream event
        return _read_response(_get(response, "message"))
    if kind == "message_delta":  # an Anthropic stream event: cumulative counts so far
        usage = _get(response, "usage")
        return None if usage is None else _anthropic(usage, delta=True)
    if kind in ("response.completed", "response.incomplete", "response.failed"):
        return _read_response(_get(response, "response"))  # an OpenAI Responses stream event
    usage = _get(response, "usage")
    if usage is not None:
        return _from_usage(usage)
    metadata = _get(response, "usage_metadata")
    if metadata is None:
        metadata = _get(response, "usageMetadata")
    if metadata is not None:
        return _gemini(metadata)
    return None


class StreamUsage:
    """Collects the usage reported across a stream's chunks or events.

    Call ``add`` with each chunk as it passes; read ``usage`` at the end
    (``None`` if no chunk reported any). OpenAI and Gemini chunks report a
    running or final total, so the last report wins; Anthropic reports input
    counts in ``message_start`` and cumulative counts in ``message_delta``,
    which are merged. ``chunks`` counts the chunks seen and ``content_chunks``
    those that carried generated content (not usage reports or control events);
    ``finished`` tells that a closing usage report arrived.
    """

    __slots__ = ("_anthropic", "_usage", "chunks", "content_chunks", "finished")

    def __init__(self) -> None:
        self.chunks = 0
        self.content_chunks = 0
        self.finished = False  # a closing usage report was seen: the generation is over
        self._usage: TokenUsage | None = None
        self._anthropic: dict[str, int] | None = None

    def add(self, chunk: Any) -> None:
        """Take note of one chunk or event."""
        self.chunks += 1
        if _is_content(chunk):
            self.content_chunks += 1
        kind = _get(chunk, "type")
        if kind == "message_start":
            usage = _get(_get(chunk, "message"), "usage")
            if usage is not None:
                self._anthropic = {
                    name: _count(usage, name, where="message.usage", required=False)
                    for name in _ANTHROPIC_FIELDS
                }
                self._usage = _anthropic_usage(self._anthropic)
            return
        if kind == "message_delta":
            usage = _get(chunk, "usage")
            self.finished = True  # Anthropic sends it once, after the last content block
            if usage is not None:
                state = self._anthropic if self._anthropic is not None else {}
                for name in _ANTHROPIC_FIELDS:
                    if _get(usage, name) is not None:  # counts in a delta are cumulative
                        state[name] = _count(usage, name, where="usage")
                self._anthropic = state
                self._usage = _anthropic_usage(state)
            return
        found = _read_response(chunk)
        if found is not None:
            self._usage = found
            # OpenAI's usage chunk (no choices) and Responses' completed event close a stream;
            # Gemini's running totals do not.
            if _get(chunk, "choices") == [] or kind == "response.completed":
                self.finished = True

    @property
    def usage(self) -> TokenUsage | None:
        """The usage reported so far, or ``None`` if no chunk reported any."""
        return self._usage


_CONTENT_EVENTS = frozenset(
    {
        "content_block_delta",  # Anthropic
        "response.output_text.delta",  # OpenAI Responses
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
    }
)


def _is_content(chunk: Any) -> bool:
    """Whether a chunk carried generated content, as far as its shape tells."""
    if isinstance(chunk, (str, bytes)):
        return bool(chunk)
    kind = _get(chunk, "type")
    if isinstance(kind, str):
        return kind in _CONTENT_EVENTS
    choices = _get(chunk, "choices")  # OpenAI chat: the final usage chunk has none
    if choices is not None:
        return bool(choices)
    candidates = _get(chunk, "candidates")  # Gemini
    if candidates is not None:
        return bool(candidates)
    return _get(chunk, "usage") is None and _get(chunk, "usage_metadata") is None


_ANTHROPIC_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _anthropic_usage(state: Mapping[str, int]) -> TokenUsage:
    return TokenUsage(
        input=state.get("input_tokens", 0),
        output=state.get("output_tokens", 0),
        cache_write=state.get("cache_creation_input_tokens", 0),
        cache_read=state.get("cache_read_input_tokens", 0),
    )


def usage_from_stream(chunks: Iterable[Any]) -> TokenUsage | None:
    """The usage reported by a whole stream of chunks or events (``None`` if none was)."""
    collector = StreamUsage()
    for chunk in chunks:
        collector.add(chunk)
    return collector.usage
