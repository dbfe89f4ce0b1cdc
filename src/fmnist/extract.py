"""Extract: fetch the four official Fashion-MNIST files, verified by the SHA-256 of their contents.

Sources are tried in order: the mirror named by ``FMNIST_MIRROR`` (a local folder or a URL base),
then the official download locations. A source that cannot be reached or lacks a file gives way
to the next; a file whose content is wrong (hash mismatch, corrupt gzip, over its size cap) stops
everything, since that is never a network hiccup. A full disk or any other failure of the local
file system also stops everything, as no other source can help with it.

Each file streams in chunks to the staging folder while it is decompressed and hashed, so memory
stays small whatever a source serves: no file, compressed or not, is ever held whole. Files are
moved into place only when all four verify.
"""

from __future__ import annotations

import contextlib
import functools
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import DataError, OutputError, PipelineError, SourceError
from .fileio import atomic_dir, os_reason

log = logging.getLogger(__name__)

MIRROR_ENV = "FMNIST_MIRROR"
OFFICIAL_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

# SHA-256 of the *decompressed* bytes: it holds for the official .gz files and for re-compressed mirrors.
SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FILES = tuple(SHA256)

# Exact decompressed sizes in bytes (IDX header + payload), fixed by the hashes above, so the same
# for every mirror: 16 + 60000*28*28, 8 + 60000, 16 + 10000*28*28, 8 + 10000.
SIZES = {
    "train-images-idx3-ubyte.gz": 47_040_016,
    "train-labels-idx1-ubyte.gz": 60_008,
    "t10k-images-idx3-ubyte.gz": 7_840_016,
    "t10k-labels-idx1-ubyte.gz": 10_008,
}

CHUNK = 1 << 16  # bytes read from a source at a time
OUT_CHUNK = 1 << 18  # most decompressed bytes produced at a time: a 64 KiB chunk of zeros inflates to 64 MiB
MAX_REDIRECTS = 5
REDIRECT_BODY_MAX = 1 << 16  # urllib reads a redirect's body whole before following it


