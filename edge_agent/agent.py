"""The running agent: today its cloud session; ingest, inference and sync plug in here."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from edge_agent import hostfacts
from edge_agent.config import AgentConfig
from edge_agent.identity import load_identity
from edge_agent.session import CloudSession
from protos.autoglm.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)


class Agent:
    """Owns the agent's parts and reports their state in heartbeats."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.identity = load_identity(config.state_dir)
        self.started = time.monotonic()
        self.session = CloudSession(
            self.identity,
            status=self.status,
            host=self.host,
            backoff=config.reconnect.backoff(),
            heartbeat_interval_s=config.cloud.heartbeat_interval_s,
            device_address=config.cloud.device_address,
            tls_server_name=config.cloud.tls_server_name,
        )

    def status(self) -> agent_pb2.AgentStatus:
        return agent_pb2.AgentStatus(
            uptime_seconds=time.monotonic() - self.started,
            health=agent_pb2.AgentHealth(
                disk_free_bytes=hostfacts.disk_free_bytes(self.config.state_dir),
            ),
        )

    def host(self) -> common_pb2.HostFacts:
        return hostfacts.collect(self.config.state_dir)

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "agent %s (%s) starting; control plane %s",
            self.identity.info.device_name,
            self.identity.info.device_id,
            self.session.address,
        )
        await self.session.run(stop)
        log.info("agent stopped")


async def run_until_signalled(agent: Agent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)
