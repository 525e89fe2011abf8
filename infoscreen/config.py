"""The client's configuration: the contract's variables (docs/configuration.md), parsed once
into one typed object.

Sources: the process environment, and an env file given with ``--env-file`` for what the
environment does not set (the environment wins, as with systemd's ``Environment=`` over
``EnvironmentFile=``). A bad value raises :class:`ConfigError` whose text is the one line
the program prints before it exits; it names the variable and never shows a secret.
Standard library only: parsing needs nothing more, and the alert unit imports it too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

from .wire import ids

SECRET_VARS = frozenset({"MQTT_PASSWORD_BROKER"})
ENVIRONMENTS = ("production", "development", "test")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """A configuration value the program cannot start with; str() is one clear line."""

    def __init__(self, var: str, problem: str) -> None:
        super().__init__(f"configuration error: {var}: {problem}")
        self.var = var


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    client_uuid: str | None
    mqtt_broker: str
    mqtt_port: int
    mqtt_user: str | None
    mqtt_password: str | None = dataclasses.field(repr=False)
    mqtt_tls: bool
    mqtt_ca_file: str | None
    mqtt_cert_file: str | None
    mqtt_key_file: str | None
    mqtt_allow_plaintext: bool
    environment: str
    mock_execution: bool
    state_dir: Path
    runtime_dir: Path
    helper_socket: str
    heartbeat_interval_s: float
    health_interval_s: float
    display_process_name: str
    display_pidfile: str | None
    clock_trust: str
    boot_id_file: str
    # The helper's key file: only its existence is looked at (the client never reads the key),
    # for health's command_auth and to refuse an unsigned command on a keyed device at once.
    command_key_file: str
    # Project additions (docs/configuration.md): reboot confirmation and supervision policy.
    reboot_grace_s: float
    helper_timeout_s: float
    worker_heartbeat_s: float
    worker_hang_timeout_s: float
    max_restarts: int
    restart_window_s: float
    # The display process's owner (user name or uid): a process of that name owned by anyone else
    # is not the display. Unset: any owner.
    display_process_user: str | None = None

    @property
    def production(self) -> bool:
        return self.environment == "production"

    def to_environ(self) -> dict[str, str]:
        """The variables that reproduce this configuration in a child's environment."""
        out = {
            "MQTT_BROKER": self.mqtt_broker,
            "MQTT_PORT": str(self.mqtt_port),
            "MQTT_TLS": "1" if self.mqtt_tls else "0",
            "INFOSCREEN_ENV": self.environment,
            "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE": "1" if self.mock_execution else "0",
            "INFOSCREEN_STATE_DIR": str(self.state_dir),
            "INFOSCREEN_RUNTIME_DIR": str(self.runtime_dir),
            "HELPER_SOCKET": self.helper_socket,
            "HEARTBEAT_INTERVAL_S": repr(self.heartbeat_interval_s),
            "HEALTH_INTERVAL_S": repr(self.health_interval_s),
            "DISPLAY_PROCESS_NAME": self.display_process_name,
            "INFOSCREEN_CLOCK_TRUST": self.clock_trust,
            "INFOSCREEN_BOOT_ID_FILE": self.boot_id_file,
            "HELPER_COMMAND_KEY_FILE": self.command_key_file,
            "MQTT_ALLOW_PLAINTEXT": "1" if self.mqtt_allow_plaintext else "0",
            "REBOOT_GRACE_S": repr(self.reboot_grace_s),
            "HELPER_TIMEOUT_S": repr(self.helper_timeout_s),
            "WORKER_HEARTBEAT_S": repr(self.worker_heartbeat_s),
            "WORKER_HANG_TIMEOUT_S": repr(self.worker_hang_timeout_s),
            "SUPERVISOR_MAX_RESTARTS": str(self.max_restarts),
            "SUPERVISOR_RESTART_WINDOW_S": repr(self.restart_window_s),
        }
        optional = {
            "CLIENT_UUID": self.client_uuid,
            "MQTT_USER": self.mqtt_user,
            "MQTT_PASSWORD_BROKER": self.mqtt_password,
            "MQTT_CA_FILE": self.mqtt_ca_file,
            "MQTT_CERT_FILE": self.mqtt_cert_file,
            "MQTT_KEY_FILE": self.mqtt_key_file,
            "DISPLAY_PIDFILE": self.display_pidfile,
            "DISPLAY_PROCESS_USER": self.display_process_user,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments, quotes)."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--env-file", f"cannot read {path}: {exc.__class__.__name__}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError("--env-file", f"{path} line {lineno} is not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


