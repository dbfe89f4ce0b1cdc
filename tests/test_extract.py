import builtins
import gzip
import hashlib
import io
import os
import random
import re
import http.server
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

import fmnist.extract as extract_module
from fmnist.errors import DataError, OutputError, PipelineError, SourceError
from fmnist.extract import FILES, SHA256, SIZES, Source, compressed_cap, extract, gunzip, sources_from_env

from .conftest import ROOT, free_port, write_raw

STAGE = str(ROOT / "stages" / "extract.py")


@contextmanager
def loopback(handler: type[http.server.BaseHTTPRequestHandler]):
    """Serve ``handler`` on a free loopback port; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)  # quick shutdown
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve(folder: Path, fail_first: int = 0, content_length: bool = True):
    """A loopback HTTP server over ``folder``; the first ``fail_first`` requests get HTTP 503.

    Without ``content_length`` the body just runs until the connection closes (as HTTP/1.0 allows).
    """
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

        def send_header(self, keyword, value):
            if content_length or keyword.lower() != "content-length":
                super().send_header(keyword, value)

        def log_message(self, *args):
            pass

    with loopback(Handler) as url:
        yield url, state


def mirror_with(mirror: Path, folder: Path, **replace: bytes) -> Path:
    """A mirror folder of links to the real files, with ``replace`` (``train_labels=...``) swapped in."""
    folder.mkdir()
    for name in FILES:
        key = name.split("-idx")[0].replace("t10k", "test").replace("-", "_")
        if key in replace:
            (folder / name).write_bytes(replace[key])
        else:
            (folder / name).symlink_to(mirror / name)
    return folder


def run_stage(env: dict, *args: str, prelude: str = "") -> tuple[subprocess.CompletedProcess, int]:
    """Run the extract stage in a child Python; returns the process and its own peak RSS in bytes.

    The peak is the child's VmHWM: ru_maxrss would count this test process too, since a child
    started with vfork carries the parent's peak through exec.
    """
    child = (
        "import re, resource, runpy, sys\n" + prelude + "\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n"
        "    status = open('/proc/self/status').read()\n"
        "    print(re.search(r'VmHWM:\\s*(\\d+) kB', status).group(1))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", child, STAGE, *args], env={"PATH": "", **env},
        capture_output=True, text=True, timeout=120,
    )
    return proc, int(proc.stdout.split()[-1]) * 1024


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """512 MiB of zeros as eight gzip members of 64 MiB: 0.5 MB on disk, built in about 0.2 s."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    member = b"".join(c.compress(block) for _ in range(64)) + c.flush()
    return member * 8


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/"


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


@pytest.mark.parametrize("name", FILES)
def test_sha256_check_covers_each_file_and_a_mismatch_leaves_no_output(mirror, tmp_path, name):
    """One bit of one file's content flipped, as a valid gzip of the right size: only the hash can tell."""
    content = bytearray(gzip.decompress((mirror / name).read_bytes()))
    content[-1] ^= 1
    key = name.split("-idx")[0].replace("t10k", "test").replace("-", "_")
    folder = mirror_with(mirror, tmp_path / "copy", **{key: gzip.compress(bytes(content), compresslevel=1)})
    with pytest.raises(DataError) as e:
        extract(tmp_path / "raw", [Source(str(folder))])
    digest = hashlib.sha256(content).hexdigest()
    assert str(e.value) == (
        f"{name}: SHA-256 mismatch for the file from {folder / name} (expected {SHA256[name]}, got {digest})"
    )
    assert not (tmp_path / "raw").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no staging folder left behind


