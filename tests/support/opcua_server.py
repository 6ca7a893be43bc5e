"""An OPC UA server for tests: asyncua's own server in its own event loop thread, one object
with a Double variable per sensor (node ids `ns=<idx>;s=Pump1.<sensor>`), values written
with the source timestamps a test gives; with certificates it offers only Basic256Sha256
SignAndEncrypt. It can be stopped and started again on the same port."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

from cloud.local_broker import free_port
from cloud.loop_thread import end_loop


def make_certificate(directory: Path, name: str, app_uri: str, server: bool) -> tuple[Path, Path]:
    """(certificate, private key) of a self-signed application certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.der", directory / f"{name}.pem"
    use = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    asyncio.run(setup_self_signed_certificate(key, cert, app_uri, "localhost", use,
                                              {"commonName": name}))  # fmt: skip
    return cert, key


class OpcServer:
    def __init__(
        self,
        sensors: Sequence[str],
        certificate: tuple[Path, Path] | None = None,
        port: int = 0,
    ) -> None:
        self.sensors = list(sensors)
        self.certificate = certificate
        self.port = port or free_port()
        self.namespace = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._vars: dict[str, Any] = {}
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/autoglm/"

    def node_id(self, sensor: str) -> str:
        return f"ns={self.namespace};s=Pump1.{sensor}"

    def start(self, initial: Sequence[float], at: float) -> OpcServer:
        ready = threading.Event()
        failed: list[BaseException] = []

        async def serve() -> None:
            server = self._server = Server()
            await server.init()
            server.set_endpoint(self.endpoint)
            if self.certificate is not None:
                await server.load_certificate(str(self.certificate[0]))
                await server.load_private_key(str(self.certificate[1]))
                server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            self.namespace = await server.register_namespace("urn:autoglm:test-plant")
            pump = await server.nodes.objects.add_object(self.namespace, "Pump1")
            for sensor, value in zip(self.sensors, initial, strict=True):
                node = ua.NodeId(f"Pump1.{sensor}", self.namespace)
                var = await pump.add_variable(node, sensor, float(value))
                await var.write_value(_value(value, at))
                self._vars[sensor] = var
            await server.start()
            ready.set()
            while True:
                await asyncio.sleep(3600)

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(serve())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failed.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name="opcua-server", daemon=True)
        self._thread.start()
        ready.wait(60)
        if failed:
            raise failed[0]
        return self

    def write(self, row: Sequence[float], at: float) -> None:
        assert self._loop is not None

        async def write() -> None:
            for sensor, value in zip(self.sensors, row, strict=True):
                await self._vars[sensor].write_value(_value(value, at))

        asyncio.run_coroutine_threadsafe(write(), self._loop).result(10)

    def stop(self) -> None:
        assert self._loop is not None and self._server is not None and self._thread is not None
        loop, server = self._loop, self._server
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        for task in asyncio.all_tasks(loop):
            loop.call_soon_threadsafe(task.cancel)
        self._thread.join(10)
        if not self._thread.is_alive():  # its executor and selector go too
            end_loop(self._loop, self._thread)


def _value(value: float, at: float) -> ua.DataValue:
    stamp = dt.datetime.fromtimestamp(at, dt.UTC).replace(tzinfo=None)
    return ua.DataValue(
        ua.Variant(float(value), ua.VariantType.Double),
        SourceTimestamp=stamp,
        ServerTimestamp=stamp,
    )
