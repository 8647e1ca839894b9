"""The premises side: embedded broker (amqtt), topic contract, device access control, MQTT dispatch."""
