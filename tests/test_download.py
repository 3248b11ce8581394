"""Stage download against a real HTTP server on 127.0.0.1 that misbehaves on request.

Small synthetic payloads replace the four MNIST files (download.FILES and download.expected are
monkeypatched), so every case takes well under a second. Several mirrors are paths on the same
server (/m1/, /m2/, ...): the tests give download() a list of bases, or set
download.PUBLIC_MIRRORS["mnist"], the list the stage tries when MNIST_MIRROR is unset.
MNIST_MIRROR itself stays one location, never the internet. Offline checks of verify() and
sources() are in test_download_verify.py.
"""

import gzip
import hashlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from stages.common import PipelineError

import pytest
from conftest import ROOT, run, set_params

from stages import download

PAYLOADS = {
    "file0": bytes(i * 13 % 256 for i in range(3000)),
    "file1": bytes(i * 7 % 251 for i in range(500)),
}
FAKE_FILES = {name: (hashlib.sha256(data).hexdigest(), len(data)) for name, data in PAYLOADS.items()}
GOOD = {name: gzip.compress(data) for name, data in PAYLOADS.items()}
HUGE = 256 << 20  # what a hostile mirror offers: 256 MiB


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes = {}  # path -> behaviour (see Handler.do_GET); anything else is a 404
        self.hits = {}  # path -> number of requests
        self.sent = {}  # path -> body bytes the client accepted
        self.release = threading.Event()  # ends the stalls at teardown

    def url(self, mirror):
        return f"http://127.0.0.1:{self.server_port}/{mirror}/"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.hits[self.path] = server.hits.get(self.path, 0) + 1
        behaviour = server.routes.get(self.path, 404)
        if isinstance(behaviour, int):
            self.send_error(behaviour)
        elif behaviour == "stall":  # accept the connection, never answer
            server.release.wait(30)
        elif isinstance(behaviour, bytes):
            self.reply(behaviour)
        else:
            kind, body = behaviour
            if kind == "truncate":  # announce the whole body, send half, hang up
                self.reply(body[: len(body) // 2], length=len(body))
            elif kind == "stall-body":  # send half, then go silent
                self.reply(body[: len(body) // 2], length=len(body))
                server.release.wait(30)
            elif kind == "huge":  # stream HUGE bytes of zeros, with or without announcing them
                self.reply(None, length=body)

    def reply(self, body, length=None):
        self.send_response(200)
        if length is not None or body is not None:
            self.send_header("Content-Length", str(length if length is not None else len(body)))
        self.end_headers()
        chunks = [body] if body is not None else (bytes(1 << 16) for _ in range(HUGE >> 16))
        sent = 0
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:  # the client hung up
            pass
        finally:
            self.server.sent[self.path] = sent


@pytest.fixture(scope="module")
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def web(server, monkeypatch):
    """The server with no routes yet, and the pinned files replaced by the small synthetic payloads."""
    server.routes.clear()
    server.hits.clear()
    server.sent.clear()
    monkeypatch.setattr(download, "FILES", {name: size for name, (_, size) in FAKE_FILES.items()})
    monkeypatch.setattr(download, "expected", lambda dataset: FAKE_FILES)
    return server


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there any more: connection refused


def get(server, tmp_path, mirrors, name="file0", timeout=2, retries=1):
    """download() one synthetic file from the given mirrors; return the seconds it took."""
    start = time.perf_counter()
    dest = tmp_path / f"{name}.gz"
    bases = [server.url(m) for m in mirrors]
    download.download(name, FAKE_FILES[name], dest, bases, timeout=timeout, retries=retries)
    assert gzip.decompress(dest.read_bytes()) == PAYLOADS[name]
    return time.perf_counter() - start


def test_good_mirror(web, tmp_path):
    web.routes["/m1/file0.gz"] = GOOD["file0"]
    get(web, tmp_path, ["m1"])
    assert web.hits == {"/m1/file0.gz": 1}


@pytest.mark.parametrize("status", [403, 404, 410])
def test_client_error_falls_through_to_the_next_mirror_without_retrying(web, tmp_path, status):
    web.routes["/m1/file0.gz"] = status
    web.routes["/m2/file0.gz"] = GOOD["file0"]
    get(web, tmp_path, ["m1", "m2"], retries=2)
    assert web.hits == {"/m1/file0.gz": 1, "/m2/file0.gz": 1}


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_error_is_retried_then_falls_through(web, tmp_path, status):
    web.routes["/m1/file0.gz"] = status
    web.routes["/m2/file0.gz"] = GOOD["file0"]
    seconds = get(web, tmp_path, ["m1", "m2"], retries=1)
    assert web.hits == {"/m1/file0.gz": 2, "/m2/file0.gz": 1}  # bounded: 1 + MNIST_RETRIES tries
    assert seconds < 5


def test_stalled_connection_times_out_and_moves_on(web, tmp_path):
    web.routes["/m1/file0.gz"] = "stall"
    web.routes["/m2/file0.gz"] = GOOD["file0"]
    seconds = get(web, tmp_path, ["m1", "m2"], timeout=0.3, retries=0)
    assert web.hits == {"/m1/file0.gz": 1, "/m2/file0.gz": 1}
    assert seconds < 5


def test_stall_in_the_middle_of_the_body_times_out_and_moves_on(web, tmp_path):
    web.routes["/m1/file0.gz"] = ("stall-body", GOOD["file0"])
    web.routes["/m2/file0.gz"] = GOOD["file0"]
    seconds = get(web, tmp_path, ["m1", "m2"], timeout=0.3, retries=0)
    assert seconds < 5


def test_truncated_transfer_is_retried_then_falls_through(web, tmp_path):
    web.routes["/m1/file0.gz"] = ("truncate", GOOD["file0"])
    web.routes["/m2/file0.gz"] = GOOD["file0"]
    get(web, tmp_path, ["m1", "m2"], retries=1)
    assert web.hits == {"/m1/file0.gz": 2, "/m2/file0.gz": 1}  # truncation may be transient


def test_corrupted_payload_is_refused_and_the_next_mirror_used(web, tmp_path):
    wrong = bytes(reversed(PAYLOADS["file0"]))  # same size, other content
    web.routes["/m1/file0.gz"] = gzip.compress(wrong)
    web.routes["/m2/file0.gz"] = GOOD["file0"]
    get(web, tmp_path, ["m1", "m2"], retries=2)
    assert web.hits == {"/m1/file0.gz": 1, "/m2/file0.gz": 1}  # bad content: no point retrying


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>Not found, but 200 OK</html>", "not a valid gzip file"),
        (GOOD["file0"][:10] + b"\xff" + GOOD["file0"][11:], "not a valid gzip file"),  # corrupt deflate
        (gzip.compress(PAYLOADS["file0"] + b"x"), "decompresses to more than the 3000 bytes expected"),
        (gzip.compress(PAYLOADS["file0"][:-1]), "truncated payload: 2999 of 3000 bytes"),
        (gzip.compress(bytes(50 << 20)), "decompresses to more than"),  # a 50 MB gzip bomb, ~50 kB sent
    ],
    ids=["html", "corrupt-deflate", "too-long", "too-short", "gzip-bomb"],
)
def test_bad_content_is_one_line_naming_the_url_and_reason(web, tmp_path, body, reason):
    web.routes["/m1/file0.gz"] = body
    with pytest.raises(PipelineError) as e:
        get(web, tmp_path, ["m1"], retries=2)
    assert f"{web.url('m1')}file0.gz: {reason}" in str(e.value)
    assert web.hits == {"/m1/file0.gz": 1}


@pytest.mark.parametrize("announced", [True, False], ids=["announced", "unannounced"])
def test_oversized_file_stops_reading_early(web, tmp_path, announced):
    web.routes["/m1/file0.gz"] = ("huge", HUGE if announced else None)
    web.routes["/m2/file0.gz"] = GOOD["file0"]
    get(web, tmp_path, ["m1", "m2"], retries=2)
    assert web.hits["/m1/file0.gz"] == 1  # not retried: the mirror is wrong, not slow
    for _ in range(100):  # the server thread notices the hang-up
        if "/m1/file0.gz" in web.sent:
            break
        time.sleep(0.05)
    # Whatever the socket buffers took in, the client read ~64 kB and hung up: far below the offer.
    assert web.sent["/m1/file0.gz"] < HUGE // 8


def test_no_mirror_reachable_lists_every_source_and_the_hint(web, tmp_path):
    refused = closed_port_url()
    web.routes["/m2/file0.gz"] = 503
    bases = [refused, web.url("m2"), web.url("m3")]  # refused, server error, not found
    start = time.perf_counter()
    with pytest.raises(PipelineError) as e:
        download.download("file0", FAKE_FILES["file0"], tmp_path / "file0.gz", bases, timeout=1, retries=1)
    message = str(e.value)
    assert time.perf_counter() - start < 5  # two retries in all, half a second each
    assert message.startswith("could not get file0.gz; tried ")
    for base in bases:
        assert f"{base}file0.gz: " in message
    assert "HTTP 503" in message and "HTTP 404" in message and "refused" in message.lower()
    assert message.endswith(f"{web.url('m3')}file0.gz: HTTP 404")  # main() adds the hint
    assert "\n" not in message


# --- the whole stage: what reaches data/raw --------------------------------------------------------


@pytest.fixture
def stage_dir(web, tmp_path, monkeypatch):
    """Run download.main() in tmp_path with the public mirrors replaced by /m1/ and /m2/."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    monkeypatch.setenv("MNIST_TIMEOUT", "1")
    monkeypatch.setenv("MNIST_RETRIES", "0")
    monkeypatch.setitem(download.PUBLIC_MIRRORS, "mnist", (web.url("m1"), web.url("m2")))
    (tmp_path / "params.yaml").write_text("data:\n  dataset: mnist\n")
    return tmp_path


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


def test_stage_falls_through_mirrors_and_writes_verified_files(web, stage_dir):
    web.routes["/m1/file0.gz"] = 500
    web.routes["/m2/file0.gz"] = GOOD["file0"]
    web.routes["/m1/file1.gz"] = GOOD["file1"]
    download.main()
    assert files_under(stage_dir / "data") == ["raw", "raw/file0.gz", "raw/file1.gz"]
    for name, data in PAYLOADS.items():
        assert gzip.decompress((stage_dir / "data/raw" / f"{name}.gz").read_bytes()) == data


def test_stage_writes_nothing_when_one_file_is_corrupt_everywhere(web, stage_dir):
    corrupt = gzip.compress(bytes(reversed(PAYLOADS["file1"])))
    web.routes.update({"/m1/file0.gz": GOOD["file0"], "/m1/file1.gz": corrupt, "/m2/file1.gz": corrupt})
    with pytest.raises(PipelineError, match=r"file1\.gz: checksum mismatch"):
        download.main()
    assert files_under(stage_dir / "data") == []  # not even the good file0: data/raw is all or nothing


def test_stage_keeps_the_previous_download_when_a_new_one_fails(web, stage_dir):
    raw = stage_dir / "data/raw"
    raw.mkdir(parents=True)
    for name, data in GOOD.items():
        (raw / f"{name}.gz").write_bytes(data)
    with pytest.raises(PipelineError, match=r"could not get file0\.gz.*set MNIST_MIRROR to a URL"):
        download.main()  # every route is a 404
    assert files_under(stage_dir / "data") == ["raw", "raw/file0.gz", "raw/file1.gz"]
    assert all((raw / f"{name}.gz").read_bytes() == data for name, data in GOOD.items())


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MNIST_TIMEOUT", "soon", "MNIST_TIMEOUT must be a positive number of seconds, got 'soon'"),
        ("MNIST_TIMEOUT", "0", "MNIST_TIMEOUT must be a positive number of seconds, got '0'"),
        ("MNIST_TIMEOUT", "nan", "MNIST_TIMEOUT must be a positive number of seconds, got 'nan'"),
        ("MNIST_RETRIES", "-1", "MNIST_RETRIES must be a non-negative integer, got '-1'"),
        ("MNIST_RETRIES", "1.5", "MNIST_RETRIES must be a non-negative integer, got '1.5'"),
    ],
)
def test_bad_environment_variable(stage_dir, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(PipelineError) as e:
        download.main()
    assert str(e.value) == message


# --- as a process: one line, no traceback, non-zero exit ------------------------------------------


def stage_copy(tmp_path):
    work = tmp_path / "work"
    (work / "stages").mkdir(parents=True)
    for name in ("common.py", "download.py"):
        (work / "stages" / name).write_bytes((ROOT / "stages" / name).read_bytes())
    shutil.copytree(ROOT / "stages" / "checksums", work / "stages" / "checksums")
    shutil.copy2(ROOT / "params.yaml", work / "params.yaml")
    return work


def test_process_with_unreachable_mirror_fails_in_one_line(web, tmp_path):
    work = stage_copy(tmp_path)
    env = {"MNIST_MIRROR": web.url("nothing-here"), "MNIST_RETRIES": "0", "MNIST_TIMEOUT": "2"}
    proc = run([sys.executable, "-m", "stages.download"], work, check=False, env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    url = f"{web.url('nothing-here')}train-images-idx3-ubyte.gz"
    assert proc.stderr.strip().splitlines() == [
        f"error: could not get train-images-idx3-ubyte.gz; tried {url}: HTTP 404. "
        "set MNIST_MIRROR to a URL or directory holding the four .gz files"
    ]
    assert files_under(work / "data") == []


def test_process_fetches_fashion_mnist_from_its_own_mirror_variable(web, tmp_path):
    """data.dataset picks the files' checksums and the mirror variable; MNIST_MIRROR is not consulted."""
    work = stage_copy(tmp_path)
    set_params(work, {"data.dataset": "fashion-mnist"})
    env = {
        "MNIST_MIRROR": web.url("mnist"),
        "FASHION_MNIST_MIRROR": web.url("fashion"),
        "FASHION_MNIST_RETRIES": "0",
    }
    proc = run([sys.executable, "-m", "stages.download"], work, check=False, env=env)
    url = f"{web.url('fashion')}train-images-idx3-ubyte.gz"
    assert proc.stderr.strip().splitlines() == [
        f"error: could not get train-images-idx3-ubyte.gz; tried {url}: HTTP 404. "
        "set FASHION_MNIST_MIRROR to a URL or directory holding the four .gz files"
    ]
    assert web.hits == {"/fashion/train-images-idx3-ubyte.gz": 1}


def test_process_terminated_mid_download_leaves_nothing(web, tmp_path):
    """SIGTERM while a mirror stalls: one 'interrupted' line, and no data/raw at all."""
    web.routes["/slow/train-images-idx3-ubyte.gz"] = "stall"
    work = stage_copy(tmp_path)
    env = {**os.environ, "MNIST_MIRROR": web.url("slow"), "MNIST_TIMEOUT": "30"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.download"], cwd=work, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        for _ in range(200):
            if web.hits:
                break
            time.sleep(0.05)
        assert web.hits, "the stage never reached the server"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: download stopped; no partial output kept, `dvc repro` redoes it"
    )
    assert files_under(work / "data") == []
