"""A TCP proxy that breaks connections on purpose, for fault tests against a real S3 server.

Put it between a client and the server (``AWS_ENDPOINT_URL_S3`` at ``proxy.url``) and tell it
what to break: reset the next N connections as soon as they open, or cut them after a number of
bytes have passed in one direction (``"down"`` server→client, ``"up"`` client→server), which
is how a flaky network looks to a transfer in flight. A cut sends TCP RST (SO_LINGER 0) so the
client sees a reset, not a clean end of stream. Faults are handed to connections in the order
they are accepted; ``count=None`` applies a fault to every connection until ``heal()``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Literal

Direction = Literal["up", "down"]


@dataclass
class _Fault:
    kind: Literal["reset", "cut"]
    after_bytes: int = 0
    direction: Direction = "down"
    remaining: int | None = 1  # connections left to break; None = all


def _abort(*socks: socket.socket) -> None:
    """Close with RST instead of FIN: the peer gets ECONNRESET mid-transfer, at once.

    SHUT_RD first wakes the sibling pump thread blocked in recv() on the same socket; until it
    returns, the kernel keeps the socket alive and close() alone would send nothing.
    """
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._closing = threading.Event()
        self._sockets: set[socket.socket] = set()
        self.connections = 0
        self.faults_applied = 0
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what to break -------------------------------------------------------------------------
    def reset_connections(self, count: int | None = 1) -> None:
        """Reset the next ``count`` connections right after they are accepted."""
        with self._lock:
            self._faults.append(_Fault("reset", remaining=count))

    def cut_connections(self, after_bytes: int, direction: Direction = "down", count: int | None = 1) -> None:
        """Cut the next ``count`` connections once ``after_bytes`` have flowed in ``direction``."""
        with self._lock:
            self._faults.append(_Fault("cut", after_bytes, direction, count))

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- machinery -------------------------------------------------------------------------------
    def _next_fault(self) -> _Fault | None:
        with self._lock:
            self.connections += 1
            if not self._faults:
                return None
            fault = self._faults[0]
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.pop(0)
            self.faults_applied += 1
            return fault

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            fault = self._next_fault()
            if fault is not None and fault.kind == "reset":
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _abort(client)
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            cut = fault if fault is not None and fault.kind == "cut" else None
            for source, sink, direction in ((client, upstream, "up"), (upstream, client, "down")):
                limit = cut.after_bytes if cut is not None and cut.direction == direction else None
                threading.Thread(target=self._pump, args=(source, sink, limit, client, upstream), daemon=True).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        limit: int | None,
        client: socket.socket,
        upstream: socket.socket,
    ) -> None:
        relayed = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                if limit is not None and relayed + len(data) >= limit:
                    sink.sendall(data[: max(0, limit - relayed)])
                    _abort(client, upstream)
                    return
                sink.sendall(data)
                relayed += len(data)
        except OSError:
            _abort(client, upstream)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        _abort(*sockets)