def compressed_cap(size: int) -> int:
    """The most bytes any sane gzip of ``size`` decompressed bytes takes (mirrors may re-compress).

    zlib's deflateBound() gives the worst case over every compression setting: about 12.9 % over
    the input (fixed Huffman codes, 9-bit literals). Stored blocks, what encoders fall back to on
    data that does not compress, cost 5 bytes a block: 4 % at worst with zlib's smallest blocks.
    n/8 + n/64 (14.1 %) covers both, with room for the framing of multi-member files (bgzip: 26
    bytes per 64 KiB member); 64 KiB more covers the gzip header (10 bytes plus an optional name,
    comment and extra field). A bomb has a tiny compressed size, so this cap alone does not stop
    one; the decompressed cap does.
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
        if self.is_url:
            return self.location.rstrip("/") + "/" + name
        return str(Path(self.location) / name)


def sources_from_env(environ=os.environ, official=OFFICIAL_URLS) -> list[Source]:
    """The mirror from ``FMNIST_MIRROR`` (if set) followed by the official locations.

    A mirror that is set but empty, or names a folder that does not exist, is a mistake the user
    should hear about at once rather than have silently replaced by a download.
    """
    sources = []
    if MIRROR_ENV in environ:
        mirror = environ[MIRROR_ENV].strip()
        if not mirror:
            raise SourceError(f"{MIRROR_ENV} is set but empty: give a folder or a URL base, or unset it")
        src = Source(mirror)
        if not src.is_url and not Path(mirror).is_dir():
            raise SourceError(f"{MIRROR_ENV}={mirror}: no such folder (give a folder or an http(s):// URL base)")
        sources.append(src)
    sources.extend(Source(u) for u in official)
    return sources


class Inflater:
    """Decompresses a gzip stream fed chunk by chunk: SHA-256 of the output, both sizes capped.

    Follows Python's ``gzip`` module: several members in a row are one stream, zero bytes may pad
    the end of a member, anything else after a member is an error. Every failure is a one-line
    :class:`DataError` starting with ``label``.
    """

    def __init__(self, label: str, max_out: int, max_in: int, sink: Callable[[bytes], object] | None = None):
        self.label, self.max_out, self.max_in, self._sink = label, max_out, max_in, sink
        self.n_in = self.n_out = 0
        self._sha = hashlib.sha256()
        self._member: zlib._Decompress | None = None  # None between members
        self._head = b""  # the first bytes of a member, held until the gzip magic can be checked
        self._members = 0

    def too_big(self, announced: int | None = None) -> DataError:
        size = f"announced as {announced} bytes" if announced is not None else f"over {self.max_in} bytes"
        return DataError(
            f"{self.label}: {size}, more than any gzip of {self.max_out} bytes needs (not this file)"
        )

    def feed(self, data: bytes) -> None:
        self.n_in += len(data)
        if self.n_in > self.max_in:
            raise self.too_big()
        while data:
            if self._member is None:
                if self._members:
                    data = data.lstrip(b"\0")
                    if not data:
                        return
                data, self._head = self._head + data, b""
                if len(data) < 2:
                    self._head = data
                    return
                if data[:2] != b"\x1f\x8b":
                    raise self._junk()
                self._member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
            data = self._inflate(data)

    def _inflate(self, data: bytes) -> bytes:
        """Feed ``data`` to the current member; returns what follows the member's end, if it ends."""
        member = self._member
        try:
            while True:
                out = member.decompress(data, OUT_CHUNK)
                if out:
                    self.n_out += len(out)
                    if self.n_out > self.max_out:
                        raise DataError(
                            f"{self.label}: decompresses to more than {self.max_out} bytes, the most it may "
                            "hold (a gzip bomb, or not this file)"
                        )
                    self._sha.update(out)
                    if self._sink is not None:
                        self._sink(out)
                data = member.unconsumed_tail
                if member.eof:
                    self._member, self._members = None, self._members + 1
                    return member.unused_data
                if not data and len(out) < OUT_CHUNK:  # a full OUT_CHUNK may leave output pending
                    return b""
        except zlib.error as e:
            raise DataError(f"{self.label}: corrupt gzip data ({e})") from None

    def _junk(self) -> DataError:
        if self._members:
            return DataError(f"{self.label}: corrupt gzip data (unexpected bytes after the end of the compressed data)")
        return DataError(f"{self.label}: not a gzip file")

    def finish(self) -> str:
        """The hex SHA-256 of the decompressed bytes, once the stream has ended where gzip may end."""
        if self.n_in == 0:
            raise DataError(f"{self.label}: empty file")
        if self._head:
            raise self._junk()
        if self._member is not None:
            raise DataError(f"{self.label}: truncated gzip file (ended before its end-of-stream marker)")
        return self._sha.hexdigest()


def _inflater_for(name: str, origin: str | None, max_size: int | None = None, sink=None) -> Inflater:
    if max_size is None:
        if name not in SIZES:
            raise ValueError(f"{name}: not an official Fashion-MNIST file name, so give its max_size")
        max_size = SIZES[name]
    label = f"{name} (from {origin})" if origin else name
    return Inflater(label, max_out=max_size, max_in=compressed_cap(max_size), sink=sink)


def gunzip(path: Path, origin: str | None = None, *, max_size: int | None = None) -> bytes:
    """The decompressed bytes of a gzip file, or a one-line :class:`DataError` naming it.

    At most ``max_size`` bytes (by default the official size, for the four official names): a file
    replaced by hand with something bigger is refused before it can fill memory.
    """
    path = Path(path)
    parts: list[bytes] = []
    inflater = _inflater_for(path.name, origin, max_size, sink=parts.append)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                inflater.feed(chunk)
    except OSError as e:
        raise PipelineError(f"{path}: {e.strerror or e}") from None
    inflater.finish()
    return b"".join(parts)


def _progress(total: int | None, name: str):
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
        disable=not sys.stderr.isatty(), leave=False,
    )


