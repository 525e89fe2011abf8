"""Test support shared by every suite: a real Mosquitto (`broker`), an MQTT test client (`mqtt`)
and waiting helpers (`waiting`). Import as `tests.support.broker` etc. (tests/conftest.py puts the
repository root on sys.path)."""
