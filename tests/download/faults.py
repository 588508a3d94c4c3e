"""A TCP proxy on 127.0.0.1 that injects faults between the download and nginx.

Each accepted connection takes the next Fault of the list (later ones pass through): it
forwards the server's first `after` bytes, then resets the connection, closes it
cleanly, stalls, or (plain http only) rewrites the response to carry more bytes than it
announces. Every thread and every wait is bounded.
"""

from __future__ import annotations

import enum
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

_LIFETIME = 30.0  # seconds a proxied connection may live at most
_JUNK = b"J" * 4096


class Kind(enum.Enum):
    PASS = "pass"
    RESET = "reset"  # RST after `after` bytes
    CLOSE = "close"  # FIN after `after` bytes
    STALL = "stall"  # stop forwarding for `stall` seconds after `after` bytes
    CHUNKED_EXTRA = "chunked-extra"  # keep Content-Length, send chunked with junk after it
    CLOSE_EXTRA = "close-extra"  # drop Content-Length, send junk, then close


@dataclass(frozen=True)
class Fault:
    kind: Kind = Kind.PASS
    after: int = 0
    stall: float = 0.0
    before: Callable[[], None] | None = None  # runs just before the fault strikes
    upstream: int | None = None  # another server port for this connection


class FaultProxy:
    def __init__(self, upstream: int, faults: Sequence[Fault] = ()) -> None:
        self.upstream = upstream
        self.faults = list(faults)
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def url(self, path: str, scheme: str = "https", host: str = "localhost") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        for sock in list(self._sockets):
            sock.close()
        for thread in list(self._threads):
            thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            index = self.connections
            self.connections += 1
            fault = self.faults[index] if index < len(self.faults) else Fault()
            thread = threading.Thread(target=self._serve, args=(client, fault), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, fault: Fault) -> None:
        self._sockets.append(client)
        try:
            upstream = socket.create_connection(("127.0.0.1", fault.upstream or self.upstream), 5)
        except OSError:
            client.close()
            return
        self._sockets.append(upstream)
        upstream.settimeout(0.1)
        forward = threading.Thread(target=self._copy_up, args=(client, upstream), daemon=True)
        self._threads.append(forward)
        forward.start()
        try:
            if fault.kind in (Kind.CHUNKED_EXTRA, Kind.CLOSE_EXTRA):
                self._rewrite(upstream, client, fault.kind)
            else:
                self._copy_down(upstream, client, fault)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def _copy_up(self, client: socket.socket, upstream: socket.socket) -> None:
        client.settimeout(0.1)
        deadline = time.monotonic() + _LIFETIME
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data = client.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                upstream.sendall(data)
            except OSError:
                return

    def _receive(self, upstream: socket.socket, deadline: float) -> bytes:
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                return upstream.recv(65536)
            except TimeoutError:
                continue
        return b""

    def _copy_down(self, upstream: socket.socket, client: socket.socket, fault: Fault) -> None:
        sent = 0
        deadline = time.monotonic() + _LIFETIME
        striking = fault.kind is not Kind.PASS
        while data := self._receive(upstream, deadline):
            if striking and sent + len(data) >= fault.after:
                client.sendall(data[: fault.after - sent])
                self._strike(client, fault)
                return
            client.sendall(data)
            sent += len(data)

    def _strike(self, client: socket.socket, fault: Fault) -> None:
        if fault.before is not None:
            fault.before()
        if fault.kind is Kind.RESET:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif fault.kind is Kind.CLOSE:
            client.shutdown(socket.SHUT_WR)
        elif fault.kind is Kind.STALL:
            self._stop.wait(fault.stall)

    def _rewrite(self, upstream: socket.socket, client: socket.socket, kind: Kind) -> None:
        deadline = time.monotonic() + _LIFETIME
        received = b""
        while b"\r\n\r\n" not in received:
            data = self._receive(upstream, deadline)
            if not data:
                return
            received += data
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in lines
            if line.lower().startswith(b"content-length:")
        )
        if kind is Kind.CHUNKED_EXTRA:
            lines.append(b"Transfer-Encoding: chunked")
        else:
            lines = [
                line
                for line in lines
                if not line.lower().startswith((b"content-length:", b"connection:"))
            ]
            lines.append(b"Connection: close")
        client.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        left = length
        while True:
            piece, body = body[:left], b""
            left -= len(piece)
            if piece:
                client.sendall(self._frame(piece, kind))
            if not left:
                break
            body = self._receive(upstream, deadline)
            if not body:
                return
        client.sendall(self._frame(_JUNK, kind))
        if kind is Kind.CHUNKED_EXTRA:
            client.sendall(b"0\r\n\r\n")

    @staticmethod
    def _frame(data: bytes, kind: Kind) -> bytes:
        if kind is Kind.CHUNKED_EXTRA:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data