class _Staging:
    """A staging file, open for writing.

    Its OSErrors are the local file system's (disk full, read-only, permission denied): an
    :class:`OutputError` (one line; ``atomic_dir`` names the output it becomes), never mistaken
    for a network fault and retried.
    """

    def __init__(self, path: Path):
        self.path = path
        self._f = self._local(open, path, "wb")

    def _local(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise OutputError(self.path, os_reason(e)) from None

    def write(self, data: bytes) -> None:
        self._local(self._f.write, data)

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self._local(self._f.close)  # flushes: a full disk may only show here
        else:
            with contextlib.suppress(OSError):  # the error already on its way is the one to report
                self._f.close()


def _stream(chunks: Iterator[bytes], dest: Path, inflater: Inflater, progress) -> str:
    """Write ``chunks`` to ``dest`` while ``inflater`` checks and hashes them; returns the hash."""
    with _Staging(dest) as out:
        for chunk in chunks:
            inflater.feed(chunk)  # first: nothing past a cap reaches the disk
            out.write(chunk)
            progress.update(len(chunk))
    return inflater.finish()


class _NetworkFault(Exception):
    """A failed download attempt worth retrying: connection, timeout, deadline, HTTP 5xx."""


class _Refused(Exception):
    """The source answered, but will not provide the file (HTTP 4xx, a bad redirect): no retry."""


class _Deadline:
    """Cuts every connection of one download attempt once ``seconds`` have passed.

    A per-read timeout never fires on a server that trickles a byte at a time, in the headers or
    the body. A timer shuts the sockets down, which ends whatever read is blocked on them.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            # A duplicate: TLS wrapping detaches the original object, and shutdown() acts on the
            # connection that both share.
            self._socks.append(sock.dup())
            if self.expired:
                self._shutdown(self._socks[-1])
        return sock

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                self._shutdown(sock)

    def check(self) -> None:
        if self.expired or time.monotonic() > self._end:
            raise _NetworkFault(self.reason)

    @property
    def reason(self) -> str:
        return f"deadline of {self.seconds:g} s per download exceeded"

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks.clear()


class _Watched:
    """Mixin for http.client connections: every socket they open is handed to a :class:`_Deadline`."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        # http.client opens every socket (plain, TLS, proxy tunnel) through this attribute.
        create = self._create_connection
        self._create_connection = lambda *a, **kw: deadline.watch(create(*a, **kw))


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, deadline=self._deadline), req)


