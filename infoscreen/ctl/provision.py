"""`infoscreenctl broker provision`: a hardened Mosquitto 2 configuration in one command.

From a list of device UUIDs it writes, into one directory:

- ``mosquitto.conf``: one listener, anonymous access off, password and ACL files, TCP_NODELAY,
  persistence inside the directory, bounded queues and message sizes;
- ``passwd``: one account per device plus the server account, hashed exactly as
  ``mosquitto_passwd`` 2.0 writes them (``$7$101$<b64 salt>$<b64 PBKDF2-SHA512>``);
- ``acl``: the seed's ACL table, spelled out per device (explicit topics, never ``%c``/``%u``
  patterns), with reads restricted too, plus CONTRACT.md's one deliberate change (the server may
  write ``service_failed`` to clear the retained alert);
- ``devices/<uuid>.env`` (mode 0600) and ``server.env`` (mode 0600): the credentials, which are
  never printed.

Re-running on an existing directory keeps every existing password (they are read back from the env
files), so adding a device does not rotate the others' credentials. A device dropped from the list
loses its account and its env file.

The test fixture (``tests/support/broker.py``) generates its brokers with this same code.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import hmac
import os
import pwd
import re
import secrets
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "DEFAULT_SERVER_USER",
    "ProvisionError",
    "Provisioned",
    "build_parser_args",
    "device_username",
    "hash_password",
    "main",
    "parse_devices",
    "parse_env_file",
    "provision",
    "read_devices_file",
    "register",
    "run",
    "verify_password",
]

DEFAULT_SERVER_USER = "infoscreen-server"
DEVICE_USER_PREFIX = "infoscreen-client-"
DEFAULT_BROKER_SYSTEM_USER = "mosquitto"

# mosquitto_passwd 2.0: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, 64-byte digest.
PW_SHA512_PBKDF2 = 7
PW_ITERATIONS = 101
PW_SALT_LEN = 12

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.:_\[\]-]+$")

CONF_NAME = "mosquitto.conf"
PASSWD_NAME = "passwd"
ACL_NAME = "acl"
SERVER_ENV_NAME = "server.env"
DEVICES_DIR = "devices"
DATA_DIR = "data"


class ProvisionError(Exception):
    """A problem with the input or the output directory, described in one line."""


# --------------------------------------------------------------------------------------------
# Passwords


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PW_ITERATIONS) -> str:
    """The hash field of a Mosquitto 2.0 password file line (``$7$101$salt$digest``)."""
    if salt is None:
        salt = secrets.token_bytes(PW_SALT_LEN)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return "${}${}${}${}".format(
        PW_SHA512_PBKDF2,
        iterations,
        base64.b64encode(salt).decode("ascii"),
        base64.b64encode(digest).decode("ascii"),
    )


def verify_password(password: str, hashed: str) -> bool:
    """True when `hashed` (a ``$7$`` field as mosquitto_passwd writes it) matches `password`."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != str(PW_SHA512_PBKDF2):
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(candidate, digest)


def new_password() -> str:
    # 256 bits, URL-safe alphabet: needs no quoting in an env file or a shell.
    return secrets.token_urlsafe(32)


# --------------------------------------------------------------------------------------------
# Input


def device_username(uuid: str) -> str:
    """The seed's account name convention: ``infoscreen-client-<first 8 hex of the uuid>``."""
    return DEVICE_USER_PREFIX + uuid[:8].lower()


def parse_devices(lines: Iterable[str], source: str = "devices") -> list[str]:
    """UUIDs, one a line; blank lines and ``#`` comments (whole-line or trailing) ignored.

    UUIDs must be in the canonical 8-4-4-4-12 form; they are normalised to lower case (topics are
    case-sensitive and the client generates lower-case ones). Duplicates, and two devices whose
    account names would collide (same first 8 hex digits), are errors.
    """
    devices: list[str] = []
    seen: dict[str, int] = {}
    users: dict[str, str] = {}
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not _UUID_RE.match(line):
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise ProvisionError(f"{source}:{lineno}: not a UUID (8-4-4-4-12 hex): {shown!r}")
        uuid = line.lower()
        if uuid in seen:
            raise ProvisionError(f"{source}:{lineno}: duplicate device {uuid} (first on line {seen[uuid]})")
        user = device_username(uuid)
        if user in users:
            raise ProvisionError(
                f"{source}:{lineno}: device {uuid} and {users[user]} would share the account {user}"
            )
        seen[uuid] = lineno
        users[user] = uuid
        devices.append(uuid)
    if not devices:
        raise ProvisionError(f"{source}: no device UUID in the file")
    return devices


