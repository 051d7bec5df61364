"""checkpoints.fetch against a local HTTP server: full download, Range resume, checks, and clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from retalk import checkpoints
from retalk.checkpoints.catalogue import BFM_LANDMARKS, EXPRESSION, FAN, S3FD
from retalk.errors import CheckpointError

NAME = EXPRESSION


def _mat(**variables) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    return buffer.getvalue()


# a valid expression template file of about 1 MB (several read blocks), so the post-download check accepts it
PAYLOAD = _mat(
    expression_center=np.zeros((1, 64)), expression_mouth=np.ones((1, 64)), pad=np.arange(130_000.0)
)


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    log: list[tuple[str, str | None, int]] = []  # (path, Range header, bytes sent)
    ranges = True

    def do_GET(self):
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        header = self.headers.get("Range")
        if header and self.ranges:
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                self.log.append((self.path, header, 0))
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.log.append(
            (self.path, header, len(body))
        )  # before the body: the client may check once it has it
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.log, _Handler.ranges = {}, [], True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield _Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _serve(monkeypatch, name, url, **fields):
    monkeypatch.setitem(
        checkpoints.CHECKPOINTS, name, dataclasses.replace(checkpoints.CHECKPOINTS[name], url=url, **fields)
    )


def test_full_download_checks_size_and_sha(server, monkeypatch, tmp_path):
    handler, base = server
    handler.files[f"/{EXPRESSION}"] = PAYLOAD
    _serve(
        monkeypatch,
        NAME,
        f"{base}/{EXPRESSION}",
        size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    )
    (path,) = checkpoints.fetch([NAME], tmp_path, progress=False)
    assert path == tmp_path / NAME and path.read_bytes() == PAYLOAD
    assert not (tmp_path / f"{NAME}.part").exists()
    assert handler.log == [(f"/{EXPRESSION}", None, len(PAYLOAD))]
    checkpoints.fetch([NAME], tmp_path, progress=False)  # present: nothing requested again
    assert len(handler.log) == 1


def test_resume_requests_only_the_remainder(server, monkeypatch, tmp_path):
    handler, base = server
    handler.files[f"/{EXPRESSION}"] = PAYLOAD
    _serve(monkeypatch, NAME, f"{base}/{EXPRESSION}", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    have = 300_001
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD[:have])
    (path,) = checkpoints.fetch([NAME], tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert handler.log == [(f"/{EXPRESSION}", f"bytes={have}-", len(PAYLOAD) - have)]


def test_server_without_range_restarts_cleanly(server, monkeypatch, tmp_path):
    handler, base = server
    handler.ranges = False
    handler.files[f"/{EXPRESSION}"] = PAYLOAD
    _serve(monkeypatch, NAME, f"{base}/{EXPRESSION}")
    (tmp_path / f"{NAME}.part").write_bytes(b"stale bytes that must not stay in front")
    (path,) = checkpoints.fetch([NAME], tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_sha_mismatch_leaves_no_file(server, monkeypatch, tmp_path):
    handler, base = server
    handler.files[f"/{EXPRESSION}"] = PAYLOAD
    _serve(monkeypatch, NAME, f"{base}/{EXPRESSION}", sha256="0" * 64)
    with pytest.raises(CheckpointError, match="sha256") as err:
        checkpoints.fetch([NAME], tmp_path, progress=False)
    assert NAME in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_size_mismatch_leaves_no_file(server, monkeypatch, tmp_path):
    handler, base = server
    handler.files[f"/{EXPRESSION}"] = PAYLOAD[:1000]
    _serve(monkeypatch, NAME, f"{base}/{EXPRESSION}", size=len(PAYLOAD))
    with pytest.raises(CheckpointError, match="1000 bytes"):
        checkpoints.fetch([NAME], tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unusable_content_is_removed(server, monkeypatch, tmp_path):
    handler, base = server
    handler.files[f"/{EXPRESSION}"] = b"<html>Sign in to continue</html>"
    _serve(monkeypatch, NAME, f"{base}/{EXPRESSION}")
    with pytest.raises(CheckpointError, match="not a usable file"):
        checkpoints.fetch([NAME], tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_404_is_a_clear_error(server, monkeypatch, tmp_path):
    _, base = server
    _serve(monkeypatch, NAME, f"{base}/gone.mat")
    with pytest.raises(CheckpointError, match="HTTP 404") as err:
        checkpoints.fetch([NAME], tmp_path, progress=False)
    assert str(err.value).startswith(NAME) and "\n" not in str(err.value)


def test_connection_refused_is_a_clear_error(monkeypatch, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _serve(monkeypatch, NAME, f"http://127.0.0.1:{port}/{EXPRESSION}")
    with pytest.raises(CheckpointError, match="cannot reach") as err:
        checkpoints.fetch([NAME], tmp_path, progress=False, timeout=5)
    assert "\n" not in str(err.value)


def test_archive_member_is_extracted(server, monkeypatch, tmp_path):
    handler, base = server
    lm = _mat(lm=np.zeros((68, 3), dtype=np.float32))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("BFM/other.mat", b"not this one")
        archive.writestr(BFM_LANDMARKS, lm)
    handler.files["/BFM.zip"] = buffer.getvalue()
    name = BFM_LANDMARKS
    _serve(monkeypatch, name, f"{base}/BFM.zip")
    (path,) = checkpoints.fetch([name], tmp_path, progress=False)
    assert path == tmp_path / BFM_LANDMARKS and path.read_bytes() == lm
    assert [p.name for p in (tmp_path / "BFM").iterdir()] == [Path(BFM_LANDMARKS).name]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_plain_fetch_also_gets_the_reference_detector_and_landmarks(
    server, monkeypatch, tmp_path, reference_shaped_state_dict
):
    """S3FD and FAN are optional for the neural engine (it falls back to dlib) yet downloaded by default."""
    import torch

    handler, base = server
    detector, landmarks = S3FD, FAN
    s3fd, fan = io.BytesIO(), io.BytesIO()
    torch.save(reference_shaped_state_dict(detector), s3fd)
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 68, 1), torch.zeros(1, 3, 4, 4)), fan)
    handler.files.update({f"/{detector}": s3fd.getvalue(), f"/{landmarks}": fan.getvalue()})
    for name in (detector, landmarks):
        _serve(monkeypatch, name, f"{base}/{name}")
    required = [s.name for s in checkpoints.CHECKPOINTS.values() if s.required]
    for name in required:  # present already: kept as they are
        (tmp_path / name).write_bytes(b"present")
    paths = checkpoints.fetch(None, tmp_path, progress=False)
    assert {p.name for p in paths} == {*required, detector, landmarks}
    assert sorted(path for path, _, _ in handler.log) == sorted([f"/{detector}", f"/{landmarks}"])
    assert (tmp_path / detector).read_bytes() == s3fd.getvalue()
    assert not checkpoints.CHECKPOINTS[detector].required and not checkpoints.CHECKPOINTS[landmarks].required