@pytest.mark.parametrize(
    "payload, expected",
    [
        (gzip.compress(random.Random(0).randbytes(5000), mtime=0)[:-40], "truncated gzip"),
        (b"", "empty file"),
        (b"this is not gzip at all", "not a gzip file"),
    ],
    ids=("truncated", "empty", "not-gzip"),  # every xdist worker must collect the same test names
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

    class Short(Quiet):
        def do_GET(self):
            calls["n"] += 1
            body = (mirror / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if calls["n"] > 1 else body[: len(body) // 2])

    with loopback(Short) as url:
        extract(tmp_path / "raw", [Source(url)], retries=2, backoff=0)
    assert calls["n"] == 5  # one short answer, then the four files
    assert all((tmp_path / "raw" / f).read_bytes() == (mirror / f).read_bytes() for f in FILES)


# --- bounded sizes -------------------------------------------------------------------------------


def test_importing_extract_does_not_import_torch():
    """The extract stage's memory is that of a small Python process, not of torch."""
    code = "import sys, fmnist.extract; print('torch' in sys.modules, 'numpy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"]


def test_decompressed_sizes_and_compressed_caps_fit_the_mirror(mirror):
    official_gz = {"train-images-idx3-ubyte.gz": 26_421_880, "t10k-images-idx3-ubyte.gz": 4_422_102}  # see its README
    for name in FILES:
        content = gzip.decompress((mirror / name).read_bytes())
        assert len(content) == SIZES[name]
        assert max((mirror / name).stat().st_size, official_gz.get(name, 0)) < compressed_cap(SIZES[name])
        assert len(gzip.compress(content, compresslevel=0)) < compressed_cap(SIZES[name])  # even stored as is


@pytest.mark.parametrize("where", ["http", "folder"])
def test_gzip_bomb_is_refused_in_one_line_with_bounded_memory(mirror, bomb, tmp_path, where):
    """512 MiB of zeros as train-labels: the stage streams it and stops at the file's 60,008 bytes."""
    folder = mirror_with(mirror, tmp_path / "bombed", train_labels=bomb)
    out = tmp_path / "raw"
    with serve(folder, content_length=False) as (url, state):  # no size announced: it has to stream
        source = url if where == "http" else str(folder)
        proc, peak = run_stage({"FMNIST_MIRROR": source}, "--out", str(out))
    origin = Source(source).describe("train-labels-idx1-ubyte.gz")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: train-labels-idx1-ubyte.gz (from {origin}): decompresses to more than 60008 bytes, "
        "the most it may hold (a gzip bomb, or not this file)"
    )
    assert "Traceback" not in proc.stderr
    assert peak < 300 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bombed"]
    if where == "http":
        assert state["requests"] == 2  # train-images, then the bomb once: never retried


def test_gzip_bomb_announced_by_its_size_is_refused_before_download(mirror, bomb, tmp_path):
    folder = mirror_with(mirror, tmp_path / "bombed", train_labels=bomb)
    with serve(folder) as (url, _):
        with pytest.raises(DataError) as e:
            extract(tmp_path / "raw", [Source(url)], backoff=0)
    assert str(e.value) == (
        f"train-labels-idx1-ubyte.gz (from {url}train-labels-idx1-ubyte.gz): announced as {len(bomb)} bytes, "
        "more than any gzip of 60008 bytes needs (not this file)"
    )


def test_gzip_bomb_as_the_images_file_stops_at_the_official_size(bomb, tmp_path):
    """It fits the compressed cap of the images file, so only the decompressed cap can stop it."""
    assert len(bomb) < compressed_cap(SIZES["train-images-idx3-ubyte.gz"])
    fake = write_raw(tmp_path / "fake", train_images_idx3_ubyte_gz=bomb)
    with pytest.raises(DataError, match=r"^train-images-idx3-ubyte.gz \(from .*\): decompresses to more than 47040016 bytes"):
        extract(tmp_path / "raw", [Source(str(fake))])
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    "tail, expected",
    [
        (b"\0" * compressed_cap(60008), r"over 133982 bytes, more than any gzip of 60008 bytes needs \(not this file\)$"),
        (b"junk", r"corrupt gzip data \(unexpected bytes after the end of the compressed data\)"),
    ],
    ids=["zero-padding-past-the-cap", "junk"],
)
def test_valid_file_followed_by_more_bytes_is_refused(mirror, tmp_path, tail, expected):
    """gzip allows zero padding after a member, so only the cap stops a file padded without end."""
    assert compressed_cap(60008) == 133982
    labels = (mirror / "train-labels-idx1-ubyte.gz").read_bytes()
    folder = mirror_with(mirror, tmp_path / "padded", train_labels=labels + tail)
    with serve(folder, content_length=False) as (url, state):
        with pytest.raises(DataError, match=r"^train-labels-idx1-ubyte.gz \(from .*\): " + expected) as e:
            extract(tmp_path / "raw", [Source(url)], backoff=0)
    assert "\n" not in str(e.value)
    assert state["requests"] == 2


