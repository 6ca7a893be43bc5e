"""From MQTT messages to aligned sensor rows: decoding, routing, streaming alignment."""
