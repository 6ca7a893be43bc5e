"""The agent's links to the site besides its own JSON topics: Sparkplug B sources and the
agent's own Sparkplug edge node (over the one MQTT connection), polled Modbus devices, OPC UA
subscriptions, and the agent's own OPC UA alert server.
One MQTT message is a command to the agent's node, a Sparkplug message of a source, or JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from edge_agent.config import AgentConfig, AssetConfig
from edge_agent.decisions import AlertEvent
from edge_agent.errors import LocalStateError
from edge_agent.ingest.decode import Decoded, Decoder, TopicRoutes
from edge_agent.ingest.modbus import ModbusPoller, pollers
from edge_agent.ingest.mqtt import MqttConnection
from edge_agent.ingest.opcua import OpcUaSession
from edge_agent.ingest.opcua import sessions as opcua_sessions
from edge_agent.ingest.sparkplug import SparkplugDecoder, topics_for
from edge_agent.opcua_out import OpcUaAlerts
from edge_agent.sparkplug_out import SparkplugAlerts

log = logging.getLogger(__name__)


class Sources:
    def __init__(
        self,
        config: AgentConfig,
        assets: Sequence[AssetConfig],
        client_id: str,
        routes: TopicRoutes,
        decoder: Decoder,
        deliver: Callable[[Decoded], None],
        published_alerts: Sequence[AlertEvent],
    ) -> None:
        self.decoder = decoder
        self.sparkplug_in: SparkplugDecoder | None = None
        if any(a.sparkplug is not None for a in assets):
            self.sparkplug_in = SparkplugDecoder(assets, routes, decoder, self.publish_sparkplug)
        self.sparkplug_out: SparkplugAlerts | None = None
        subscriptions = [t for a in assets for t in a.topics] + topics_for(assets)
        if config.sparkplug_out is not None:
            self.sparkplug_out = SparkplugAlerts(
                config.sparkplug_out.group,
                config.sparkplug_out.edge_node,
                [a.name for a in assets],
                config.state_dir,
                self.publish_sparkplug,
            )
            self.sparkplug_out.restore(published_alerts)  # open when the agent started
            subscriptions.append(self.sparkplug_out.command_topic)
        out = self.sparkplug_out
        self.mqtt = MqttConnection(
            config.mqtt,
            client_id,
            subscriptions,
            self.decode,
            deliver,
            will=out.will() if out else None,
            on_connected=out.birth if out else None,
        )
        self.opcua_out: OpcUaAlerts | None = None
        if config.opcua_out is not None:
            self.opcua_out = OpcUaAlerts(config.opcua_out, [a.name for a in assets])
        self._published = list(published_alerts)
        self.modbus = pollers(assets, routes, decoder, deliver)
        self.opcua = opcua_sessions(assets, routes, decoder, deliver)
        self._links: list[ModbusPoller | OpcUaSession] = [*self.modbus, *self.opcua]

    def decode(self, topic: str, payload: bytes) -> Decoded | None:
        """One MQTT message (network thread)."""
        out = self.sparkplug_out
        if out is not None and topic == out.command_topic:
            out.on_command(payload)
            return None
        if self.sparkplug_in is not None and self.sparkplug_in.handles(topic):
            return self.sparkplug_in.decode(topic, payload)
        return self.decoder.decode(topic, payload)

    def publish_sparkplug(self, topic: str, payload: bytes) -> None:
        self.mqtt.publish(topic, payload, qos=0)

    def alert(self, event: AlertEvent) -> None:
        """An alert event published on site: to SCADA too."""
        if self.sparkplug_out is not None:
            self.sparkplug_out.alert(event)
        if self.opcua_out is not None:
            self.opcua_out.alert(event)

    def start(self) -> None:
        if self.opcua_out is not None:
            try:
                self.opcua_out.start(self._published)
            except LocalStateError as exc:  # the data path matters more: said, not fatal
                log.error("%s; the agent runs without its OPC UA alert server", exc)
                self.opcua_out = None
        self.mqtt.start()
        for link in self._links:
            link.start()

    def threads_alive(self) -> dict[str, bool]:
        """The Modbus and OPC UA threads, by name (the MQTT one is the runtime's)."""
        return {link.thread.name: link.thread.is_alive() for link in self._links}

    def stop(self) -> None:
        for link in self._links:
            link.stop()
        self.mqtt.stop()
        if self.opcua_out is not None:
            self.opcua_out.stop()
