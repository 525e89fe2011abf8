"""The MQTT wire contract shared by the device, the operator tool and the alert unit.

Topics and payload shapes live here once, so every program speaks the contract of
docs/server-integration.md the same way.
"""
