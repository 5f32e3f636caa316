"""``creditmeter serve``: what it refuses before it opens anything.

Tried: no admin token (unset, empty), a token too short, the same token for
admin and read, a non-loopback ``--host`` without ``--allow-remote``; and
which hosts count as loopback. Each refusal happens before the store is
opened (no SQLite file appears) and prints no token.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from server_helpers import ADMIN

from creditmeter.cli import main
from creditmeter.cli.serve import is_loopback


def serve(tmp_path: Path, monkeypatch, capsys, *args: str, env: dict[str, str]) -> tuple[int, str]:
    for key in list(os.environ):
        if key.startswith("CREDITMETER_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    store = f"sqlite:///{tmp_path / 'served.db'}"
    with pytest.raises(SystemExit) as ended:
        main(["--store", store, "serve", *args])
    err = capsys.readouterr().err
    assert not (tmp_path / "served.db").exists()
    return int(ended.value.code or 0), err


@pytest.mark.parametrize("env", [{}, {"CREDITMETER_ADMIN_TOKEN": ""}])
def test_refuses_to_start_without_an_admin_token(tmp_path, monkeypatch, capsys, env):
    code, err = serve(tmp_path, monkeypatch, capsys, env=env)
    assert code == 1
    assert "CREDITMETER_ADMIN_TOKEN" in err


def test_refuses_weak_or_shared_tokens(tmp_path, monkeypatch, capsys):
    code, err = serve(tmp_path, monkeypatch, capsys, env={"CREDITMETER_ADMIN_TOKEN": "short"})
    assert code == 1
    assert "16 to 1024" in err
    same = {"CREDITMETER_ADMIN_TOKEN": ADMIN, "CREDITMETER_READ_TOKEN": ADMIN}
    code, err = serve(tmp_path, monkeypatch, capsys, env=same)
    assert code == 1
    assert "differ" in err
    assert ADMIN not in err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com"])
def test_refuses_a_remote_host_without_allow_remote(tmp_path, monkeypatch, capsys, host):
    env = {"CREDITMETER_ADMIN_TOKEN": ADMIN}
    code, err = serve(tmp_path, monkeypatch, capsys, "--host", host, env=env)
    assert code == 2
    assert "--allow-remote" in err


def test_loopback_hosts():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "10.0.0.1", "::", "localhost.example.com", ""):
        assert not is_loopback(host), host


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "127.0.0.1" in out
    assert "8700" in out
    assert "--allow-remote" in out