if hasattr(http.client, "HTTPSConnection"):  # Python built without ssl: no https at all

    class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
        pass

    class _HTTPSHandler(urllib.request.HTTPSHandler):
        def __init__(self, deadline: _Deadline):
            super().__init__()
            self._deadline = deadline

        def https_open(self, req):
            return self.do_open(functools.partial(_WatchedHTTPS, deadline=self._deadline), req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS redirects, to http(s) only (urllib would follow one to ftp)."""

    max_redirections = max_repeats = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urllib.parse.urljoin(req.full_url, location.strip())
            if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
                fp.close()
                raise _Refused(f"redirected to {target}, which is not an http(s) URL")
            if len(fp.read(REDIRECT_BODY_MAX + 1)) > REDIRECT_BODY_MAX:  # the base class reads the rest whole
                fp.close()
                raise _Refused(f"sent a redirect with a body over {REDIRECT_BODY_MAX} bytes")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        hops = getattr(req, "fmnist_redirects", 0) + 1
        if hops > self.max_redirections:
            raise _Refused(f"redirected more than {self.max_redirections} times")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.fmnist_redirects = hops
        return new


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    handlers = [_HTTPHandler(deadline), _Redirects()]
    if hasattr(http.client, "HTTPSConnection"):
        handlers.append(_HTTPSHandler(deadline))
    return urllib.request.build_opener(*handlers)  # ours replace the default http, https and redirect handlers


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _download(url: str, dest: Path, inflater: Inflater, *, timeout: float, deadline: float) -> str:
    """One attempt at ``url``; returns the SHA-256 of the decompressed bytes.

    Raises :class:`_NetworkFault` (retry), :class:`_Refused` (next source), :class:`DataError`
    (stop) or, for the local disk, :class:`PipelineError` (stop).
    """
    limit = _Deadline(deadline)
    try:
        try:
            resp = _opener(limit).open(url, timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code < 500:  # 404 and friends will not change on retry
                raise _Refused(f"answered HTTP {e.code} {_one_line(e.reason)}") from None
            raise _NetworkFault(f"HTTP {e.code} {_one_line(e.reason)}") from None
        with resp:
            length = resp.headers.get("Content-Length", "").strip()
            total = int(length) if length.isdigit() else None
            if total is not None and total > inflater.max_in:
                raise inflater.too_big(announced=total)
            read = getattr(resp, "read1", resp.read)  # read1: returns what has arrived, so the deadline is checked often

            def chunks() -> Iterator[bytes]:
                received = 0
                while True:
                    limit.check()
                    chunk = read(CHUNK)
                    if not chunk:
                        break
                    received += len(chunk)
                    yield chunk
                # Before the gzip check at the end calls a short file truncated: the deadline cuts a
                # connection short, and so does a network that drops it. Both are worth a retry.
                limit.check()
                if total is not None and received != total:
                    raise _NetworkFault(f"connection closed after {received} of {total} bytes")

            with _progress(total, dest.name) as bar:
                return _stream(chunks(), dest, inflater, bar)
    except (OSError, http.client.HTTPException) as e:
        # Only the network is left to raise these: the staging file turns its own OSErrors into
        # OutputError (a PipelineError), and DataError, _Refused and _NetworkFault are not OSErrors.
        reason = limit.reason if limit.expired else _one_line(getattr(e, "reason", e)) or type(e).__name__
        raise _NetworkFault(reason) from None
    finally:
        limit.close()


def _file_chunks(path: Path, name: str) -> Iterator[bytes]:
    """The chunks of a file in a mirror folder; a file it cannot read is a :class:`SourceError`."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except FileNotFoundError:
        raise SourceError(f"{name}: not found in mirror folder {path.parent}") from None
    except OSError as e:
        raise SourceError(f"{name}: cannot read {path} ({e.strerror or e})") from None


def fetch_one(
    source: Source, name: str, dest: Path, *, timeout: float, retries: int, backoff: float, deadline: float = 600.0,
) -> str:
    """Copy or download one file from ``source`` to ``dest``, checked as it streams.

    Returns the SHA-256 of its decompressed bytes; :class:`SourceError` if the source cannot
    provide it, :class:`DataError` if what it provides is corrupt or over a size cap.
    """
    origin = source.describe(name)
    if not source.is_url:
        path = Path(source.location) / name
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError as e:
            raise SourceError(f"{name}: cannot read {path} ({e.strerror or e})") from None
        if size is None:
            raise SourceError(f"{name}: not found in mirror folder {source.location}")
        with _progress(size, name) as bar:
            return _stream(_file_chunks(path, name), dest, _inflater_for(name, origin), bar)
    reason = "no attempt made"
    for attempt in range(1, max(retries, 1) + 1):
        try:
            return _download(origin, dest, _inflater_for(name, origin), timeout=timeout, deadline=deadline)
        except _Refused as e:
            raise SourceError(f"{name}: {origin} {e}") from None
        except _NetworkFault as e:
            reason = str(e)
        if attempt < retries:
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.0f s", origin, attempt, retries, reason, wait)
            time.sleep(wait)
    raise SourceError(f"{name}: cannot download {origin} after {retries} attempts ({reason})")


def verify(name: str, digest: str, origin: str) -> None:
    """A :class:`DataError` unless ``digest`` (of the decompressed bytes) is the official one."""
    if digest != SHA256[name]:
        raise DataError(
            f"{name}: SHA-256 mismatch for the file from {origin} "
            f"(expected {SHA256[name]}, got {digest})"
        )


def extract(
    out_dir: str | os.PathLike,
    sources: list[Source],
    *,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 2.0,
    deadline: float = 600.0,
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
                    digest = fetch_one(
                        source, name, staging / name,
                        timeout=timeout, retries=retries, backoff=backoff, deadline=deadline,
                    )
                except SourceError as e:
                    failures.append(str(e))
                    log.warning("%s", e)
                    continue
                verify(name, digest, source.describe(name))
                origins[name] = source.describe(name)
                log.info("%s: verified, from %s", name, origins[name])
                break
            else:
                raise SourceError(
                    f"{name}: no source could provide it; " + "; ".join(f.split(": ", 1)[1] for f in failures)
                )
    return origins
