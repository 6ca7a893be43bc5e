"""Alerts back to SCADA over OPC UA: a small asyncua server in its own thread (`opcua_out.
listen`) with one object per asset under `Objects/AutoGLM`, whose variables an HMI
subscribes to like any PLC tag:

    Fault       Boolean  an alert is open on the asset
    Score       Double   the window score that raised or cleared it (1.0 = threshold)
    TopSensors  String   the sensors that moved most, strongest first
    AlertKey    String   the alert's key (the same on its raise and its clear)

Node ids: `ns=<namespace index>;s=<asset>.<Variable>` in namespace `urn:autoglm:alerts`.
Security: None (labs), or Basic256Sha256 SignAndEncrypt only, with the agent's certificate.
Values carry the window's time as their source timestamp. Open alerts at start are shown."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Sequence
from typing import Any

from edge_agent.config import OpcUaOut
from edge_agent.decisions import RAISED, AlertEvent
from edge_agent.errors import LocalStateError

log = logging.getLogger(__name__)
NAMESPACE = "urn:autoglm:alerts"
VARIABLES = ("Fault", "Score", "TopSensors", "AlertKey")


class OpcUaAlerts:
    def __init__(self, config: OpcUaOut, assets: Sequence[str]) -> None:
        self.config = config
        self.assets = list(assets)
        self.namespace = 0
        self._nodes: dict[tuple[str, str], Any] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="opcua-alerts", daemon=True)
        self._pending: list[AlertEvent] = []  # shown once the server is up
        self._serving = False

    def start(self, open_alerts: Sequence[AlertEvent] = ()) -> None:
        self._pending = list(open_alerts)
        self._thread.start()
        self._ready.wait(60)
        if self._failed is not None:
            raise LocalStateError(
                f"opcua_out: cannot serve on {self.config.listen}: {self._failed}"
            ) from None

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def alert(self, event: AlertEvent) -> None:
        """Shows a raise or clear (any thread)."""
        if not self._serving or event.asset not in self.assets:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._show(event), self._loop)
        except RuntimeError:  # stopped meanwhile
            return

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - said by start(), or logged
            self._failed = exc
            log.error("OPC UA alert server stopped: %s", exc)
        finally:
            self._serving = False
            self._ready.set()
            self._loop.close()

    async def _serve(self) -> None:
        from asyncua import ua
        from asyncua.server.server import Server

        self._stop = asyncio.Event()
        server = Server()
        await server.init()
        host, _, port = self.config.listen.rpartition(":")
        server.set_endpoint(f"opc.tcp://{host}:{port}/autoglm/")
        server.set_server_name("Open-AutoGLM Edge alerts")
        if self.config.certificate is not None and self.config.private_key is not None:
            await server.load_certificate(str(self.config.certificate))
            await server.load_private_key(str(self.config.private_key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.namespace = await server.register_namespace(NAMESPACE)
        root = await server.nodes.objects.add_object(self.namespace, "AutoGLM")
        initial = (False, 0.0, "", "")
        for asset in self.assets:
            folder = await root.add_object(self.namespace, asset)
            for name, value in zip(VARIABLES, initial, strict=True):
                node_id = ua.NodeId(ua.String(f"{asset}.{name}"), ua.Int16(self.namespace))
                self._nodes[(asset, name)] = await folder.add_variable(node_id, name, value)
        async with server:
            for event in self._pending:
                await self._show(event)
            self._serving = True
            self._ready.set()
            log.info("OPC UA alert server on %s (%d asset(s))", self.config.listen,
                     len(self.assets))  # fmt: skip
            await self._stop.wait()
            self._serving = False

    async def _show(self, event: AlertEvent) -> None:
        from asyncua import ua

        stamp = dt.datetime.fromtimestamp(event.window_end, dt.UTC).replace(tzinfo=None)
        values = (
            (event.kind == RAISED, ua.VariantType.Boolean),
            (float(event.score), ua.VariantType.Double),
            (",".join(s for s, _ in event.top_sensors), ua.VariantType.String),
            (event.key, ua.VariantType.String),
        )
        try:
            for name, (value, kind) in zip(VARIABLES, values, strict=True):
                variant = ua.Variant(value, kind)
                data = ua.DataValue(variant, SourceTimestamp=stamp, ServerTimestamp=stamp)  # type: ignore[arg-type]
                await self._nodes[(event.asset, name)].write_value(data)
        except Exception:
            log.exception("OPC UA alert server: cannot show the alert on %s", event.asset)
