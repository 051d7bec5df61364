"""§2.2: loopback by default, CURVE with an allow-list of client keys for anything else (ZAP), on 127.0.0.1."""

from __future__ import annotations

import shutil

import pytest
import zmq.auth
from retalk_protocol.client import Client
from retalk_protocol.codec import ProtocolError
from retalk_server import ServerConfig
from server_support import IdlePool, server_in_thread

from retalk.cli import main as retalk_main
from retalk.errors import InputError


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:7878", "tcp://192.168.1.5:7878", "tcp://*:7878"])
def test_s2_2_binding_beyond_loopback_without_curve_is_refused(tmp_path, endpoint):
    with pytest.raises(InputError, match="requires CURVE"):
        ServerConfig(endpoint=endpoint, state_dir=tmp_path).check()


def test_s2_2_curve_needs_both_key_and_allow_list(tmp_path):
    with pytest.raises(InputError, match="go together"):
        ServerConfig(secret_key=tmp_path / "server.key_secret", state_dir=tmp_path).check()


@pytest.fixture
def keys(tmp_path, capsys):
    made = tmp_path / "made"
    for name in ("server", "alice", "mallory"):
        assert retalk_main(["keys", str(made), "--name", name]) == 0
    assert "secret key" in capsys.readouterr().out
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(made / "alice.key", allowed)  # only Alice's PUBLIC key is listed
    return made, allowed


@pytest.fixture
def curve_server(tmp_path, keys):
    made, allowed = keys
    config = ServerConfig(
        endpoint="tcp://127.0.0.1:0",
        state_dir=tmp_path / "state",
        secret_key=made / "server.key_secret",
        allowed_keys=allowed,
        heartbeat=0.2,
    )
    with server_in_thread(config, IdlePool()) as server:
        yield server


def _client(server, made, name, **kwargs) -> Client:
    server_public, _ = zmq.auth.load_certificate(str(made / "server.key"))
    key = zmq.auth.load_certificate(str(made / f"{name}.key_secret"))
    return Client(server.endpoint, server_key=server_public, client_key=key, **kwargs)


def test_s2_2_a_listed_client_key_is_admitted(curve_server, keys):
    made, _ = keys
    alice_public = (made / "alice.key").read_text()
    with _client(curve_server, made, "alice", timeout=30) as client:
        assert client.welcome["version"] == 1
        assert client.status()["clients"] == 1
        (session,) = list(curve_server.sessions.values())
        assert session.user and session.user in alice_public  # logs name the client by its CURVE key


def test_s2_2_an_unlisted_client_key_is_refused(curve_server, keys):
    made, _ = keys
    client = _client(curve_server, made, "mallory", timeout=2)
    with pytest.raises(ProtocolError) as err:
        client.connect()
    client.close()
    assert err.value.code == "timeout"
    assert not curve_server.sessions


def test_s2_2_a_client_without_curve_is_refused(curve_server):
    client = Client(curve_server.endpoint, timeout=2)
    with pytest.raises(ProtocolError):
        client.connect()
    client.close()
    assert not curve_server.sessions
