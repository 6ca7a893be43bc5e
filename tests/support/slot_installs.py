"""Model slots as a verified install leaves them, and an agent started over them, for the
tests of what the agent does at start when a slot or the slot pointer was damaged."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.bundle import MANIFEST, SIGNATURE
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.serving import ServingModel
from edge_agent.slots import TARGET, ModelSlots, SlotInfo
from protos.autoglm.v1 import agent_pb2

MODEL_FILE = "model.fp32.onnx"  # the variant a device without a GPU runs


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def desired(bundle: Path, version: str) -> agent_pb2.DesiredState:
    return agent_pb2.DesiredState(
        model_name="pump",
        model_version=version,
        manifest_digest=digest((bundle / MANIFEST).read_bytes()),
        signature_digest=digest((bundle / SIGNATURE).read_bytes()),
        rollout_id=f"r{version}",
    )


def install(slots: ModelSlots, slot: str, bundle: Path, version: str) -> SlotInfo:
    """`bundle` in `slot` with its marker, then served (what a verified install leaves)."""
    shutil.copytree(bundle, slots.slot_dir(slot))
    manifest_digest = digest((bundle / MANIFEST).read_bytes())
    (slots.slot_dir(slot) / TARGET).write_text(manifest_digest)
    info = SlotInfo(slot, "pump", version, manifest_digest, f"r{version}")
    slots.activate(info)
    return info


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def agent_config(state: Path) -> AgentConfig:
    return load_agent_config(
        None,
        {
            "state_dir": state,
            "assets": [{"name": "pump-1", "topics": ["p/+"]}],
            "metrics": {"listen": ""},
        },
    )


def close(agent: Agent) -> None:
    agent.updater.close()
    agent.outbox.close()
    if agent.model is not None:
        agent.model.close()


def apply(agent: Agent, wanted: agent_pb2.DesiredState) -> list[agent_pb2.InstallReport]:
    """Applies `wanted` with the agent's updater; returns the reports posted. The data path
    is not restarted on the model (what these tests are about ends before it)."""

    async def swap(model: ServingModel) -> None:
        old, agent.model = agent.model, model
        if old is not None:
            old.close()

    posted: list[agent_pb2.InstallReport] = []
    agent.swap = swap  # type: ignore[method-assign]
    agent.session.post = lambda m: posted.append(m.install)  # type: ignore[method-assign]
    asyncio.run(agent.updater.apply(wanted))
    return posted
