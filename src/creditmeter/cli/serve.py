"""``creditmeter serve``: the console and the JSON API over the store, with uvicorn.

Tokens come from the environment only (a command line shows in ``ps``):
``CREDITMETER_ADMIN_TOKEN`` (required) and ``CREDITMETER_READ_TOKEN``. The
server listens on loopback unless ``--allow-remote`` is given with another
``--host``; then put it behind a TLS proxy, since tokens and session cookies
would otherwise cross the network in clear. Everything is checked before the
store is opened. Needs the ``[server]`` extra.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os

import click

from creditmeter.cli.session import Session, pass_session, usage_error
from creditmeter.config import BalanceConfig

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "is_loopback", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8700
ADMIN_ENV = "CREDITMETER_ADMIN_TOKEN"
READ_ENV = "CREDITMETER_READ_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="The address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a --host other than loopback (serve it behind a TLS proxy).",
)
@pass_session
def serve(session: Session, *, host: str, port: int, allow_remote: bool) -> None:
    """Serve the web console and the JSON API (tokens from CREDITMETER_ADMIN_TOKEN/_READ_TOKEN)."""
    admin = os.environ.get(ADMIN_ENV) or None
    read = os.environ.get(READ_ENV) or None
    if admin is None:
        raise click.ClickException(
            f"set {ADMIN_ENV} to start the server (and {READ_ENV} for read-only logins); "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if not is_loopback(host) and not allow_remote:
        usage_error(
            f"--host {host} is not a loopback address: add --allow-remote to listen there "
            "(and serve it behind a TLS proxy)"
        )
    try:
        import uvicorn  # noqa: PLC0415, F401 - the [server] extra, only for this command

        from creditmeter.server.security import Tokens  # noqa: PLC0415 - the [server] extra
    except ImportError as exc:
        raise click.ClickException(
            f"serve needs {(exc.name or 'fastapi').partition('.')[0]}: "
            "pip install 'creditmeter[server]'"
        ) from None
    Tokens(admin, read)  # bad tokens are refused before the store is opened
    config = session.config
    asyncio.run(_serve(session.store_url, config, host, port, admin, read))


async def _serve(  # noqa: PLR0917 - the parts chosen above, passed on
    url: str, config: BalanceConfig, host: str, port: int, admin: str, read: str | None
) -> None:
    """Open the store in the server's event loop, serve until stopped, then close it."""
    import uvicorn  # noqa: PLC0415 - the [server] extra, checked by serve()

    from creditmeter.aio import AsyncBalanceManager  # noqa: PLC0415 - only for this command
    from creditmeter.server import create_app  # noqa: PLC0415 - the [server] extra
    from creditmeter.stores import open_async_store  # noqa: PLC0415 - only for this command

    meter = AsyncBalanceManager(open_async_store(url), config)
    try:
        app = create_app(meter, admin_token=admin, read_token=read)
        settings = uvicorn.Config(app, host=host, port=port, server_header=False)
        await uvicorn.Server(settings).serve()
    finally:
        await meter.aclose()
