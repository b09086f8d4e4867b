"""download() against a real HTTP server on 127.0.0.1: good, corrupted, dropped and refused transfers."""

import hashlib
import os
import socket
import tempfile
import threading
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import mygpt.downloads as download_module
from mygpt.downloads import _CACHE_ENV, DownloadError, download

PAYLOAD = os.urandom(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """/good: the payload; /corrupt: the payload with one byte changed; /drop: half the payload, then the
    connection closes; /flaky: drops the first request, serves the second."""

    def do_GET(self):
        self.server.requests.append(self.path)
        body = PAYLOAD
        if self.path == "/corrupt":
            body = b"\0" + PAYLOAD[1:]
        drop = self.path == "/drop" or (self.path == "/flaky" and self.server.requests.count("/flaky") == 1)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if drop else body)
        if drop:
            self.close_connection = True

    def log_message(self, *args):
        pass


class TestDownload(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        cls.server.requests = []
        cls.thread = threading.Thread(target=cls.server.serve_forever, daemon=True)
        cls.thread.start()
        cls.base = f"http://127.0.0.1:{cls.server.server_port}"

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def setUp(self):
        self.server.requests.clear()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.cache = Path(tmp.name)
        # Retries wait a little between attempts; the waits are not what these tests are about.
        patcher = mock.patch.object(download_module, "_FIRST_BACKOFF", 0.01)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_good_file_is_cached_and_reused_without_network(self):
        path = download(f"{self.base}/good", PAYLOAD_SHA256, filename="data.bin", cache_dir=self.cache)
        self.assertEqual(path, self.cache / "data.bin")
        self.assertEqual(path.read_bytes(), PAYLOAD)
        again = download(f"{self.base}/good", PAYLOAD_SHA256, filename="data.bin", cache_dir=self.cache)
        self.assertEqual(again, path)
        self.assertEqual(self.server.requests, ["/good"])
        self.assertEqual(os.listdir(self.cache), ["data.bin"])

    def test_cache_dir_from_environment(self):
        with mock.patch.dict(os.environ, {_CACHE_ENV: str(self.cache / "env")}):
            path = download(f"{self.base}/good", PAYLOAD_SHA256)
        self.assertEqual(path, self.cache / "env" / "good")

    def test_corrupted_file_is_refused_and_not_cached(self):
        with self.assertRaises(DownloadError) as caught:
            download(f"{self.base}/corrupt", PAYLOAD_SHA256, cache_dir=self.cache)
        message = str(caught.exception)
        self.assertIn(f"{self.base}/corrupt", message)
        self.assertIn(PAYLOAD_SHA256, message)
        self.assertIn(str(self.cache / "corrupt"), message)
        self.assertEqual(os.listdir(self.cache), [])

    def test_wrong_cached_file_is_replaced(self):
        (self.cache / "good").write_bytes(b"stale")
        path = download(f"{self.base}/good", PAYLOAD_SHA256, cache_dir=self.cache)
        self.assertEqual(path.read_bytes(), PAYLOAD)
        self.assertEqual(self.server.requests, ["/good"])
        self.assertEqual(os.listdir(self.cache), ["good"])

    def test_offline_with_a_wrong_cached_file_says_replace_it(self):
        stale = self.cache / "shakespeare.txt"
        stale.write_bytes(b"stale")
        url = f"http://127.0.0.1:{closed_port()}/shakespeare.txt"
        with self.assertRaises(DownloadError) as caught:
            download(url, PAYLOAD_SHA256, cache_dir=self.cache, retries=1, timeout=5)
        message = str(caught.exception)
        self.assertIn(f"the file now at {stale} has sha256 {hashlib.sha256(b'stale').hexdigest()}, "
                      f"not {PAYLOAD_SHA256}", message)
        self.assertIn("replace it with the right one", message)
        self.assertNotIn("place it at", message)
        self.assertEqual(stale.read_bytes(), b"stale")  # kept until a right one replaces it

    def test_corrupt_download_over_a_wrong_cached_file_says_replace_it(self):
        (self.cache / "corrupt").write_bytes(b"stale")
        with self.assertRaisesRegex(DownloadError, "the file now at .*corrupt has sha256 .* so replace it"):
            download(f"{self.base}/corrupt", PAYLOAD_SHA256, cache_dir=self.cache)
        self.assertEqual(os.listdir(self.cache), ["corrupt"])

    def test_names_from_urls_stay_in_the_cache(self):
        for path, name in [("/data/..%2F..%2Fescape.bin", "escape.bin"), ("/a/..%5C..%5Cwin.bin", "win.bin"),
                           ("/files/get?name=../../x.bin", "get"), ("/%2E%2E%2Fup.bin", "up.bin"),
                           ("/dir/a..b", "a..b")]:
            with self.subTest(path=path):
                target = download(self.base + path, PAYLOAD_SHA256, cache_dir=self.cache)
                self.assertEqual(target, self.cache / name)
                self.assertEqual(target.resolve().parent, self.cache.resolve())
        for path in ("/", "/dir/", "/a/..", "/a/%2E%2E", "/a/.", "/a/..%2F", "/C:x"):
            with self.subTest(path=path), self.assertRaisesRegex(ValueError, "cannot take a file name.*pass filename="):
                download(self.base + path, PAYLOAD_SHA256, cache_dir=self.cache)
        self.assertEqual(sorted(os.listdir(self.cache)), ["a..b", "escape.bin", "get", "up.bin", "win.bin"])

    def test_filename_must_be_a_plain_name(self):
        for bad in ("../x", "/etc/passwd", "a/b", "a\\b", "", ".", "..", "C:x", "a\0b"):
            with self.subTest(filename=bad), self.assertRaisesRegex(ValueError, "filename must be a plain file name"):
                download(f"{self.base}/good", PAYLOAD_SHA256, filename=bad, cache_dir=self.cache)
        with self.assertRaisesRegex(TypeError, "filename must be a str"):
            download(f"{self.base}/good", PAYLOAD_SHA256, filename=5, cache_dir=self.cache)
        self.assertEqual(self.server.requests, [])
        self.assertEqual(download(f"{self.base}/good", PAYLOAD_SHA256, filename=Path("x"), cache_dir=self.cache),
                         self.cache / "x")

    def test_dropped_connection_is_retried(self):
        path = download(f"{self.base}/flaky", PAYLOAD_SHA256, cache_dir=self.cache, retries=2)
        self.assertEqual(path.read_bytes(), PAYLOAD)
        self.assertEqual(self.server.requests, ["/flaky", "/flaky"])

    def test_connection_that_always_drops_fails_cleanly(self):
        with self.assertRaisesRegex(DownloadError, "could not download .*/drop \\(3 attempts"):
            download(f"{self.base}/drop", PAYLOAD_SHA256, cache_dir=self.cache)
        self.assertEqual(self.server.requests, ["/drop"] * 3)
        self.assertEqual(os.listdir(self.cache), [])

    def test_offline_says_where_to_put_the_file(self):
        url = f"http://127.0.0.1:{closed_port()}/shakespeare.txt"
        with self.assertRaises(DownloadError) as caught:
            download(url, PAYLOAD_SHA256, cache_dir=self.cache, retries=1, timeout=5)
        message = str(caught.exception)
        self.assertIn(url, message)
        self.assertIn(f"place it at {self.cache / 'shakespeare.txt'}", message)

    def test_bad_hash_argument(self):
        with self.assertRaisesRegex(ValueError, "64 hexadecimal"):
            download(f"{self.base}/good", "abc", cache_dir=self.cache)

    def test_bad_arguments(self):
        good = f"{self.base}/good"
        cases = [(TypeError, "url must be a str", dict(url=good.encode())),
                 (ValueError, "url must be an http:// or https:// address", dict(url="ftp://127.0.0.1/good")),
                 (ValueError, "url must be an http:// or https:// address", dict(url="/etc/passwd")),
                 (ValueError, "retries must be >= 1", dict(retries=0)),
                 (TypeError, "retries must be an int", dict(retries="3")),
                 (TypeError, "retries must be an int", dict(retries=True)),
                 (ValueError, "timeout must be > 0 seconds", dict(timeout=0)),
                 (TypeError, "timeout must be a number of seconds", dict(timeout="30"))]
        for error, message, change in cases:
            arguments = {"url": good, "sha256": PAYLOAD_SHA256, "cache_dir": self.cache, **change}
            with self.subTest(change=change), self.assertRaisesRegex(error, message):
                download(**arguments)
        self.assertEqual(self.server.requests, [])

    def test_cache_dir_that_is_a_file(self):
        not_a_folder = self.cache / "file"
        not_a_folder.write_bytes(b"")
        with self.assertRaisesRegex(NotADirectoryError, f"the cache folder {not_a_folder} is a file"):
            download(f"{self.base}/good", PAYLOAD_SHA256, cache_dir=not_a_folder)


def closed_port():
    """A local port with nothing listening: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestTinyShakespeare(unittest.TestCase):
    ROOT = Path(__file__).resolve().parents[1]

    def test_it_is_fetched_through_download_into_the_given_cache(self):
        with mock.patch.object(download_module, "download", return_value=Path("x")) as fetch:
            self.assertEqual(download_module.tiny_shakespeare(cache_dir="c"), Path("x"))
        (url, sha256), options = fetch.call_args
        self.assertTrue(url.endswith("/tinyshakespeare/input.txt"), url)
        self.assertEqual(options, {"filename": "tinyshakespeare.txt", "cache_dir": "c"})
        # the hash chargpt's README gives is the one checked
        readme = (self.ROOT / "projects/chargpt/README.md").read_text(encoding="utf-8")
        self.assertIn(f"`{sha256}`", readme)

    def test_its_address_is_written_once(self):
        for path in ("projects/chargpt/chargpt.py", "projects/gpt2/prepare.py", "bench/bench_modern.py"):
            self.assertNotIn("tinyshakespeare/input.txt", (self.ROOT / path).read_text(encoding="utf-8"), path)


if __name__ == "__main__":
    unittest.main()
