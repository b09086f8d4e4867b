"""Fetch a file once into a local cache, checked by sha256, so data sets and vocabularies survive flaky networks.

A download streams into a temporary file beside its final place and is renamed into the cache only after its hash
matches, so the cache never holds a partial or wrong file, even if the process is killed half way.
"""

import hashlib
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

CACHE_ENV = "MYGPT_CACHE"
_CHUNK = 1 << 16
# Seconds before the first retry; doubled after each failure.
_FIRST_BACKOFF = 0.5


class DownloadError(OSError):
    """A file could not be fetched, or did not have the expected sha256."""


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir_default():
    """`$MYGPT_CACHE` if set, else `~/.cache/mygpt`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mygpt")


def download(url, sha256, filename=None, cache_dir=None, retries=3, timeout=30):
    """The local path of the file at `url` whose sha256 is `sha256`, downloading it into the cache if needed.

    A file already in the cache with the right hash is returned without touching the network. Otherwise the file is
    fetched up to `retries` times (`timeout` seconds for connecting and between bytes). Raises `DownloadError` naming
    the URL and where to put the file by hand if every attempt fails or the file's hash is wrong.
    """
    sha256 = _checked_hash(sha256)
    directory = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    target = directory / (filename or _name_from_url(url))
    if target.is_file() and sha256_file(target) == sha256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    by_hand = f"fetch it by other means (a browser, another machine) and place it at {target} (sha256 {sha256})"
    last_error = None
    for attempt in range(retries):
        if attempt:
            time.sleep(_FIRST_BACKOFF * 2 ** (attempt - 1))
        try:
            actual = _fetch(url, target, sha256, timeout)
        except requests.RequestException as e:
            last_error = e
            continue
        if actual != sha256:
            raise DownloadError(f"{url} gave a file with sha256 {actual}, expected {sha256}; nothing was cached. "
                                f"If the file at that address has changed, {by_hand}")
        return target
    raise DownloadError(f"could not download {url} ({retries} attempts; last error: {last_error}). "
                        f"If this machine is offline, {by_hand}")


def _checked_hash(sha256):
    text = str(sha256).lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return text


def _name_from_url(url):
    name = unquote(Path(urlparse(url).path).name)
    if not name:
        raise ValueError(f"cannot take a file name from {url!r}; pass filename=")
    return name


def _fetch(url, target, sha256, timeout):
    """Stream `url` into a temporary file beside `target`; move it to `target` if its hash is `sha256`.

    Returns the hash of what was received. The temporary file is removed on every path that does not move it.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            total = int(response.headers.get("Content-Length", 0)) or None
            # disable=None shows the bar only on a terminal, so logs and tests stay clean.
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=None) as bar:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() == sha256:
            os.replace(tmp, target)
        return digest.hexdigest()
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
