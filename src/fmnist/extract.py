"""Extract: fetch the four official Fashion-MNIST files, verified by the SHA-256 of their contents.

Sources are tried in order: the mirror named by ``FMNIST_MIRROR`` (a local folder or a URL base),
then the official download locations. A source that cannot be reached or lacks a file gives way
to the next; a file whose content hash is wrong stops everything, since that is never a network
hiccup. Files are staged in a temporary folder and moved into place only when all four verify.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import DataError, SourceError
from .fileio import atomic_dir

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


def gunzip(path: Path, origin: str | None = None) -> bytes:
    """The decompressed bytes of a gzip file, or a one-line :class:`DataError` naming it."""
    where = f" (from {origin})" if origin else ""
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}{where}: empty file")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except gzip.BadGzipFile:
        raise DataError(f"{path.name}{where}: not a gzip file") from None
    except EOFError:
        raise DataError(f"{path.name}{where}: truncated gzip file (ended before its end-of-stream marker)") from None
    except zlib.error as e:
        raise DataError(f"{path.name}{where}: corrupt gzip data ({e})") from None


def _progress(total: int | None, name: str):
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
        disable=not sys.stderr.isatty(), leave=False,
    )


def _download(url: str, dest: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        total = int(total) if total else None
        written = 0
        with _progress(total, dest.name) as bar:
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written != total:  # the connection closed early: worth another try
        raise ConnectionError(f"connection closed after {written} of {total} bytes")


def fetch_one(source: Source, name: str, dest: Path, *, timeout: float, retries: int, backoff: float) -> None:
    """Copy or download one file from ``source`` to ``dest``; :class:`SourceError` if it cannot."""
    if not source.is_url:
        src = Path(source.location) / name
        if not src.is_file():
            raise SourceError(f"{name}: not found in mirror folder {source.location}")
        shutil.copyfile(src, dest)
        return
    url = source.describe(name)
    reason = "no attempt made"
    for attempt in range(1, max(retries, 1) + 1):
        try:
            _download(url, dest, timeout)
            return
        except urllib.error.HTTPError as e:
            if e.code < 500:  # 404 and friends will not change on retry
                raise SourceError(f"{name}: {url} answered HTTP {e.code} {e.reason}") from None
            reason = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = str(getattr(e, "reason", e)) or type(e).__name__
        if attempt < retries:
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.0f s", url, attempt, retries, reason, wait)
            time.sleep(wait)
    raise SourceError(f"{name}: cannot download {url} after {retries} attempts ({reason})")


def verify(path: Path, name: str, origin: str) -> None:
    digest = hashlib.sha256(gunzip(path, origin)).hexdigest()
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
) -> dict[str, str]:
    """Fetch and verify the four files into ``out_dir``; returns file name -> where it came from.

    Nothing appears in ``out_dir`` unless all four files verify.
    """
    if not sources:
        raise SourceError("no source to fetch Fashion-MNIST from")
    origins: dict[str, str] = {}
    with atomic_dir(out_dir) as staging:
        for name in FILES:
            failures = []
            for source in sources:
                dest = staging / name
                try:
                    fetch_one(source, name, dest, timeout=timeout, retries=retries, backoff=backoff)
                except SourceError as e:
                    failures.append(str(e))
                    log.warning("%s", e)
                    continue
                verify(dest, name, source.describe(name))
                origins[name] = source.describe(name)
                log.info("%s: verified, from %s", name, origins[name])
                break
            else:
                raise SourceError(
                    f"{name}: no source could provide it; " + "; ".join(f.split(": ", 1)[1] for f in failures)
                )
    return origins