def test_multi_member_gzip_with_zero_padding_verifies(mirror, tmp_path):
    """Mirrors may re-compress in pieces (bgzip, pigz --independent): one stream of several members."""
    content = gzip.decompress((mirror / "train-labels-idx1-ubyte.gz").read_bytes())
    pieces = b"".join(gzip.compress(content[i : i + 7000]) + b"\0" * 3 for i in range(0, len(content), 7000))
    folder = mirror_with(mirror, tmp_path / "pieces", train_labels=pieces)
    origins = extract(tmp_path / "raw", [Source(str(folder))])
    assert origins["train-labels-idx1-ubyte.gz"] == str(folder / "train-labels-idx1-ubyte.gz")


def test_gunzip_refuses_output_beyond_the_official_size(tmp_path):
    """data/raw can be edited by hand: the transform stage must not decompress a bomb either."""
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(60008)))
    assert gunzip(path) == bytes(60008)
    path.write_bytes(gzip.compress(bytes(60009)))
    with pytest.raises(DataError, match=r"^train-labels-idx1-ubyte.gz: decompresses to more than 60008 bytes"):
        gunzip(path)
    other = tmp_path / "other.gz"
    other.write_bytes(gzip.compress(b"12345"))
    assert gunzip(other, max_size=5) == b"12345"
    with pytest.raises(DataError, match="more than 4 bytes"):
        gunzip(other, max_size=4)
    with pytest.raises(ValueError, match="give its max_size"):
        gunzip(other)


def test_transform_refuses_a_hand_replaced_bomb(bomb, tmp_path):
    from fmnist.data import transform
    from fmnist.params import DataParams

    raw = write_raw(tmp_path / "raw", train_images_idx3_ubyte_gz=bomb)
    with pytest.raises(DataError, match=r"^train-images-idx3-ubyte.gz: decompresses to more than 47040016 bytes"):
        transform(raw, tmp_path / "processed", DataParams(val_size=10))


# --- redirects -----------------------------------------------------------------------------------


@contextmanager
def redirector(target):
    """A loopback server that answers every GET with HTTP 302 to ``target(path)``."""
    state = {"requests": 0}

    class Redirect(Quiet):
        def do_GET(self):
            state["requests"] += 1
            self.send_response(302)
            self.send_header("Location", target(self.path))
            self.send_header("Content-Length", "0")
            self.end_headers()

    with loopback(Redirect) as url:
        yield url, state


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/pub/x.gz", "data:,hello"])
def test_redirect_to_a_non_http_url_is_refused_and_the_next_source_used(mirror, tmp_path, target):
    with redirector(lambda path: target) as (url, state):
        origins = extract(tmp_path / "raw", [Source(url), Source(str(mirror))], retries=3, backoff=0)
        assert state["requests"] == 4  # one per file: a refusal is not retried
        assert all(o.startswith(str(mirror)) for o in origins.values())
        with pytest.raises(SourceError) as e:
            extract(tmp_path / "raw2", [Source(url)], backoff=0)
    assert str(e.value) == (
        f"train-images-idx3-ubyte.gz: no source could provide it; {url}train-images-idx3-ubyte.gz "
        f"redirected to {target}, which is not an http(s) URL"
    )


def test_redirect_from_http_to_http_is_followed(mirror, tmp_path):
    with serve(mirror) as (real, served), redirector(lambda path: real + path.lstrip("/")) as (url, state):
        origins = extract(tmp_path / "raw", [Source(url)], backoff=0)
    assert state["requests"] == served["requests"] == 4
    assert all(o.startswith(url) for o in origins.values())
    assert all((tmp_path / "raw" / f).read_bytes() == (mirror / f).read_bytes() for f in FILES)


