import gzip
import os
import re
import http.server
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from fmnist.errors import DataError, SourceError
from fmnist.extract import FILES, SHA256, Source, extract, sources_from_env

from .conftest import ROOT, write_raw


@contextmanager
def serve(folder: Path, fail_first: int = 0):
    """A loopback HTTP server over ``folder``; the first ``fail_first`` requests get HTTP 503."""
    state = {"requests": 0}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(folder), **kw)

        def do_GET(self):
            state["requests"] += 1
            if state["requests"] <= fail_first:
                self.send_error(503, "busy")
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", state
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_extract_from_mirror_folder_verifies_all_four_files(mirror, tmp_path):
    origins = extract(tmp_path / "raw", sources_from_env({"FMNIST_MIRROR": str(mirror)}, official=()))
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(FILES)
    assert set(origins) == set(FILES)
    assert all(o.startswith(str(mirror)) for o in origins.values())


def test_extract_downloads_from_official_urls_when_no_mirror(mirror, tmp_path):
    with serve(mirror) as (url, state):
        sources = sources_from_env({}, official=(url,))
        origins = extract(tmp_path / "raw", sources, backoff=0)
    assert state["requests"] == 4
    assert all(o.startswith(url) for o in origins.values())
    for name in FILES:
        assert (tmp_path / "raw" / name).read_bytes() == (mirror / name).read_bytes()


def test_extract_retries_a_busy_server(mirror, tmp_path):
    with serve(mirror, fail_first=2) as (url, state):
        extract(tmp_path / "raw", [Source(url)], retries=3, backoff=0)
    assert state["requests"] == 6  # two 503s, then four files


def test_mirror_url_base_is_tried_before_official(mirror, tmp_path):
    with serve(mirror) as (mirror_url, _), serve(tmp_path / "nowhere") as (official_url, official):
        sources = sources_from_env({"FMNIST_MIRROR": mirror_url}, official=(official_url,))
        assert [s.location for s in sources] == [mirror_url, official_url]
        extract(tmp_path / "raw", sources, backoff=0)
    assert official["requests"] == 0


def test_mirror_missing_a_file_falls_back_to_official(mirror, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / FILES[0]).write_bytes((mirror / FILES[0]).read_bytes())
    with serve(mirror) as (url, state):
        origins = extract(tmp_path / "raw", [Source(str(partial)), Source(url)], backoff=0)
    assert origins[FILES[0]].startswith(str(partial))
    assert state["requests"] == 3


def test_hash_mismatch_names_file_source_and_both_hashes_and_writes_nothing(tmp_path):
    fake = write_raw(tmp_path / "fake")  # valid gzip IDX files, but not Fashion-MNIST
    with pytest.raises(DataError) as e:
        extract(tmp_path / "raw", [Source(str(fake))])
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(fake) in msg
    assert SHA256["train-images-idx3-ubyte.gz"] in msg
    assert len(re.findall(r"\b[0-9a-f]{64}\b", msg)) == 2
    assert "\n" not in msg
    assert not (tmp_path / "raw").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fake"]  # no staging folder left behind


@pytest.mark.parametrize(
    "payload, expected",
    [
        (gzip.compress(os.urandom(5000))[:-40], "truncated gzip"),
        (b"", "empty file"),
        (b"this is not gzip at all", "not a gzip file"),
    ],
)
def test_corrupt_files_fail_with_one_line_naming_the_file(tmp_path, payload, expected):
    bad = write_raw(tmp_path / "bad", train_images_idx3_ubyte_gz=payload)
    with pytest.raises(DataError, match=expected) as e:
        extract(tmp_path / "raw", [Source(str(bad))])
    assert str(e.value).startswith("train-images-idx3-ubyte.gz")
    assert not (tmp_path / "raw").exists()


def test_unreachable_source_fails_naming_file_and_url(tmp_path):
    url = closed_port_url()
    with pytest.raises(SourceError) as e:
        extract(tmp_path / "raw", [Source(url)], retries=2, backoff=0)
    assert "train-images-idx3-ubyte.gz" in str(e.value) and url in str(e.value)
    assert "after 2 attempts" in str(e.value)
    assert not (tmp_path / "raw").exists()


def test_http_404_is_not_retried(tmp_path):
    with serve(tmp_path) as (url, state):
        with pytest.raises(SourceError, match="HTTP 404"):
            extract(tmp_path / "raw", [Source(url)], retries=3, backoff=0)
    assert state["requests"] == 1


@pytest.mark.parametrize("value, expected", [("", "set but empty"), ("/no/such/folder", "no such folder")])
def test_bad_mirror_setting_is_rejected_before_any_download(value, expected):
    with pytest.raises(SourceError, match=expected):
        sources_from_env({"FMNIST_MIRROR": value})


def test_failed_existing_output_is_left_untouched(mirror, tmp_path):
    out = tmp_path / "raw"
    extract(out, [Source(str(mirror))])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(DataError):
        extract(out, [Source(str(write_raw(tmp_path / "fake")))])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_stage_reports_bad_mirror_as_one_line_and_exit_1(tmp_path):
    out = tmp_path / "raw"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "extract.py"), "--out", str(out)],
        env={"FMNIST_MIRROR": str(tmp_path / "missing"), "PATH": ""},
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: FMNIST_MIRROR={tmp_path / 'missing'}: no such folder (give a folder or an http(s):// URL base)"]
    assert not out.exists()


def test_a_download_cut_short_is_retried(mirror, tmp_path):
    """A server that closes the connection early on the first request: the retry gets the whole file."""
    calls = {"n": 0}

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            calls["n"] += 1
            body = (mirror / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if calls["n"] > 1 else body[: len(body) // 2])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        extract(tmp_path / "raw", [Source(url)], retries=2, backoff=0)
    finally:
        server.shutdown()
        server.server_close()
    assert calls["n"] == 5  # one short answer, then the four files
    assert all((tmp_path / "raw" / f).read_bytes() == (mirror / f).read_bytes() for f in FILES)
