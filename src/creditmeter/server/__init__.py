"""An HTML console and a JSON API over an ``AsyncBalanceManager`` (the ``[server]`` extra).

``create_app(meter, admin_token=..., read_token=...)`` returns a FastAPI
application: serve it (``creditmeter serve``, or any ASGI server) or mount
it in a gateway (``app.mount("/admin", create_app(...))``). The parts:

- ``app``: ``create_app``, the error handlers and the middleware;
- ``api``: the JSON routes under ``/api`` (OpenAPI at ``/api/openapi.json``);
- ``console``: the HTML pages (server-rendered, no script);
- ``state``: each operation once, for both (actor and reason recorded);
- ``security``: tokens, sessions, CSRF, login slowdown, security headers;
- ``errors``: the one JSON error shape; ``present``: records as JSON;
- ``chart``: spend per period by model as SVG.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401 - only checked for here
    import itsdangerous  # noqa: F401 - only checked for here
    import jinja2  # noqa: F401 - only checked for here
    import python_multipart  # noqa: F401 - only checked for here
except ImportError as _missing:  # pragma: no cover - depends on the installed extras
    name = (_missing.name or "fastapi").partition(".")[0]
    raise ImportError(
        f"creditmeter.server needs {name}: pip install 'creditmeter[server]'"
    ) from _missing

from creditmeter.server.app import create_app

__all__ = ["create_app"]