def read_devices_file(path: str | os.PathLike[str]) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_devices(fh, str(path))
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read the devices file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ProvisionError(f"{path}: the devices file is not UTF-8 text") from None


def parse_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``KEY=VALUE`` lines (blank lines and ``#`` comments ignored; no quoting is ever written)."""
    env: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


# --------------------------------------------------------------------------------------------
# Output


@dataclasses.dataclass(frozen=True)
class Provisioned:
    """What `provision` wrote. Holds secrets: never print or log an instance's passwords."""

    out_dir: Path
    conf_path: Path
    passwd_path: Path
    acl_path: Path
    server_env_path: Path
    data_dir: Path
    listen: str
    port: int
    broker_host: str
    server_user: str
    server_password: str = dataclasses.field(repr=False)
    devices: tuple[str, ...]
    device_passwords: dict[str, str] = dataclasses.field(repr=False)
    created: tuple[str, ...] = ()  # devices given a new password by this run
    kept: tuple[str, ...] = ()  # devices whose existing password was kept
    removed: tuple[str, ...] = ()  # devices whose env file was removed (no longer listed)

    def device_env_path(self, uuid: str) -> Path:
        return self.out_dir / DEVICES_DIR / f"{uuid}.env"

    def device_user(self, uuid: str) -> str:
        return device_username(uuid)


def _write_atomic(path: Path, text: str, mode: int) -> None:
    """Write via a temporary file created with `mode` from the start (no window where a secret is
    readable by others), fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _env_text(pairs: Sequence[tuple[str, str]], header: str) -> str:
    lines = [f"# {header}", "# Generated by `infoscreenctl broker provision`; contains a secret (mode 0600).", ""]
    lines += [f"{k}={v}" for k, v in pairs]
    return "\n".join(lines) + "\n"


def _acl_text(devices: Sequence[str], server_user: str) -> str:
    out: list[str] = []
    w = out.append
    w("# Mosquitto ACL generated by `infoscreenctl broker provision`.")
    w("#")
    w("# The seed's ACL table, plus CONTRACT.md's one deliberate change (see the server block).")
    w("# Every device gets explicit per-user topics. No `pattern` lines with %c: the client id is")
    w("# chosen by the connecting client, so a device could pick another device's id and read or")
    w("# write its topics; %u would work but keeps the uuid out of the file, and explicit lines")
    w("# make this file the reviewable statement of who may do what.")
    w("# Nothing is granted outside a `user` block, so an anonymous client (also refused by")
    w("# allow_anonymous false) or an unknown account could do nothing at all.")
    w("# Reads are restricted too: a device reads only its own command topics and its group id, plus")
    w("# the group-wide event and power-intent topics. A subscription to anything else (say")
    w("# infoscreen/#) is granted by the broker but delivers nothing the ACL does not allow.")
    w("# Under MQTT 5 a refused QoS 1 publish gets PUBACK reason code 0x87 (not authorized); under")
    w("# MQTT 3.1.1 or at QoS 0 it is dropped silently.")
    w("")
    w("# ---- server account ------------------------------------------------------------------")
    w("# Publishes commands (canonical topic and transitional alias), group ids, group events and")
    w("# power intents for every device; reads what devices publish.")
    w("# Deliberate change to the seed's table (CONTRACT.md): the server may also WRITE")
    w("# infoscreen/+/service_failed, so it can clear the retained alert with an empty retained")
    w("# publish. A broker ACL cannot restrict a write to empty payloads, so this is a full write.")
    w(f"user {server_user}")
    w("topic write infoscreen/+/commands")
    w("topic write infoscreen/+/command")
    w("topic write infoscreen/+/group_id")
    w("topic write infoscreen/events/+")
    w("topic write infoscreen/groups/+/power/intent")
    w("topic read infoscreen/+/commands/ack")
    w("topic read infoscreen/+/command/ack")
    w("topic read infoscreen/+/heartbeat")
    w("topic read infoscreen/+/health")
    w("topic read infoscreen/+/logs/#")
    w("topic readwrite infoscreen/+/service_failed")
    for uuid in devices:
        base = f"infoscreen/{uuid}"
        w("")
        w(f"# ---- device {uuid} ----")
        w(f"user {device_username(uuid)}")
        w("# reads: its own commands (both topics) and group id; group events and power intents")
        w(f"topic read {base}/commands")
        w(f"topic read {base}/command")
        w(f"topic read {base}/group_id")
        w("topic read infoscreen/events/+")
        w("topic read infoscreen/groups/+/power/intent")
        w("# writes: its own acks (both topics), heartbeat, health, logs and the retained alert")
        w(f"topic write {base}/commands/ack")
        w(f"topic write {base}/command/ack")
        w(f"topic write {base}/heartbeat")
        w(f"topic write {base}/health")
        w(f"topic write {base}/logs/#")
        w(f"topic write {base}/service_failed")
    return "\n".join(out) + "\n"


def _conf_text(
    *,
    out_dir: Path,
    listen: str,
    port: int,
    run_as_user: str,
    autosave_interval: int,
    log_types: Sequence[str],
    tls: tuple[str, str] | None = None,
) -> str:
    data_dir = out_dir / DATA_DIR
    tls_lines = [
        "# TLS on the listener: clients verify this certificate (CA and host name); no clear text.",
        f"certfile {tls[0]}",
        f"keyfile {tls[1]}",
        "tls_version tlsv1.2",
    ] if tls else [
        "# No TLS on this listener (provision with --tls-cert/--tls-key for one): keep it on a",
        "# trusted network, or loopback.",
    ]
    lines = [
        "# Mosquitto 2 configuration generated by `infoscreenctl broker provision`.",
        "",
        "# One set of security settings for every listener (there is one listener anyway).",
        "per_listener_settings false",
        f"listener {port} {listen}",
        *tls_lines,
        "",
        "# Only the provisioned accounts; the ACL decides what each may read and write.",
        "allow_anonymous false",
        f"password_file {out_dir / PASSWD_NAME}",
        f"acl_file {out_dir / ACL_NAME}",
        "",
        "# Without TCP_NODELAY every hop waits on Nagle's algorithm: about 88 ms instead of 0.4 ms",
        "# per QoS 1 round trip (measured with this broker).",
        "set_tcp_nodelay true",
        "",
        "# Retained messages (the service_failed alert, retained commands) and persistent sessions",
        "# survive a broker restart. The database is saved on a clean stop and every",
        f"# {autosave_interval} s: a crash of the broker loses at most that window, while a rewrite",
        "# of the whole database on every change would cost more than it saves at fleet scale",
        "# (the server retries a command that got no ack anyway).",
        "persistence true",
        f"persistence_location {data_dir}",
        "persistence_file mosquitto.db",
        f"autosave_interval {autosave_interval}",
        "autosave_on_changes false",
        "# A device or server session offline for a week is forgotten with its queue.",
        "persistent_client_expiration 7d",
        "",
        "# Bounded queues and sizes: commands and acks are tiny JSON documents (the client bounds",
        "# what it accepts too); an offline session keeps at most 1000 messages.",
        "max_queued_messages 1000",
        "max_inflight_messages 20",
        "# A payload limit (an oversized message is refused, the connection kept); mosquitto notes",
        "# at start that max_packet_size is the newer option, which disconnects instead.",
        "message_size_limit 65536",
        "",
        "log_dest stderr",
        *[f"log_type {t}" for t in log_types],
        "connection_messages true",
        "log_timestamp true",
        "",
    ]
    if run_as_user == DEFAULT_BROKER_SYSTEM_USER:
        lines += [
            "# Started as root, the broker drops its privileges to this user; the password and ACL",
            "# files and the data directory must be readable (data: writable) by it.",
        ]
    else:
        lines += [
            "# Started as root, the broker would drop its privileges to this user. A user equal to",
            "# the one starting the broker means no switch at all (used by the test fixture).",
        ]
    lines += [f"user {run_as_user}", ""]
    return "\n".join(lines)


def _default_broker_host(listen: str) -> str:
    if listen in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return listen


def provision(
    devices: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    listen: str = "127.0.0.1",
    port: int = 1883,
    server_user: str = DEFAULT_SERVER_USER,
    broker_host: str | None = None,
    run_as_user: str = DEFAULT_BROKER_SYSTEM_USER,
    autosave_interval: int = 30,
    log_types: Sequence[str] = ("error", "warning", "notice", "information"),
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
) -> Provisioned:
    """Write (or update) a provisioned broker configuration into `out_dir`.

    `devices` are canonical UUIDs (see `parse_devices`). Existing passwords in `out_dir` are kept.
    `run_as_user` is the ``user`` line of the configuration: the account the broker switches to
    when started as root. Returns what was written, secrets included (never print them).
    """
    devices = parse_devices(devices, "devices")  # validates and normalises a programmatic list too
    if not _USER_RE.match(server_user):
        raise ProvisionError(f"--server-user: not a valid account name: {server_user!r}")
    if server_user.startswith(DEVICE_USER_PREFIX):
        raise ProvisionError(f"--server-user: {server_user!r} would collide with the device accounts")
    if not (1 <= int(port) <= 65535):
        raise ProvisionError(f"--port: {port} is not a TCP port")
    if not listen or not _HOST_RE.match(listen):
        raise ProvisionError(f"--listen: not an address: {listen!r}")
    host = broker_host or _default_broker_host(listen)
    if not _HOST_RE.match(host):
        raise ProvisionError(f"--broker-host: not a host name or address: {host!r}")
    if bool(tls_cert) != bool(tls_key):
        raise ProvisionError("--tls-cert and --tls-key go together")
    if tls_ca and not tls_cert:
        raise ProvisionError("--tls-ca needs --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path and not os.path.isfile(path):
            raise ProvisionError(f"{flag}: {path} is not a file")
    tls = (str(Path(tls_cert).resolve()), str(Path(tls_key).resolve())) if tls_cert and tls_key else None

    out = Path(out_dir).resolve()
    dev_dir = out / DEVICES_DIR
    data_dir = out / DATA_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
        dev_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(dev_dir, 0o700)
        data_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ProvisionError(f"{out}: cannot create the output directory: {exc.strerror or exc}") from None

    # Existing credentials, read back from the env files (the password file holds only hashes).
    def existing_password(path: Path, user: str) -> str | None:
        if not path.exists():
            return None
        try:
            env = parse_env_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ProvisionError(f"{path}: cannot read the existing env file: {exc}") from None
        pw = env.get("MQTT_PASSWORD_BROKER")
        if pw and env.get("MQTT_USER") == user:
            return pw
        return None

    server_env_path = out / SERVER_ENV_NAME
    server_password = existing_password(server_env_path, server_user) or new_password()

    passwords: dict[str, str] = {}
    created: list[str] = []
    kept: list[str] = []
    for uuid in devices:
        pw = existing_password(dev_dir / f"{uuid}.env", device_username(uuid))
        if pw is None:
            pw = new_password()
            created.append(uuid)
        else:
            kept.append(uuid)
        passwords[uuid] = pw

    # Keep an existing hash when it still matches: re-running changes nothing that need not change.
    old_hashes: dict[str, str] = {}
    passwd_path = out / PASSWD_NAME
    if passwd_path.exists():
        try:
            for line in passwd_path.read_text(encoding="utf-8").splitlines():
                if ":" in line:
                    user, hashed = line.split(":", 1)
                    old_hashes[user] = hashed.strip()
        except (OSError, UnicodeDecodeError):
            old_hashes = {}

    def hashed_for(user: str, password: str) -> str:
        old = old_hashes.get(user)
        if old and verify_password(password, old):
            return old
        return hash_password(password)

    passwd_lines = [f"{server_user}:{hashed_for(server_user, server_password)}"]
    passwd_lines += [f"{device_username(u)}:{hashed_for(device_username(u), passwords[u])}" for u in devices]

    # Ownership: a broker started as root reads these files after switching to `run_as_user`.
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:
        try:
            pw_ent = pwd.getpwnam(run_as_user)
            owner = (0, pw_ent.pw_gid) if pw_ent.pw_uid != 0 else None
            broker_uid = pw_ent.pw_uid
        except KeyError:
            owner = None
    # passwd and acl: hashes and the fleet's layout, not clear secrets; readable by the broker's
    # group only.
    _write_atomic(passwd_path, "\n".join(passwd_lines) + "\n", 0o640 if owner else 0o600)
    acl_path = out / ACL_NAME
    _write_atomic(acl_path, _acl_text(devices, server_user), 0o640 if owner else 0o600)
    conf_path = out / CONF_NAME
    _write_atomic(
        conf_path,
        _conf_text(
            out_dir=out,
            listen=listen,
            port=int(port),
            run_as_user=run_as_user,
            autosave_interval=autosave_interval,
            log_types=log_types,
            tls=tls,
        ),
        0o644,
    )
    if owner:
        for p in (passwd_path, acl_path):
            os.chown(p, *owner)
        os.chown(data_dir, broker_uid, owner[1])

    # With TLS the clients verify the broker against tls_ca (a path as the clients see it), or
    # against the system store when it is not given.
    tls_env = ([("MQTT_TLS", "1")] + ([("MQTT_CA_FILE", tls_ca)] if tls_ca else [])) if tls else []
    broker_env = [("MQTT_BROKER", host), ("MQTT_PORT", str(int(port))), *tls_env]  # every account's
    for uuid in devices:
        _write_atomic(
            dev_dir / f"{uuid}.env",
            _env_text(
                [
                    ("CLIENT_UUID", uuid),
                    ("MQTT_USER", device_username(uuid)),
                    ("MQTT_PASSWORD_BROKER", passwords[uuid]),
                    *broker_env,
                ],
                f"infoscreen device {uuid}",
            ),
            0o600,
        )
    _write_atomic(
        server_env_path,
        _env_text(
            [
                ("MQTT_USER", server_user),
                ("MQTT_PASSWORD_BROKER", server_password),
                *broker_env,
            ],
            "infoscreen server account",
        ),
        0o600,
    )

    # Devices no longer listed lose their account (above) and their credentials file.
    listed = set(devices)
    removed: list[str] = []
    for path in sorted(dev_dir.glob("*.env")):
        if path.stem not in listed:
            path.unlink()
            removed.append(path.stem)

    return Provisioned(
        out_dir=out,
        conf_path=conf_path,
        passwd_path=passwd_path,
        acl_path=acl_path,
        server_env_path=server_env_path,
        data_dir=data_dir,
        listen=listen,
        port=int(port),
        broker_host=host,
        server_user=server_user,
        server_password=server_password,
        devices=tuple(devices),
        device_passwords=passwords,
        created=tuple(created),
        kept=tuple(kept),
        removed=tuple(removed),
    )


# --------------------------------------------------------------------------------------------
# Command line


PROG = "infoscreenctl broker provision"


def build_parser_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--devices", required=True, metavar="FILE",
                        help="device UUIDs, one a line (blank lines and # comments ignored)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (re-running on it keeps existing passwords)")
    parser.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                        help="address of the broker's listener (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, metavar="N", help="listener port (default: 1883)")
    parser.add_argument("--server-user", default=DEFAULT_SERVER_USER, metavar="NAME",
                        help=f"the server account (default: {DEFAULT_SERVER_USER})")
    parser.add_argument("--broker-host", default=None, metavar="HOST",
                        help="the broker address written into the env files "
                             "(default: the listen address, or this host's name for a wildcard)")
    parser.add_argument("--tls-cert", default=None, metavar="FILE",
                        help="the broker's certificate (PEM): TLS on the listener")
    parser.add_argument("--tls-key", default=None, metavar="FILE", help="its private key (PEM)")
    parser.add_argument("--tls-ca", default=None, metavar="PATH",
                        help="the CA file as the clients will see it, written to their env files as "
                             "MQTT_CA_FILE (default: the clients' system store)")
    parser.add_argument("--broker-user", default=DEFAULT_BROKER_SYSTEM_USER, metavar="NAME",
                        help="the system user the broker drops to when started as root "
                             f"(default: {DEFAULT_BROKER_SYSTEM_USER})")
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute the sub-command; prints only paths and counts, never a secret."""
    try:
        devices = read_devices_file(args.devices)
        result = provision(
            devices,
            args.out,
            listen=args.listen,
            port=args.port,
            server_user=args.server_user,
            broker_host=args.broker_host,
            run_as_user=args.broker_user,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
        )
    except ProvisionError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: {getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    out = result.out_dir
    print(f"broker configuration: {result.conf_path}")
    print(f"password file (hashed): {result.passwd_path}")
    print(f"ACL file: {result.acl_path}")
    print(f"persistence: {result.data_dir}/")
    print(f"server credentials (mode 0600): {result.server_env_path}")
    print(
        f"device credentials (mode 0600): {out / DEVICES_DIR}/<uuid>.env: "
        f"{len(result.devices)} device(s), {len(result.created)} new, {len(result.kept)} kept, "
        f"{len(result.removed)} removed"
    )
    print(f"start the broker with: mosquitto -c {result.conf_path}")
    return 0


def register(broker_subparsers) -> argparse.ArgumentParser:
    """Add `provision` to the sub-parsers of the `broker` group of `infoscreenctl`."""
    parser = broker_subparsers.add_parser(
        "provision",
        help="write a hardened Mosquitto configuration, accounts and ACL for a list of devices",
        description=__doc__.split("\n\n", 1)[0],
    )
    build_parser_args(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n", 1)[0])
    build_parser_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
