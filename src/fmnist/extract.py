"""Extract: fetch the four official Fashion-MNIST files, verified by the SHA-256 of their contents.

Sources are tried in order: the mirror named by ``FMNIST_MIRROR`` (a folder or a URL base), then
the official download location. A source that cannot be reached or lacks a file gives way to the
next; wrong content (hash mismatch, corrupt gzip, over a size cap) and a failing local disk stop
everything, as no other source can help. Each file streams through ``gzip`` in chunks, capped and
hashed, into a staging folder that becomes the output only when all four files verify.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from tqdm import tqdm

from .errors import DataError, OutputError, PipelineError, SourceError
from .fileio import atomic_dir, os_reason

log = logging.getLogger(__name__)

MIRROR_ENV = "FMNIST_MIRROR"
# Zalando's own copies, tried in order: their repository over https, then the S3 website that
# torchvision downloads from (plain http; the SHA-256 check is what vouches for the bytes).
OFFICIAL_URLS = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                 "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
# SHA-256 of the *decompressed* bytes: it holds for the official .gz files and for re-compressed mirrors.
SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FILES = tuple(SHA256)
# Exact decompressed sizes in bytes (IDX header + payload), fixed by the hashes above.
SIZES = {
    "train-images-idx3-ubyte.gz": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte.gz": 8 + 60_000,
    "t10k-images-idx3-ubyte.gz": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte.gz": 8 + 10_000,
}
CHUNK = 1 << 16  # most decompressed bytes held at a time
MAX_REDIRECTS = 5
REDIRECT_BODY_MAX = 1 << 16  # urllib reads a redirect's body whole before following it


def compressed_cap(size: int) -> int:
    """The most bytes any sane gzip of ``size`` decompressed bytes takes (mirrors may re-compress).

    n/8 + n/64 covers zlib's worst case (fixed Huffman codes), stored blocks and the framing of
    multi-member files; 64 KiB more covers the header's optional fields. A bomb is small when
    compressed: the decompressed cap is the one that stops it.
    """
    return size + size // 8 + size // 64 + (1 << 16)


@dataclass(frozen=True)
class Source:
    """A folder on disk or a URL base that holds the four files under their official names."""

    location: str

    @property
    def is_url(self) -> bool:
        return self.location.startswith(("http://", "https://", "file://"))

    def describe(self, name: str) -> str:
        return self.location.rstrip("/") + "/" + name if self.is_url else str(Path(self.location) / name)


def sources_from_env(environ=os.environ, official=OFFICIAL_URLS) -> list[Source]:
    """The mirror from ``FMNIST_MIRROR`` (if set) followed by the official locations.

    A mirror set but empty, or naming a missing folder, is a mistake to hear about at once rather
    than have silently replaced by a download.
    """
    if MIRROR_ENV not in environ:
        return [Source(u) for u in official]
    mirror = Source(environ[MIRROR_ENV].strip())
    if not mirror.location:
        raise SourceError(f"{MIRROR_ENV} is set but empty: give a folder or a URL base, or unset it")
    if not mirror.is_url and not Path(mirror.location).is_dir():
        raise SourceError(f"{MIRROR_ENV}={mirror.location}: no such folder (give a folder or an http(s):// URL base)")
    return [mirror] + [Source(u) for u in official]


def _inflate(read: Callable[[int], bytes], label: str, max_size: int, sink=None, keep=None) -> str:
    """The SHA-256 of the content of the gzip stream that ``read(n)`` returns, or a one-line DataError.

    Compressed bytes are capped at ``compressed_cap(max_size)`` before ``sink`` sees them, and
    decompressed bytes at ``max_size`` before ``keep`` does: a bomb stops within a chunk. As for the
    gzip tool, several members in a row are one stream, and zero bytes may pad a member's end.
    """
    max_in, n_in, n_out, head, sha = compressed_cap(max_size), 0, 0, b"", hashlib.sha256()

    def counted(n: int) -> bytes:
        nonlocal n_in, head
        chunk = read(n)
        n_in, head = n_in + len(chunk), (head + chunk[:2])[:2]
        if n_in > max_in:
            raise DataError(f"{label}: over {max_in} bytes, more than any gzip of {max_size} bytes needs "
                            "(not this file)")
        if sink is not None:
            sink(chunk)
        return chunk

    try:
        with gzip.GzipFile(fileobj=SimpleNamespace(read=counted), mode="rb") as gz:
            while chunk := gz.read(CHUNK):
                if (n_out := n_out + len(chunk)) > max_size:
                    raise DataError(f"{label}: decompresses to more than {max_size} bytes, the most it may hold "
                                    "(a gzip bomb, or not this file)")
                sha.update(chunk)
                if keep is not None:
                    keep(chunk)
    except EOFError:
        raise DataError(f"{label}: truncated gzip file (ended before its end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        why = str(e)
        if why.startswith("Not a gzipped file"):  # a bad magic number: at the start, or after a member
            why = "unexpected bytes after the end of the compressed data" if head == b"\x1f\x8b" else ""
        raise DataError(f"{label}: corrupt gzip data ({why})" if why else f"{label}: not a gzip file") from None
    if n_in == 0:
        raise DataError(f"{label}: empty file")
    return sha.hexdigest()


def gunzip(path: Path, origin: str | None = None, *, max_size: int | None = None) -> bytes:
    """The decompressed bytes of a gzip file, or a one-line :class:`DataError` naming it.

    At most ``max_size`` bytes (by default the official size, for the four official names): a file
    replaced by hand with something bigger is refused before it can fill memory.
    """
    path = Path(path)
    if max_size is None and path.name not in SIZES:
        raise ValueError(f"{path.name}: not an official Fashion-MNIST file name, so give its max_size")
    parts: list[bytes] = []
    try:
        with open(path, "rb") as f:
            label = f"{path.name} (from {origin})" if origin else path.name
            _inflate(f.read, label, SIZES[path.name] if max_size is None else max_size, keep=parts.append)
    except OSError as e:
        raise PipelineError(f"{path}: {os_reason(e)}") from None
    return b"".join(parts)


def _stage(read: Callable[[int], bytes], dest: Path, origin: str, total: int | None) -> str:
    """Stream ``read`` into the staging file ``dest`` through the caps; returns the content's SHA-256.

    Every ``read`` turns its own OSErrors into errors of the source, so an OSError here is the
    local disk's (full, read-only, too large): an :class:`OutputError`, never retried.
    """
    try:
        with open(dest, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=dest.name, disable=not sys.stderr.isatty(), leave=False) as bar:
            def sink(chunk: bytes) -> None:
                f.write(chunk)
                bar.update(len(chunk))

            return _inflate(read, f"{dest.name} (from {origin})", SIZES[dest.name], sink=sink)
    except OSError as e:
        raise OutputError(dest, os_reason(e)) from None


class _NetworkFault(Exception):
    """A failed download attempt worth retrying: connection, timeout, deadline, HTTP 5xx."""


class _Refused(Exception):
    """The source answered, but will not provide the file (HTTP 4xx, a bad redirect): no retry."""


class _Deadline(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http(s) handler for one download attempt, whose sockets all shut down after ``seconds``.

    A per-read timeout never fires on a server that trickles a byte at a time, in the headers or
    the body; shutting the socket down ends whatever read is blocked on it.
    """

    def __init__(self, seconds: float):
        super().__init__()
        self.reason, self.expired, self._socks = f"deadline of {seconds:g} s per download exceeded", False, []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def do_open(self, http_class, req, **kwargs):
        def connection(*args, **kw) -> http.client.HTTPConnection:
            conn = http_class(*args, **kw)
            create = conn._create_connection  # http.client opens every socket with it, before TLS or a proxy tunnel
            conn._create_connection = lambda *a, **k: self._watch(create(*a, **k))
            return conn

        return super().do_open(connection, req, **kwargs)

    def _watch(self, sock: socket.socket) -> socket.socket:
        self._socks.append(sock.dup())  # a descriptor of its own: never reused while the timer may act on it
        if self.expired:
            self._expire()
        return sock

    def _expire(self) -> None:
        self.expired = True
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._timer.cancel()
        for sock in self._socks:
            sock.close()


