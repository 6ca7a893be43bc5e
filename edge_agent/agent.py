"""The running agent: site data path (ingest, inference, alerts, outbox) and cloud session."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from edge_agent import hostfacts
from edge_agent.bundle import load_public_key
from edge_agent.config import AgentConfig
from edge_agent.identity import load_identity
from edge_agent.outbox import Outbox
from edge_agent.runtime import EdgeRuntime
from edge_agent.serving import ServingModel, open_serving
from edge_agent.session import CloudSession
from edge_agent.sync import RecordSync
from protos.autoglm.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)
OUTBOX_FILE = "outbox.sqlite3"


class Agent:
    """Owns the agent's parts and reports their state in heartbeats."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.identity = load_identity(config.state_dir)
        self.started = time.monotonic()
        self.model: ServingModel | None = None
        if config.model.bundle is not None:
            key = load_public_key(self.identity.signing_public_pem, "identity/signing.pub")
            self.model = open_serving(
                config.model.bundle,
                key,
                config.model,
                config.state_dir / "models",
                config.state_dir / "engines",
            )
        self.outbox = Outbox(config.state_dir / OUTBOX_FILE, config.outbox.max_bytes)
        client_id = config.mqtt.client_id or f"autoglm-edge-{self.identity.info.device_name}"
        self.runtime = EdgeRuntime(config, self.model, self.outbox, client_id)
        self.sync = RecordSync(self.outbox, config.sync.batch_records, config.sync.max_in_flight)
        self.session = CloudSession(
            self.identity,
            status=self.status,
            host=self.host,
            backoff=config.reconnect.backoff(),
            heartbeat_interval_s=config.cloud.heartbeat_interval_s,
            device_address=config.cloud.device_address,
            tls_server_name=config.cloud.tls_server_name,
            sync=self.sync,
        )

    def status(self) -> agent_pb2.AgentStatus:
        model = self.model
        return agent_pb2.AgentStatus(
            model_name=model.manifest.name if model else "",
            model_version=model.version if model else "",
            inference_backend=model.choice.label if model else "",
            uptime_seconds=time.monotonic() - self.started,
            health=self.runtime.health(hostfacts.disk_free_bytes(self.config.state_dir)),
        )

    def host(self) -> common_pb2.HostFacts:
        return hostfacts.collect(self.config.state_dir)

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "agent %s (%s) starting; control plane %s; broker %s:%d; %d asset(s); model %s",
            self.identity.info.device_name,
            self.identity.info.device_id,
            self.session.address,
            self.config.mqtt.host,
            self.config.mqtt.port,
            len(self.config.assets),
            self.model.version if self.model else "none",
        )
        self.runtime.start()
        try:
            await self.session.run(stop)
        finally:
            await asyncio.to_thread(self.runtime.stop)
            self.outbox.close()
            if self.model is not None:
                self.model.close()
        log.info("agent stopped")


async def run_until_signalled(agent: Agent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)
