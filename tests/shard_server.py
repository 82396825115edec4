"""A real HTTP server on 127.0.0.1 for the tests of remote shards: serves a folder, answers Range requests, and
injects the faults the network produces on the requests a test chooses (a reset after N bytes, a 503, a stall
past the client's timeout, a body shorter than announced)."""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STALL_BOUND_S = 10  # a stalled answer ends by itself after this long (the client has timed out long before)


@dataclass
class Fault:
    """Do ``kind`` ("reset", "503", "stall", "short") to the next ``times`` requests whose path contains ``path``,
    after ``after`` bytes of the body."""

    kind: str
    path: str = ""
    after: int = 0
    times: int = 1


class ShardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.faults, self.requests = Path(root), [], []  # requests: (path, first byte asked for)
        self.lock, self.released = threading.Lock(), threading.Event()
        self.injected = 0
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.path in path:
                    fault.times -= 1
                    self.injected += 1
                    return fault
        return None

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.released.set()  # stalled answers end now
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ShardServer

    def log_message(self, *args):  # quiet: the test output is for the test's own words
        pass

    def do_GET(self):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        file = self.server.root / path.lstrip("/")
        if ".." in Path(path).parts or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        match = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        with self.server.lock:
            self.server.requests.append((path, start))
        fault = self.server.take_fault(path)
        if fault and fault.kind == "503":
            self.send_error(503, "Slow Down")
            return
        if start >= len(data) and start:
            self.send_error(416)
            return
        self.send_response(206 if match else 200)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if fault is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:fault.after])
        self.wfile.flush()
        if fault.kind == "stall":
            self.server.released.wait(STALL_BOUND_S)
        elif fault.kind == "reset":  # RST, not FIN: SO_LINGER with a zero timeout
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close() if fault.kind == "reset" else self.connection.shutdown(socket.SHUT_RDWR)


def serve(root: os.PathLike) -> ShardServer:
    """``with serve(folder) as server:`` the folder at ``server.url`` until the block ends."""
    return ShardServer(Path(root))