class _Redirects(urllib.request.HTTPRedirectHandler):
    """At most MAX_REDIRECTS redirects, to http(s) only (urllib follows ftp) and never from https to http."""

    max_redirections = max_repeats = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, (headers.get("location") or headers.get("uri") or "").strip())
        scheme = urllib.parse.urlsplit(target).scheme.lower()
        why = None
        if scheme not in ("http", "https") or (scheme == "http" and req.type == "https"):
            why = f"redirected to {target}, which is not an {'https' if req.type == 'https' else 'http(s)'} URL"
        elif len(fp.read(REDIRECT_BODY_MAX + 1)) > REDIRECT_BODY_MAX:  # the base class reads the rest whole
            why = f"sent a redirect with a body over {REDIRECT_BODY_MAX} bytes"
        if why:
            fp.close()
            raise _Refused(why)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _download(url: str, dest: Path, *, timeout: float, deadline: float) -> str:
    """One attempt at ``url``; returns the SHA-256 of the decompressed bytes.

    Raises :class:`_NetworkFault` to retry, :class:`_Refused` for the next source,
    :class:`DataError` or :class:`OutputError` to stop.
    """
    name, limit = dest.name, _Deadline(deadline)

    def fault(e: BaseException) -> _NetworkFault:
        return _NetworkFault(limit.reason if limit.expired else _one_line(getattr(e, "reason", e)) or type(e).__name__)

    try:
        try:
            resp = urllib.request.build_opener(limit, _Redirects()).open(url, timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code >= 500:
                raise _NetworkFault(f"HTTP {e.code} {_one_line(e.reason)}") from None
            if str(e.reason).startswith(_Redirects.inf_msg):
                raise _Refused(f"redirected more than {MAX_REDIRECTS} times") from None
            raise _Refused(f"answered HTTP {e.code} {_one_line(e.reason)}") from None
        except (OSError, http.client.HTTPException) as e:
            raise fault(e) from None
        with resp:
            length = resp.headers.get("Content-Length", "").strip()
            total = int(length) if length.isdigit() else None
            if total is not None and total > compressed_cap(SIZES[name]):
                raise DataError(f"{name} (from {url}): announced as {total} bytes, "
                                f"more than any gzip of {SIZES[name]} bytes needs (not this file)")
            received = 0

            def read(n: int) -> bytes:
                nonlocal received
                try:
                    chunk = resp.read(n)
                except (OSError, http.client.HTTPException) as e:
                    raise fault(e) from None
                received += len(chunk)
                # Before gzip calls a short file truncated: a deadline or a dropped connection cut it
                # short, and both are worth a retry.
                if limit.expired or (not chunk and total is not None and received != total):
                    raise _NetworkFault(limit.reason if limit.expired else
                                        f"connection closed after {received} of {total} bytes")
                return chunk

            return _stage(read, dest, url, total)
    finally:
        limit.close()


def fetch_one(
    source: Source, name: str, dest: Path, *, timeout: float, retries: int, backoff: float, deadline: float = 600.0,
) -> str:
    """Copy or download one file from ``source`` to ``dest``, checked as it streams.

    Returns the SHA-256 of its decompressed bytes; :class:`SourceError` if the source cannot
    provide it, :class:`DataError` if what it provides is corrupt or over a size cap.
    """
    origin = source.describe(name)
    if not source.is_url:
        def unreadable(e: OSError) -> SourceError:  # the mirror's fault, never taken for the disk's
            if isinstance(e, FileNotFoundError):
                return SourceError(f"{name}: not found in mirror folder {source.location}")
            return SourceError(f"{name}: cannot read {origin} ({os_reason(e)})")

        try:
            f = open(origin, "rb")
        except OSError as e:
            raise unreadable(e) from None

        def read(n: int) -> bytes:
            try:
                return f.read(n)
            except OSError as e:
                raise unreadable(e) from None

        with f:
            return _stage(read, dest, origin, os.fstat(f.fileno()).st_size)
    reason = "no attempt made"
    for attempt in range(1, max(retries, 1) + 1):
        try:
            return _download(origin, dest, timeout=timeout, deadline=deadline)
        except _Refused as e:
            raise SourceError(f"{name}: {origin} {e}") from None
        except _NetworkFault as e:
            reason = str(e)
        if attempt < retries:
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.0f s", origin, attempt, retries, reason, wait)
            time.sleep(wait)
    raise SourceError(f"{name}: cannot download {origin} after {retries} attempts ({reason})")


def extract(
    out_dir: str | os.PathLike, sources: list[Source], *,
    timeout: float = 60.0, retries: int = 3, backoff: float = 2.0, deadline: float = 600.0,
) -> dict[str, str]:
    """Fetch and verify the four files into ``out_dir``; returns file name -> where it came from.

    ``timeout`` bounds each network read and ``deadline`` each download attempt, both in seconds.
    Nothing appears in ``out_dir`` unless all four files verify.
    """
    if not sources:
        raise SourceError("no source to fetch Fashion-MNIST from")
    origins: dict[str, str] = {}
    with atomic_dir(out_dir) as staging:
        for name in FILES:
            failures = []
            for source in sources:
                try:
                    digest = fetch_one(source, name, staging / name, timeout=timeout, retries=retries,
                                       backoff=backoff, deadline=deadline)
                except SourceError as e:
                    failures.append(str(e).split(": ", 1)[1])
                    log.warning("%s", e)
                    continue
                origins[name] = source.describe(name)
                if digest != SHA256[name]:
                    raise DataError(f"{name}: SHA-256 mismatch for the file from {origins[name]} "
                                    f"(expected {SHA256[name]}, got {digest})")
                log.info("%s: verified, from %s", name, origins[name])
                break
            else:
                raise SourceError(f"{name}: no source could provide it; " + "; ".join(failures))
    return origins