def test_redirect_from_https_to_plain_http_is_refused():
    """A download that starts over https never continues in the clear (the handler, without a TLS server)."""
    req = urllib.request.Request("https://mirror.example/train-images-idx3-ubyte.gz")
    with pytest.raises(extract_module._Refused) as e:
        extract_module._Redirects().http_error_302(req, io.BytesIO(), 302, "Found",
                                                   {"location": "http://mirror.example/x.gz"})
    assert str(e.value) == "redirected to http://mirror.example/x.gz, which is not an https URL"


def test_redirect_loop_is_cut_after_five_redirects(tmp_path):
    with redirector(lambda path: path) as (url, state):  # a relative Location: the same URL again
        with pytest.raises(SourceError, match=r"redirected more than 5 times$") as e:
            extract(tmp_path / "raw", [Source(url)], retries=3, backoff=0)
    assert state["requests"] == 6
    assert "\n" not in str(e.value)


# --- deadline ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_server_trickling_bytes_is_cut_off_by_the_deadline(tmp_path, where):
    """A byte every 0.2 s never trips the 60 s read timeout; the 1 s deadline ends each attempt."""
    state = {"requests": 0}
    gz = gzip.compress(os.urandom(1000))

    class Trickle(Quiet):
        def do_GET(self):
            state["requests"] += 1
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(gz)}\r\n".encode()
            if where == "headers":
                slow, head = head + b"X-Slow: " + b"a" * 1000, b""
            else:
                slow, head = gz, head + b"\r\n"
            try:
                self.wfile.write(head)
                for i in range(100):  # at most 20 s, should the client never hang up
                    self.wfile.write(slow[i : i + 1])
                    time.sleep(0.2)
            except OSError:
                pass

    start = time.monotonic()
    with loopback(Trickle) as url:
        with pytest.raises(SourceError) as e:
            extract(tmp_path / "raw", [Source(url)], retries=2, backoff=0, deadline=1)
    elapsed = time.monotonic() - start
    assert str(e.value).endswith("after 2 attempts (deadline of 1 s per download exceeded)")
    assert state["requests"] == 2
    assert elapsed < 5
    assert not (tmp_path / "raw").exists()


# --- local file system faults --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["http", "folder"])
def test_disk_full_is_one_line_naming_the_output_and_never_retried(mirror, tmp_path, monkeypatch, where):
    def full_disk_open(path, mode="r", *args, **kwargs):  # the staging file lands on /dev/full
        return builtins.open("/dev/full" if "w" in mode else path, mode, *args, **kwargs)

    monkeypatch.setattr(extract_module, "open", full_disk_open, raising=False)
    with serve(mirror) as (url, state):
        with pytest.raises(PipelineError) as e:
            extract(tmp_path / "raw", [Source(url if where == "http" else str(mirror))], retries=3, backoff=0)
    assert type(e.value) is OutputError  # not a SourceError: no other source is tried either
    assert str(e.value) == f"{tmp_path / 'raw' / 'train-images-idx3-ubyte.gz'}: cannot write (No space left on device)"
    assert state["requests"] == (1 if where == "http" else 0)
    assert list(tmp_path.iterdir()) == []


def test_stage_stops_on_a_file_size_limit_after_one_attempt(mirror, tmp_path):
    """A real write failure (EFBIG from RLIMIT_FSIZE) in the stage: one request, one line, exit 1."""
    limit = (
        "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # fail the write, do not kill
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))"
    )
    out = tmp_path / "raw"
    with serve(mirror) as (url, state):
        proc, _ = run_stage({"FMNIST_MIRROR": url}, "--out", str(out), "--retries", "3", prelude=limit)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {out / 'train-images-idx3-ubyte.gz'}: cannot write (File too large)"], proc.stderr
    assert state["requests"] == 1
    assert list(tmp_path.iterdir()) == []
