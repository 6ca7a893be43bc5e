"""Heartbeats the control plane never answers (dropped under load) do not pile up on the
agent for the rest of the session: an answer to a later one means the earlier were dropped,
and those older than the dead-path bound go too. The stream is a stand-in that answers every
other heartbeat, in order, as the plane's stream does."""

from __future__ import annotations

import asyncio

from edge_agent.retry import Backoff
from edge_agent.session import CloudSession
from protos.autoglm.v1 import agent_pb2, common_pb2


class HalfAnswering:
    """The read side of a session stream: answers the even heartbeats, drops the odd."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[agent_pb2.ControlMessage] = asyncio.Queue()

    async def send(self, message: agent_pb2.AgentMessage) -> None:
        seq = message.heartbeat.seq
        if seq % 2 == 0:
            ack = agent_pb2.HeartbeatAck(seq=seq)
            await self.answers.put(agent_pb2.ControlMessage(heartbeat_ack=ack))

    async def read(self) -> agent_pb2.ControlMessage:
        return await self.answers.get()


def test_dropped_heartbeats_are_forgotten_and_the_session_lives() -> None:
    async def main() -> tuple[int, int, int]:
        session = CloudSession(
            identity=None,  # type: ignore[arg-type]  # not used: no channel is opened
            status=agent_pb2.AgentStatus,
            host=common_pb2.HostFacts,
            backoff=Backoff(),
            device_address="127.0.0.1:1",
            tls_server_name="localhost",
            dead_after_s=60.0,
        )
        stream = HalfAnswering()
        session._last_heard = asyncio.get_running_loop().time()
        reader = asyncio.create_task(session._read(stream))  # type: ignore[arg-type]
        stop = asyncio.Event()
        most = 0

        async def watch() -> None:
            nonlocal most
            while session.stats.heartbeats_sent < 400:
                most = max(most, len(session._sent_at))
                await asyncio.sleep(0.001)
            stop.set()

        watcher = asyncio.create_task(watch())
        await session._heartbeats(stream.send, 0.001, stop, reader, None)
        await watcher
        reader.cancel()
        return most, session.stats.heartbeats_sent, session.stats.heartbeats_acked

    most, sent, acked = asyncio.run(main())
    assert sent >= 400 and acked >= sent // 2 - 2, (sent, acked)
    assert most <= 3, f"{most} unanswered heartbeats kept after {sent} sent, half answered"
