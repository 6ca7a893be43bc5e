"""The agent's MQTT connection (paho-mqtt 2, MQTT 5): persistent session, QoS 1 subscriptions,
reconnect with backoff, and publishing of local alerts.

The persistent session (a stable client id, clean_start=False, a session expiry interval)
makes the broker queue QoS 1 messages while the agent is away (restart, network loss) and
deliver them when it is back. The network callback only decodes and enqueues.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttLink
from edge_agent.errors import ConfigError
from edge_agent.ingest import wide_select
from edge_agent.ingest.decode import Decoded, shown_topic

log = logging.getLogger(__name__)
wide_select.install(mqtt)  # paho's loop waits with select(): any descriptor number


def new_client(
    client_id: str = "", reconnect_on_failure: bool = True, protocol: str = "5"
) -> mqtt.Client:
    """A paho 2 client with the version-2 callback signatures, speaking MQTT 5 (or 3.1.1
    with a persistent session when it has a client id)."""
    if protocol == "3.1.1":
        return mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=not client_id,
            reconnect_on_failure=reconnect_on_failure,
        )
    return mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        reconnect_on_failure=reconnect_on_failure,
    )


class MqttLinkStats:
    """Connection counters for the health report."""

    def __init__(self) -> None:
        self.connects = 0
        self.disconnects = 0
        self.session_resumed = 0
        self.messages = 0
        self.last_error = ""


class MqttConnection:
    """Owns the paho client and its network thread."""

    def __init__(
        self,
        link: MqttLink,
        client_id: str,
        subscriptions: Sequence[str],
        decode: Callable[[str, bytes], Decoded | None],
        deliver: Callable[[Decoded], None],
        will: tuple[str, bytes] | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.link = link
        self.subscriptions = list(dict.fromkeys(subscriptions))
        self._decode = decode
        self._deliver = deliver
        self._on_connected = on_connected  # after each (re)connect: births
        self.stats = MqttLinkStats()
        self.connected = threading.Event()
        client = new_client(client_id, protocol=link.protocol)
        client.reconnect_delay_set(
            max(1, round(link.reconnect_min_s)), max(1, round(link.reconnect_max_s))
        )
        client.max_queued_messages_set(0)  # alerts published while offline wait in memory
        if link.username:
            client.username_pw_set(link.username, link.password or None)
        if link.tls is not None:
            try:
                client.tls_set(
                    ca_certs=str(link.tls.ca_file) if link.tls.ca_file else None,
                    certfile=str(link.tls.cert_file) if link.tls.cert_file else None,
                    keyfile=str(link.tls.key_file) if link.tls.key_file else None,
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"mqtt.tls: cannot load the TLS files: {exc}") from None
        self._will = will
        if will is not None:  # published by the broker if this connection dies
            client.will_set(will[0], will[1], qos=1, retain=False)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    def start(self) -> None:
        if self.link.protocol == "3.1.1":
            self.client.connect_async(
                self.link.host, self.link.port, keepalive=self.link.keepalive_s
            )
        else:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.link.session_expiry_s
            self.client.connect_async(
                self.link.host,
                self.link.port,
                keepalive=self.link.keepalive_s,
                clean_start=False,
                properties=props,
            )
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnects; a will (a Sparkplug NDEATH) is still delivered: a clean stop is a
        death to the hosts too (MQTT 5: reason "disconnect with will message"; 3.1.1: the
        will published before disconnecting)."""
        if self._will is None:
            self.client.disconnect()
        elif self.link.protocol == "3.1.1":
            info = self.client.publish(self._will[0], self._will[1], qos=1)
            if self.connected.is_set():
                info.wait_for_publish(2.0)
            self.client.disconnect()
        else:
            with_will = ReasonCode(PacketTypes.DISCONNECT, identifier=4)
            self.client.disconnect(reasoncode=with_will)
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queues a publish; paho sends it now, or after reconnecting."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))

    # ---- paho callbacks (network thread) ----
    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self.stats.last_error = str(reason)
            log.error(
                "broker %s:%d refused the connection: %s", self.link.host, self.link.port, reason
            )
            return
        self.stats.connects += 1
        if flags.session_present:
            self.stats.session_resumed += 1
        if self.subscriptions:
            topics: list[tuple[str, int]] = [(t, int(self.link.qos)) for t in self.subscriptions]
            client.subscribe(topics)
        self.connected.set()
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:
                log.exception("publishing after connecting failed")
        log.info(
            "connected to %s:%d (%s session); %d subscription(s)",
            self.link.host,
            self.link.port,
            "resumed" if flags.session_present else "new",
            len(self.subscriptions),
        )

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self.connected.clear()
        self.stats.disconnects += 1
        if reason.value != 0:
            self.stats.last_error = str(reason)
            log.warning("broker connection lost (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.stats.messages += 1
        try:
            decoded = self._decode(msg.topic, bytes(msg.payload))
        except Exception:
            log.exception("decoder failed on a message on %s; dropped", shown_topic(msg.topic))
            return
        if decoded is not None:
            self._deliver(decoded)
