"""Token counts of one model call."""

from __future__ import annotations

from typing import Any

import attrs

from creditmeter.exceptions import InvalidInput

__all__ = ["MAX_TOKENS", "TokenUsage"]

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

    def __add__(self, other: TokenUsage) -> TokenUsage:
        if not isinstance(other, TokenUsage):
            return NotImplemented
        return TokenUsage(
            input=self.input + other.input,
            output=self.output + other.output,
            cache_write=self.cache_write + other.cache_write,
            cache_read=self.cache_read + other.cache_read,
        )
