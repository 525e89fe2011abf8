"""The MQTT worker: the only process of the tree that reads the network (docs/mqtt-worker.md)."""
