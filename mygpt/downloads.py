"""Fetch a file once into a local cache, checked by sha256, so data sets and vocabularies survive flaky networks.

A download streams into a temporary file beside its final place and is renamed into the cache only after its hash
matches, so the cache never holds a partial or wrong file, even if the process is killed half way.
"""

import hashlib
import numbers
import os
import tempfile
import time
from pathlib import Path, PureWindowsPath
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

_CACHE_ENV = "MYGPT_CACHE"
_CHUNK = 1 << 16
# Seconds before the first retry; doubled after each failure.
_FIRST_BACKOFF = 0.5
# Karpathy's char-rnn corpus (1.1 MB, 40,000 lines of Shakespeare), the text the projects train on by default
_TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class DownloadError(OSError):
    """A file could not be fetched, or did not have the expected sha256."""


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_dir_default():
    """`$MYGPT_CACHE` if set, else `~/.cache/mygpt`."""
    return Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "mygpt")


def download(url, sha256, filename=None, cache_dir=None, retries=3, timeout=30):
    """The local path of the file at `url` whose sha256 is `sha256`, downloading it into the cache if needed.

    A file already in the cache with the right hash is returned without touching the network; one with another hash
    (damaged, cut short, or an old version) is fetched again and replaced only once the new one checks out. The file
    is fetched up to `retries` times (`timeout` seconds for connecting and between bytes). Raises `DownloadError`
    naming the URL and what to do by hand if every attempt fails or the file's hash is wrong. The cached file is named
    `filename`, else after the last part of the URL's path; either way it stays inside the cache folder.
    """
    url, sha256 = _checked_url(url), _checked_hash(sha256)
    retries, timeout = _checked_retries(retries), _checked_timeout(timeout)
    directory = Path(cache_dir) if cache_dir is not None else _cache_dir_default()
    target = directory / (_checked_filename(filename) if filename is not None else _name_from_url(url))
    cached = sha256_file(target) if target.is_file() else None
    if cached == sha256:
        return target
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"the cache folder {directory} is a file; pass another cache_dir or set ${_CACHE_ENV}")
    directory.mkdir(parents=True, exist_ok=True)
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
                                f"If the file at that address has changed, {_by_hand(target, sha256, cached)}")
        return target
    raise DownloadError(f"could not download {url} ({retries} attempts; last error: {last_error}). "
                        f"If this machine is offline, {_by_hand(target, sha256, cached)}")


def tiny_shakespeare(cache_dir=None):
    """The local path of tiny shakespeare, downloaded into the cache once (as download() does, DownloadError and all)."""
    return download(_TINY_SHAKESPEARE_URL, _TINY_SHAKESPEARE_SHA256, filename="tinyshakespeare.txt",
                    cache_dir=cache_dir)


def _by_hand(target, sha256, cached):
    """What to do without the network: place the file, or replace the wrong one already in its place."""
    elsewhere = "fetch it by other means (a browser, another machine)"
    if cached is None:
        return f"{elsewhere} and place it at {target} (sha256 {sha256})"
    return (f"{elsewhere}: the file now at {target} has sha256 {cached}, not {sha256} (damaged, cut short or another "
            "version), so replace it with the right one")


def _checked_url(url):
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    if urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"url must be an http:// or https:// address, got {url!r}")
    return url


def _checked_hash(sha256):
    text = str(sha256).lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return text


def _checked_retries(retries):
    if isinstance(retries, bool) or not isinstance(retries, numbers.Integral):
        raise TypeError(f"retries must be an int, got {retries!r}")
    if retries < 1:
        raise ValueError(f"retries must be >= 1 (the number of attempts), got {retries}")
    return int(retries)


def _checked_timeout(timeout):
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    return float(timeout)


def _is_plain_name(name):
    """Whether `name` names a file inside a folder, never the folder itself, its parent or a path elsewhere."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0") and not PureWindowsPath(name).drive


def _checked_filename(filename):
    if not isinstance(filename, (str, os.PathLike)):
        raise TypeError(f"filename must be a str, got {type(filename).__name__}")
    filename = os.fspath(filename)
    if not _is_plain_name(filename):
        raise ValueError(f"filename must be a plain file name (no folders, not '.' or '..'), got {filename!r}")
    return filename


def _name_from_url(url):
    """The last part of the URL's path, decoded: '..%2F..%2Fetc%2Fpasswd' gives 'passwd', never a path elsewhere."""
    path = unquote(urlparse(url).path)
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    if not _is_plain_name(name):
        raise ValueError(f"cannot take a file name from {url!r} (its path ends in {name!r}); pass filename=")
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
