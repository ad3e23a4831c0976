"""A small TCP proxy in front of a receiver that can lose chosen responses.

`drop(pattern)` arms it: the next request whose request line matches is forwarded whole,
its response is read in full from the receiver (so whatever the call did is committed),
and then the client's connection is closed without a byte of that response, as when a
network cuts a connection after the server answered. Everything else is passed through.
"""

from __future__ import annotations

import re
import socket
import threading
from contextlib import suppress
from types import TracebackType

CHUNK = 1 << 16


class DropProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.dropped: list[str] = []  #: request lines whose response was dropped
        self._rules: list[re.Pattern[str]] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        self._accepter = threading.Thread(target=self._accept, daemon=True, name="drop-proxy")
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop(self, pattern: str, count: int = 1) -> None:
        """Lose the responses of the next `count` requests whose request line matches."""
        with self._lock:
            self._rules.extend([re.compile(pattern)] * count)

    def close(self) -> None:
        self._closed = True
        with suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self._server.close()
        self._accepter.join(5)

    def __enter__(self) -> DropProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as upstream:
            head = _read_head(client)
            if head is None:
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            if self._take_rule(line):
                self._drop_one(client, upstream, head, line)
            else:
                upstream.sendall(head)
                self._pipe(client, upstream)

    def _take_rule(self, line: str) -> bool:
        with self._lock:
            for i, rule in enumerate(self._rules):
                if rule.search(line):
                    del self._rules[i]
                    return True
        return False

    def _drop_one(self, client: socket.socket, upstream: socket.socket, head: bytes,
                  line: str) -> None:
        """Forward one request with its body, swallow the whole response, then hang up."""
        header_end = head.index(b"\r\n\r\n") + 4
        upstream.sendall(head)
        left = _content_length(head) - (len(head) - header_end)
        while left > 0:
            chunk = client.recv(min(CHUNK, left))
            if not chunk:
                break
            upstream.sendall(chunk)
            left -= len(chunk)
        response = _read_head(upstream) or b""
        if b"\r\n\r\n" in response:
            end = response.index(b"\r\n\r\n") + 4
            left = _content_length(response) - (len(response) - end)
            while left > 0 and (chunk := upstream.recv(min(CHUNK, left))):
                left -= len(chunk)
        with self._lock:
            self.dropped.append(line)
        with suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        """Both directions until either side closes."""
        def pump(src: socket.socket, dst: socket.socket) -> None:
            with suppress(OSError):
                while chunk := src.recv(CHUNK):
                    dst.sendall(chunk)
            with suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(30)


def _read_head(sock: socket.socket) -> bytes | None:
    """Bytes up to and including the end of the headers (maybe a little body after)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(CHUNK)
        if not chunk:
            return data or None
        data += chunk
    return data


def _content_length(head: bytes) -> int:
    match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head.split(b"\r\n\r\n", 1)[0])
    return int(match.group(1)) if match else 0
