"""``infoscreen-notify-failure UNIT``: the retained ``service_failed`` alert, sent when systemd gave up.

Run by ``infoscreen-notify-failure@UNIT.service``, which ``OnFailure=`` of the client's unit starts.
``OnFailure=`` fires at different moments across systemd versions (on some, at every failure even
while an automatic restart is still pending), so this program first asks systemd for the unit's
real state (``systemctl show``, fixed argv, no shell) and alerts only when it has given up
(``ActiveState=failed``). While the unit is between two lives (``auto-restart``, ``activating``)
it waits, bounded, for the outcome: if systemd's last attempt fails meanwhile, this instance is the
one that must alert (systemd would merge a second OnFailure start into this running instance).

The alert is the seed's payload on ``infoscreen/{uuid}/service_failed``, QoS 1, retained, MQTT 5,
with the device's own broker account; it counts as delivered only on a PUBACK with a reason code
below 128. The broker being down is retried with backoff for a bounded time.

Exit status: 0 alert delivered, or no alert needed (the reason is printed); 1 could not deliver;
2 bad usage or configuration (one line naming the variable).

Configuration: the client's own variables (CONTRACT.md), from the environment (the unit's
``EnvironmentFile=``) or ``--env-file``. Only the variables this program needs are read, through
the client's own parser (``infoscreen.config``): a bad value of an unrelated variable, which may be
the very reason the client crash-looped, must not also silence its alert.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from infoscreen.config import ClientConfig, ConfigError, load_config, read_env_file, validate_client_uuid

PROG = "infoscreen-notify-failure"
EXIT_OK, EXIT_UNDELIVERED, EXIT_USAGE = 0, 1, 2

# The only variables read; everything else in the .env is the client's business.
NEEDED_VARS = (
    "CLIENT_UUID",
    "MQTT_BROKER",
    "MQTT_PORT",
    "MQTT_USER",
    "MQTT_PASSWORD_BROKER",
    "MQTT_TLS",
    "MQTT_CA_FILE",
    "MQTT_CERT_FILE",
    "MQTT_KEY_FILE",
    "INFOSCREEN_STATE_DIR",
)
UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}")
SHOW_PROPS = ("ActiveState", "SubState", "Result", "NRestarts", "StateChangeTimestampMonotonic")
# States in which systemd has not decided yet: an automatic restart is pending or running.
UNSETTLED_ACTIVE = {"activating", "deactivating", "reloading"}

# CONNACK reason codes after which retrying cannot help (MQTT 5: 0x84 unsupported protocol
# version, 0x85 client id not valid, 0x86 bad user name or password, 0x87 not authorized,
# 0x8C bad authentication method); anything else (server busy, unavailable, network) is retried.
PERMANENT_CONNACK = {0x84, 0x85, 0x86, 0x87, 0x8C}


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ systemd state
@dataclass
class UnitState:
    active: str
    sub: str
    result: str
    n_restarts: str
    changed_mono_us: int | None

    @property
    def settled(self) -> bool:
        return self.active not in UNSETTLED_ACTIVE and self.sub != "auto-restart"

    def __str__(self) -> str:
        return f"ActiveState={self.active} SubState={self.sub} Result={self.result} NRestarts={self.n_restarts}"


def systemctl_path() -> str:
    for p in ("/usr/bin/systemctl", "/bin/systemctl"):
        if os.access(p, os.X_OK):
            return p
    return shutil.which("systemctl") or "/usr/bin/systemctl"


def query_unit(unit: str, timeout: float = 15.0) -> UnitState:
    """``systemctl show`` with a fixed argv and a minimal environment; RuntimeError on failure."""
    argv = [systemctl_path(), "show", "-p", ",".join(SHOW_PROPS), "--", unit]
    try:
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"systemctl show failed: {exc.__class__.__name__}: {exc}") from None
    if r.returncode != 0:
        raise RuntimeError(f"systemctl show exited {r.returncode}: {r.stderr.strip()[:300]}")
    props: dict[str, str] = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition("=")
        props[k] = v
    mono = props.get("StateChangeTimestampMonotonic", "")
    return UnitState(
        active=props.get("ActiveState", ""),
        sub=props.get("SubState", ""),
        result=props.get("Result", ""),
        n_restarts=props.get("NRestarts", ""),
        changed_mono_us=int(mono) if mono.isdigit() and int(mono) > 0 else None,
    )


SETTLE_INTERVAL = 0.5  # s between two `systemctl show` while a restart is pending


def settle(
    unit: str,
    timeout: float,
    query: Callable[[str], UnitState] | None = None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> UnitState:
    """The unit's state once systemd has decided (failed, active, inactive), or the last one seen
    when ``timeout`` passes first. There is no event to wait on without D-Bus signal plumbing, so
    this polls ``systemctl show`` every SETTLE_INTERVAL, bounded by ``timeout``."""
    query = query or query_unit
    clock = clock or time.monotonic
    sleep = sleep or time.sleep
    deadline = clock() + timeout
    state = query(unit)
    if not state.settled:
        log(f"{unit} is between two lives ({state}); waiting up to {timeout:g} s for systemd's decision")
    while not state.settled and clock() < deadline:
        sleep(SETTLE_INTERVAL)
        state = query(unit)
    return state


def failed_at_from(state: UnitState | None) -> float:
    """Wall-clock time of the unit's last state change (when it entered ``failed``), else now."""
    now = time.time()
    if state is None or state.changed_mono_us is None:
        return now
    age = time.monotonic() - state.changed_mono_us / 1e6
    return now - age if 0 <= age < 86400 else now


