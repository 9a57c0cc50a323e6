"""A web server for shards in a thread: Python's http.server over a folder, with the single byte-range requests
(RFC 9110 `Range: bytes=a-b`, answered 206) that real servers and object stores give fsspec's http filesystem, and
a log of every request so that a test can count downloads."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    requests: list[tuple[str, str, str]]  # (method, path, Range header or "")

    def log_message(self, *args) -> None:  # quiet: the test reads `requests` instead
        pass

    def do_HEAD(self):
        self.requests.append(("HEAD", self.path, ""))
        super().do_HEAD()

    def do_GET(self):
        wanted = self.headers.get("Range", "")
        self.requests.append(("GET", self.path, wanted))
        match = _RANGE.match(wanted)
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path):
            return super().do_GET()
        size = os.path.getsize(path)
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            self.wfile.write(f.read(max(0, end - start + 1)))


@contextlib.contextmanager
def serve(folder: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(base URL of `folder`, the request log) while the server runs."""
    log: list[tuple[str, str, str]] = []
    handler = functools.partial(type("Handler", (RangeHandler,), {"requests": log}), directory=folder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
