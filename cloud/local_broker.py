"""An MQTT broker on loopback for `autoglm demo` (and the tests): Mosquitto when it is
installed, else amqtt, an MQTT broker written in Python, in a thread of this process.

Mosquitto runs with `max_queued_messages 0` (its default cap of 1000 queued messages per
client would drop QoS 1 messages a slow subscriber has not taken yet) and persistence, so
sessions survive a broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError, LocalStateError

log = logging.getLogger(__name__)
ANONYMOUS = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def mosquitto_path() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, alive: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if not alive():
                raise LocalStateError(f"{what} exited before listening on port {port}") from None
            time.sleep(0.05)
    raise LocalStateError(f"{what} did not listen on port {port} within {timeout:.0f} s")


@dataclass
class MosquittoBroker:
    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    kind: str = "mosquitto"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise ConfigError("mosquitto is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "autosave_interval 1\n"
            "log_type error\n"
            "log_type warning\n"
        )
        with (self.directory / "mosquitto.log").open("ab") as errors:
            self.process = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=errors
            )
        process = self.process
        try:
            _wait_listening(self.port, lambda: process.poll() is None, "mosquitto")
        except LocalStateError as exc:
            log_text = (self.directory / "mosquitto.log").read_text(errors="replace")
            raise LocalStateError(f"{exc}: {log_text.strip()[-500:]}") from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.process.wait(10)
        self.process = None


@dataclass
class EmbeddedBroker:
    """amqtt on its own event loop thread (no persistence: sessions end with it)."""

    port: int
    kind: str = "amqtt (embedded)"
    _loop: asyncio.AbstractEventLoop | None = None
    _broker: Any = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: list[BaseException] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise ConfigError(
                "no MQTT broker: install mosquitto, or the embedded one with "
                "`pip install 'open-autoglm-edge[demo]'` (amqtt)"
            ) from None
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._loop = asyncio.new_event_loop()
        # amqtt logs every client disconnect as an error; its own trouble still shows.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)

        def main() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._broker = Broker(config, loop=self._loop)
                self._loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                self._error.append(exc)
                self._ready.set()
                return
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="amqtt", daemon=True)
        self._thread.start()
        self._ready.wait(15)
        if self._error:
            raise LocalStateError(f"the embedded broker did not start: {self._error[0]}")
        _wait_listening(
            self.port, lambda: self._thread is not None and self._thread.is_alive(), "amqtt"
        )

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        with contextlib.suppress(Exception):
            future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._broker = None


LocalBroker = MosquittoBroker | EmbeddedBroker


def start_local_broker(directory: Path, kind: str = "auto") -> LocalBroker:
    """`kind`: "mosquitto", "embedded", or "auto" (Mosquitto when installed)."""
    if kind not in ("auto", "mosquitto", "embedded"):
        raise ConfigError(f"broker {kind!r}: use auto, mosquitto or embedded")
    port = free_port()
    if kind == "mosquitto" or (kind == "auto" and mosquitto_path() is not None):
        broker: LocalBroker = MosquittoBroker(directory, port)
    else:
        broker = EmbeddedBroker(port)
    broker.start()
    log.info("MQTT broker: %s on %s", broker.kind, broker.address)
    return broker
