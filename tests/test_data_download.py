"""The real download code against a local HTTP server: success, wrong checksum, interrupted
transfer, server down, and the cache around it."""

import hashlib
import http.server
import socket
import threading

import pytest

from minillm import data
from minillm.errors import InputError

PAYLOAD = ("To be, or not to be, that is the question:\n" * 2000).encode()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/good": PAYLOAD, "/tampered": PAYLOAD.replace(b"question", b"answer!!")}.get(
            self.path
        )
        self.send_response(200 if body is not None or self.path == "/cut" else 404)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path == "/cut":  # promise the whole file, send a third, hang up
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        elif body is not None:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def corpus(monkeypatch, tmp_path, server):
    """Register a corpus served by the local server and point the cache at an empty folder."""
    monkeypatch.setenv("MINILLM_DATA", str(tmp_path / "cache"))

    def register(path: str):
        entry = data.Corpus("hamlet", f"{server}{path}", SHA, len(PAYLOAD), "hamlet.txt", "test")
        monkeypatch.setitem(data.CORPORA, "hamlet", entry)
        return entry

    return register


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/good"  # nothing listens there any more


def test_download_succeeds_verifies_and_shows_progress(corpus, capsys):
    corpus("/good")
    path = data.fetch("hamlet")
    assert path.read_bytes() == PAYLOAD
    assert path == data.cached_path("hamlet") and data.is_cached("hamlet")
    assert not list(path.parent.glob("*.part"))
    assert "hamlet.txt" in capsys.readouterr().err  # the tqdm bar


def test_wrong_checksum_saves_nothing(corpus):
    corpus("/tampered")
    with pytest.raises(data.DownloadError, match="sha256"):
        data.fetch("hamlet", progress=False)
    assert list(data.cached_path("hamlet").parent.iterdir()) == []


def test_interrupted_transfer_leaves_no_file_that_looks_complete(corpus):
    corpus("/cut")
    with pytest.raises(data.DownloadError, match="Download it by hand"):
        data.fetch("hamlet", progress=False)
    assert list(data.cached_path("hamlet").parent.iterdir()) == []


def test_missing_file_on_server_is_a_clear_error(corpus):
    corpus("/nothing-here")
    with pytest.raises(data.DownloadError, match="404"):
        data.fetch("hamlet", progress=False)


def test_server_down_with_nothing_cached_says_how_to_get_the_file(corpus, monkeypatch):
    entry = corpus("/good")
    monkeypatch.setitem(
        data.CORPORA, "hamlet", data.Corpus(**{**entry.__dict__, "url": _closed_port_url()})
    )
    with pytest.raises(data.DownloadError) as err:
        data.fetch("hamlet", progress=False)
    message = str(err.value)
    assert (
        str(data.cached_path("hamlet")) in message and SHA in message and "MINILLM_DATA" in message
    )


def test_cached_file_is_used_offline(corpus, monkeypatch):
    entry = corpus("/good")
    data.fetch("hamlet", progress=False)
    monkeypatch.setitem(
        data.CORPORA, "hamlet", data.Corpus(**{**entry.__dict__, "url": _closed_port_url()})
    )
    assert data.load_text("hamlet", progress=False) == PAYLOAD.decode()


def test_corrupted_cache_is_downloaded_again(corpus):
    corpus("/good")
    path = data.fetch("hamlet", progress=False)
    path.write_bytes(PAYLOAD[:100])
    assert not data.is_cached("hamlet")
    assert data.fetch("hamlet", progress=False).read_bytes() == PAYLOAD


def test_unknown_corpus_lists_the_known_ones():
    with pytest.raises(InputError, match="tinyshakespeare"):
        data.fetch("tiny_shakespear")


def test_course_corpus_registry_matches_the_file():
    """The registry's size and checksum describe the real tiny Shakespeare (copied into the test
    cache from CI's local copy, so no network is needed)."""
    path = data.fetch("tinyshakespeare", progress=False)
    text = path.read_text(encoding="utf-8")
    assert len(text) == 1_115_394 == data.CORPORA["tinyshakespeare"].size
    assert len(set(text)) == 65


def test_default_cache_is_under_the_user_cache_dir(monkeypatch):
    monkeypatch.delenv("MINILLM_DATA", raising=False)
    assert data.data_dir().parts[-2:] == ("minillm", "data")