# ---------------------------------------------------------------------------- configuration
def load_alert_config(environ: Mapping[str, str], env_file: str | None) -> ClientConfig:
    merged: dict[str, str] = {}
    if env_file:
        merged.update(read_env_file(env_file))
    merged.update(environ)
    subset = {k: merged[k] for k in NEEDED_VARS if k in merged}
    return load_config(subset)


def resolve_uuid(cfg: ClientConfig) -> str:
    if cfg.client_uuid:
        return cfg.client_uuid
    path = cfg.state_dir / "client_uuid"
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConfigError("CLIENT_UUID", f"not set, and {path} cannot be read ({exc.strerror})") from None
    if not text:
        raise ConfigError("CLIENT_UUID", f"not set, and {path} is empty")
    try:
        return validate_client_uuid(text)
    except ConfigError:
        raise ConfigError("CLIENT_UUID", f"not set, and {path} holds no UUID") from None


def alert_payload(unit: str, client_uuid: str, failed_at: float) -> bytes:
    """The seed's payload, in the seed's key order."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(failed_at))
    return json.dumps(
        {"event": "service_failed", "unit": unit, "client_uuid": client_uuid, "failed_at": stamp},
        separators=(",", ":"),
    ).encode()


def alert_topic(client_uuid: str) -> str:
    from infoscreen.wire import topics

    return topics.service_failed(client_uuid)


# ---------------------------------------------------------------------------------- delivery
class PermanentFailure(Exception):
    pass


class TransientFailure(Exception):
    pass


def publish_once(cfg: ClientConfig, topic: str, payload: bytes, client_id: str, timeout: float) -> None:
    """Connect, publish QoS 1 retained, wait for the PUBACK, disconnect. Raises on failure."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    state: dict[str, object] = {}

    def on_connect(client, userdata, flags, reason_code, properties):  # noqa: ANN001
        state["connack"] = reason_code

    def on_publish(client, userdata, mid, reason_code, properties):  # noqa: ANN001
        state.setdefault("puback", {})[mid] = reason_code  # type: ignore[index]

    def on_disconnect(client, userdata, flags, reason_code, properties):  # noqa: ANN001
        state["disconnect"] = reason_code

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    if cfg.mqtt_user:
        client.username_pw_set(cfg.mqtt_user, cfg.mqtt_password)
    else:
        log("warning: connecting without a broker login (MQTT_USER is not set)")
    if cfg.mqtt_tls:
        client.tls_set(ca_certs=cfg.mqtt_ca_file, certfile=cfg.mqtt_cert_file, keyfile=cfg.mqtt_key_file)
    deadline = time.monotonic() + timeout
    try:
        try:
            client.connect(cfg.mqtt_broker, cfg.mqtt_port, keepalive=30, clean_start=True)
        except OSError as exc:
            raise TransientFailure(f"cannot connect to {cfg.mqtt_broker}:{cfg.mqtt_port}: {exc.strerror or exc}") from None
        while "connack" not in state:
            if time.monotonic() > deadline:
                raise TransientFailure("no CONNACK in time")
            rc = client.loop(timeout=0.2)
            if rc != mqtt.MQTT_ERR_SUCCESS and "connack" not in state:
                raise TransientFailure(f"connection lost before CONNACK ({mqtt.error_string(rc)})")
        connack = state["connack"]
        value = getattr(connack, "value", connack)
        if getattr(connack, "is_failure", False):
            msg = f"broker refused the connection: {connack} (0x{int(value):02X})"  # type: ignore[arg-type]
            if int(value) in PERMANENT_CONNACK:  # type: ignore[arg-type]
                raise PermanentFailure(msg)
            raise TransientFailure(msg)
        info = client.publish(topic, payload, qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransientFailure(f"publish failed locally ({mqtt.error_string(info.rc)})")
        while info.mid not in state.get("puback", {}):  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise TransientFailure("no PUBACK in time")
            rc = client.loop(timeout=0.2)
            if rc != mqtt.MQTT_ERR_SUCCESS and info.mid not in state.get("puback", {}):  # type: ignore[operator]
                raise TransientFailure(f"connection lost before PUBACK ({mqtt.error_string(rc)})")
        puback = state["puback"][info.mid]  # type: ignore[index]
        if getattr(puback, "is_failure", False):
            # 0x87 not authorized (the ACL), 0x95 packet too large, ...: retrying cannot help.
            raise PermanentFailure(f"broker refused the alert: PUBACK {puback} (0x{int(puback.value):02X})")
    finally:
        if client.socket() is not None:
            try:
                client.disconnect()
                client.loop(timeout=0.2)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


def deliver(
    cfg: ClientConfig,
    topic: str,
    payload: bytes,
    client_id: str,
    budget: float,
    attempt_timeout: float = 10.0,
    publish: Callable[..., None] = publish_once,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Retry transient failures with capped exponential backoff until ``budget`` seconds passed."""
    deadline = clock() + budget
    delay = 0.5
    attempt = 0
    while True:
        attempt += 1
        left = deadline - clock()
        try:
            publish(cfg, topic, payload, client_id, max(1.0, min(attempt_timeout, left)))
            log(f"alert delivered on {topic} (attempt {attempt})")
            return True
        except PermanentFailure as exc:
            log(f"giving up: {exc}")
            return False
        except TransientFailure as exc:
            left = deadline - clock()
            if left <= 0:
                log(f"giving up after {attempt} attempts in {budget:g} s: {exc}")
                return False
            wait = min(delay, left)
            log(f"attempt {attempt} failed ({exc}); retrying in {wait:.1f} s")
            sleep(wait)
            delay = min(delay * 2, 10.0)


# -------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Publish the retained service_failed alert for UNIT when systemd has given up on it.",
    )
    p.add_argument("unit", metavar="UNIT", help="the failed unit, e.g. infoscreen-simclient.service")
    p.add_argument("--env-file", help="read the client's variables from this file too (the environment wins)")
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=60.0,
        help="how long to wait for systemd's decision while an automatic restart is pending (default 60)",
    )
    p.add_argument(
        "--deliver-timeout",
        type=float,
        default=90.0,
        help="how long to retry while the broker is unreachable (default 90)",
    )
    p.add_argument(
        "--no-state-check",
        action="store_true",
        help="alert without asking systemd (manual use, tests)",
    )
    return p


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    unit = args.unit
    if not UNIT_RE.fullmatch(unit):
        log(f"not a unit name: {unit!r}")
        return EXIT_USAGE
    try:
        cfg = load_alert_config(env, args.env_file)
        client_uuid = resolve_uuid(cfg)
    except ConfigError as exc:
        log(str(exc))
        return EXIT_USAGE

    state: UnitState | None = None
    if not args.no_state_check:
        try:
            state = settle(unit, args.settle_timeout)
        except RuntimeError as exc:
            # Better a false alert than a missed one: OnFailure= did fire.
            log(f"cannot read the state of {unit} ({exc}); alerting anyway")
        if state is not None:
            if state.active != "failed":
                if state.settled:
                    why = {
                        "active": "systemd restarted it and it is running again",
                        "inactive": "it is stopped, not failed",
                    }.get(state.active, "systemd has not given up on it")
                else:
                    why = f"systemd has not decided within {args.settle_timeout:g} s"
                log(f"no alert: {unit} {state}: {why}")
                return EXIT_OK
            log(f"{unit} has failed for good ({state}); alerting")

    payload = alert_payload(unit, client_uuid, failed_at_from(state))
    topic = alert_topic(client_uuid)
    # Not the client's own id: that would take over (and, with a clean start, wipe) the MQTT
    # worker's persistent session.
    client_id = f"{client_uuid}-notify-failure"
    ok = deliver(cfg, topic, payload, client_id, args.deliver_timeout)
    return EXIT_OK if ok else EXIT_UNDELIVERED


if __name__ == "__main__":
    sys.exit(main())