class _Reader:
    """Typed access to the merged variables; each getter names its variable on error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, var: str) -> str | None:
        value = self.env.get(var)
        if value is None:
            return None
        value = value.strip()
        return value if value else None

    def text(self, var: str, default: str | None, *, max_len: int = 256) -> str | None:
        value = self.raw(var)
        if value is None:
            return default
        if len(value) > max_len or any(ord(c) < 32 for c in value):
            raise ConfigError(var, f"must be printable text of at most {max_len} characters")
        return value

    def boolean(self, var: str, default: bool) -> bool:
        value = self.env.get(var)
        if value is None:
            return default
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(var, f"must be a boolean (1/0, true/false, yes/no, on/off), got {value!r}")

    def integer(self, var: str, default: int, lo: int, hi: int) -> int:
        value = self.raw(var)
        if value is None:
            return default
        try:
            n = int(value, 10)
        except ValueError:
            raise ConfigError(var, f"must be an integer from {lo} to {hi}, got {value!r}") from None
        if not lo <= n <= hi:
            raise ConfigError(var, f"must be an integer from {lo} to {hi}, got {n}")
        return n

    def seconds(self, var: str, default: float, lo: float, hi: float) -> float:
        value = self.raw(var)
        if value is None:
            return default
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and lo <= x <= hi):
            raise ConfigError(var, f"must be a number of seconds from {lo:g} to {hi:g}, got {value!r}")
        return x

    def choice(self, var: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(var)
        if value is None:
            return default
        if value not in choices:
            raise ConfigError(var, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def readable_file(self, var: str) -> str | None:
        value = self.raw(var)
        if value is None:
            return None
        if not os.path.isfile(value) or not os.access(value, os.R_OK):
            raise ConfigError(var, f"{value} is not a readable file")
        return value


def is_loopback(host: str) -> bool:
    """A broker on this machine (by name or address; nothing is resolved)."""
    if host.rstrip(".").lower() in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def validate_client_uuid(value: str) -> str:
    """A UUID in its canonical form (lower case, hyphenated), as the topics and the broker
    accounts spell it: another spelling would put the device on topics nobody publishes to."""
    if not ids.is_canonical_uuid(value):
        raise ConfigError("CLIENT_UUID", f"must be a UUID in its canonical form (lower case, hyphenated), "
                          f"got {value!r}")
    return value


def load_config(environ: Mapping[str, str] | None = None, env_file: str | None = None) -> ClientConfig:
    """Parse and check every variable; raise ConfigError on the first bad one."""
    env: dict[str, str] = {}
    if env_file:
        env.update(read_env_file(env_file))
    env.update(os.environ if environ is None else environ)
    r = _Reader(env)

    environment = r.choice("INFOSCREEN_ENV", "production", ENVIRONMENTS)
    mock = r.boolean("COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE", False)
    if mock and environment == "production":
        raise ConfigError(
            "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE",
            "mock execution is refused in production (set INFOSCREEN_ENV=development or test to use it)",
        )
    client_uuid = r.text("CLIENT_UUID", None, max_len=64)
    if client_uuid is not None:
        validate_client_uuid(client_uuid)

    tls = r.boolean("MQTT_TLS", False)
    user = r.text("MQTT_USER", None)
    password = env.get("MQTT_PASSWORD_BROKER") or None
    if password is not None and (len(password) > 256 or "\n" in password):
        raise ConfigError("MQTT_PASSWORD_BROKER", "must be one line of at most 256 characters")
    if password is not None and user is None:
        raise ConfigError("MQTT_USER", "is required when MQTT_PASSWORD_BROKER is set")
    cert = r.readable_file("MQTT_CERT_FILE") if tls else r.raw("MQTT_CERT_FILE")
    key = r.readable_file("MQTT_KEY_FILE") if tls else r.raw("MQTT_KEY_FILE")
    if tls and key and not cert:
        raise ConfigError("MQTT_CERT_FILE", "is required when MQTT_KEY_FILE is set")

    broker = r.text("MQTT_BROKER", "localhost") or "localhost"
    allow_plaintext = r.boolean("MQTT_ALLOW_PLAINTEXT", False)
    if environment == "production" and not tls and not allow_plaintext and not is_loopback(broker):
        # The broker password (and every command) would cross the network in the clear.
        raise ConfigError("MQTT_TLS", f"TLS is required in production for a broker not on loopback "
                          f"({broker}); set MQTT_TLS=1 (and MQTT_CA_FILE), or MQTT_ALLOW_PLAINTEXT=1 "
                          "to send the broker password in the clear")
    runtime_default = env.get("RUNTIME_DIRECTORY", "").split(":")[0] or "/run/infoscreen"
    heartbeat_s = r.seconds("WORKER_HEARTBEAT_S", 2.0, 0.05, 60.0)
    hang_s = r.seconds("WORKER_HANG_TIMEOUT_S", 10.0, 0.2, 300.0)
    if hang_s <= heartbeat_s:
        raise ConfigError("WORKER_HANG_TIMEOUT_S", f"must be longer than WORKER_HEARTBEAT_S ({heartbeat_s:g} s)")

    return ClientConfig(
        client_uuid=client_uuid,
        mqtt_broker=broker,
        mqtt_port=r.integer("MQTT_PORT", 8883 if tls else 1883, 1, 65535),
        mqtt_user=user,
        mqtt_password=password,
        mqtt_tls=tls,
        mqtt_ca_file=r.readable_file("MQTT_CA_FILE") if tls else r.raw("MQTT_CA_FILE"),
        mqtt_cert_file=cert,
        mqtt_key_file=key,
        mqtt_allow_plaintext=allow_plaintext,
        environment=environment,
        mock_execution=mock,
        state_dir=Path(r.text("INFOSCREEN_STATE_DIR", "/var/lib/infoscreen", max_len=200) or ""),
        runtime_dir=Path(r.text("INFOSCREEN_RUNTIME_DIR", runtime_default, max_len=90) or ""),
        helper_socket=r.text("HELPER_SOCKET", "/run/infoscreen-helper/helper.sock", max_len=107) or "",
        heartbeat_interval_s=r.seconds("HEARTBEAT_INTERVAL_S", 30.0, 0.1, 3600.0),
        health_interval_s=r.seconds("HEALTH_INTERVAL_S", 60.0, 0.1, 3600.0),
        display_process_name=r.text("DISPLAY_PROCESS_NAME", "display_manager", max_len=64) or "",
        display_pidfile=r.text("DISPLAY_PIDFILE", None, max_len=200),
        clock_trust=r.choice("INFOSCREEN_CLOCK_TRUST", "auto", ("auto", "always")),
        boot_id_file=r.text("INFOSCREEN_BOOT_ID_FILE", "/proc/sys/kernel/random/boot_id", max_len=200) or "",
        command_key_file=r.text("HELPER_COMMAND_KEY_FILE", "/etc/infoscreen/command.key", max_len=200) or "",
        reboot_grace_s=r.seconds("REBOOT_GRACE_S", 120.0, 1.0, 3600.0),
        helper_timeout_s=r.seconds("HELPER_TIMEOUT_S", 5.0, 0.1, 60.0),
        worker_heartbeat_s=heartbeat_s,
        worker_hang_timeout_s=hang_s,
        max_restarts=r.integer("SUPERVISOR_MAX_RESTARTS", 5, 1, 10000),
        restart_window_s=r.seconds("SUPERVISOR_RESTART_WINDOW_S", 60.0, 1.0, 86400.0),
        display_process_user=r.text("DISPLAY_PROCESS_USER", None, max_len=64),
    )


def ensure_client_uuid(cfg: ClientConfig) -> ClientConfig:
    """The configured identity, or the one generated once and kept in the state dir."""
    if cfg.client_uuid:
        return cfg
    path = cfg.state_dir / "client_uuid"
    try:
        existing = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        existing = ""
    except OSError as exc:
        raise ConfigError("INFOSCREEN_STATE_DIR", f"cannot read {path}: {exc.strerror}") from None
    if existing:
        return dataclasses.replace(cfg, client_uuid=validate_client_uuid(existing))
    new = str(uuid.uuid4())
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(new + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError("INFOSCREEN_STATE_DIR", f"cannot write {path}: {exc.strerror}") from None
    return dataclasses.replace(cfg, client_uuid=new)
