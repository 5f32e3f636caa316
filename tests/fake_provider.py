"""A small OpenAI-compatible HTTP server on 127.0.0.1 for tests that run real clients.

It answers ``POST /v1/chat/completions`` like the provider: a JSON completion
with ``usage``, or with ``"stream": true`` an SSE stream of chunks ending with a
usage chunk (when ``stream_options.include_usage`` is set) and ``[DONE]``.
Prompt tokens are counted as one per word of the messages; the reply is
``words`` words long (default 5), one chunk per word.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def count_prompt(body: dict[str, Any]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))


class _Handler(BaseHTTPRequestHandler):
    server: FakeProvider

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.requests.append(body)
        if not self.path.endswith("/chat/completions"):
            self.send_error(404)
            return
        model = body.get("model", "gpt-4o-mini")
        prompt = count_prompt(body)
        words = ["word"] * self.server.words
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(words),
            "total_tokens": prompt + len(words),
        }
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": model}
        if not body.get("stream"):
            payload = {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunk = {**base, "object": "chat.completion.chunk"}
        for word in words:
            delta = {"index": 0, "delta": {"content": word + " "}, "finish_reason": None}
            self._event({**chunk, "choices": [delta]})
        if (body.get("stream_options") or {}).get("include_usage"):
            self._event({**chunk, "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()


class FakeProvider(ThreadingHTTPServer):
    """The server; ``with FakeProvider() as p:`` serves on ``p.base_url`` until the block ends."""

    daemon_threads = True

    def __init__(self, words: int = 5) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.words = words
        self.requests: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that closes a stream early is normal here; stay quiet about it."""
        import sys  # noqa: PLC0415

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()
