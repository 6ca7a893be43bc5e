"""A TCP proxy on loopback that can cut its connections: a network that drops mid-transfer."""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to `target`. `hold_after(n)` stops forwarding once n more
    bytes have gone from the target to clients (`held` is set), so a test can see what the
    client made of them; `cut()` then closes every open connection. Later connections work
    again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._budget: int | None = None
        self.held = threading.Event()
        self._released = threading.Event()
        self.cuts = 0
        self.downstream_bytes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_after(self, n: int) -> None:
        with self._lock:
            self._budget = n

    def cut(self) -> None:
        """Closes every open connection now (and lets a held pump go)."""
        self._cut()
        self._released.set()

    def close(self) -> None:
        self._listener.close()
        self._cut(counted=False)
        self._released.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the upstream is gone (the test stopped it): refuse this one
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if downstream:
                    with self._lock:
                        if self._budget is not None and len(data) >= self._budget:
                            data = data[: self._budget]
                            self._budget = None
                            cut = True
                        else:
                            if self._budget is not None:
                                self._budget -= len(data)
                            cut = False
                        self.downstream_bytes += len(data)
                    dst.sendall(data)
                    if cut:  # until the test calls cut()
                        self.held.set()
                        self._released.wait()
                        return
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def _cut(self, counted: bool = True) -> None:
        with self._lock:
            sockets, self._open = self._open, []
            self.cuts += counted
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class BlackholeProxy(CuttingProxy):
    """A CuttingProxy whose `blackhole()` makes the path swallow every byte both ways without
    closing anything (a partition that drops packets); `heal()` lets bytes through again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.swallowing = threading.Event()
        super().__init__(target)

    def blackhole(self) -> None:
        self.swallowing.set()

    def heal(self) -> None:
        self.swallowing.clear()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if not self.swallowing.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)


def _shut(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
