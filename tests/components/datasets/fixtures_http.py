"""A real HTTP server on 127.0.0.1 for the download tests, with misbehaving routes.

Files are served at ``/<mode>/<name>``:
  ok       full file, honours ``Range: bytes=N-`` (206 + Content-Range)
  cut      the first request without Range announces the full length, sends half and closes;
           later requests behave like ``ok``
  corrupt  like ``ok`` with one byte flipped in the middle
  norange  ignores Range: always 200 with the whole file
  flaky    the first two requests answer 503, then like ``ok``
  missing  404
  hang     accepts the request and never answers (until the server stops)
  short    announces and sends only the first half (a Content-Length that lies short)
  html     200 with an HTML login page instead of the file
  nolen    no Content-Length: sends the first half and closes
  lie206   answers a Range request with 206 and the requested offset but sends from byte 0
  redirect redirects to itself forever
  gzlie    says Content-Encoding: gzip but sends the plain file
  drip     sends 1 KB every 50 ms (never slow enough for a read timeout)
  trickle  sends 1 byte every 50 ms (a 64 KiB read never fills, nor times out)
  stall    sends the first 1000 bytes, then nothing (until the server stops)
Every request is logged as (mode, name, Range header or None).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FixtureServer:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.log: list[tuple[str, str, str | None]] = []
        self.release = threading.Event()
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FixtureServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, mode: str, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/{name}"

    def requests_for(self, mode: str, name: str) -> list[str | None]:
        return [r for m, n, r in self.log if (m, n) == (mode, name)]

    # ---------------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        _, mode, name = h.path.split("/", 2)
        range_header = h.headers.get("Range")
        with self._lock:
            self.log.append((mode, name, range_header))
            count = self._counts.get((mode, name), 0)
            self._counts[(mode, name)] = count + 1
        data = self.files.get(name)
        if mode == "missing" or data is None:
            h.send_error(404, "Not Found")
            return
        if mode == "hang":
            self.release.wait(timeout=30)
            return
        if mode == "flaky" and count < 2:
            h.send_error(503, "Service Unavailable")
            return
        if mode == "redirect":
            h.send_response(302)
            h.send_header("Location", h.path)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if mode == "html":
            page = b"<html><body>Please log in</body></html>"
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Content-Length", str(len(page)))
            h.end_headers()
            h.wfile.write(page)
            return
        if mode in ("short", "nolen"):
            h.send_response(200)
            if mode == "short":
                h.send_header("Content-Length", str(len(data) // 2))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.close_connection = True
            return
        if mode == "lie206" and range_header is not None:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            h.send_header("Content-Length", str(len(data) - start))
            h.end_headers()
            h.wfile.write(data[: len(data) - start])
            return
        if mode == "gzlie":
            h.send_response(200)
            h.send_header("Content-Encoding", "gzip")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if mode == "drip":
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            for i in range(0, len(data), 1024):
                if self.release.wait(0.05):
                    return
                h.wfile.write(data[i : i + 1024])
                h.wfile.flush()
            return
        if mode in ("trickle", "stall"):
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if mode == "stall":
                h.wfile.write(data[:1000])
                h.wfile.flush()
                self.release.wait(timeout=30)
                return
            for i in range(len(data)):
                if self.release.wait(0.05):
                    return
                h.wfile.write(data[i : i + 1])
                h.wfile.flush()
            return
        if mode == "corrupt":
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        if mode == "cut" and range_header is None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        start = 0
        if range_header is not None and mode != "norange":
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        h.wfile.write(data[start:])
