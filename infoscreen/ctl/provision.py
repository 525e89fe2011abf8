"""`infoscreenctl broker provision`: a hardened Mosquitto 2 configuration in one command.

From a list of device UUIDs it writes, into one directory (OUT):

- ``mosquitto.conf``: one listener (TLS by default), anonymous access off, the accounts and the
  ACL, TCP_NODELAY, persistence inside OUT, and limits that bound what one client can cost;
- ``dynamic-security.json``: the accounts, for Mosquitto's dynamic-security plugin: one per device
  plus the server account, passwords hashed as the plugin expects (PBKDF2-SHA512), and each device
  account **bound to its client id** (= its CLIENT_UUID), so a stolen device password cannot take
  another screen's connection over. The plugin grants nothing itself;
- ``acl``: the ACL table of the contract, spelled out per device (explicit topics, never
  ``%c``/``%u`` patterns), with reads restricted too, plus the contract's one deliberate change
  (the server may write ``service_failed`` to clear the retained alert);
- ``tls/ca.crt``, ``tls/ca.key`` (0600), ``tls/server.crt``, ``tls/server.key`` (0600): a fleet
  CA made here and the broker's certificate signed by it (``openssl``, fixed argv, no shell);
  not with ``--plaintext``, nor with ``--tls-cert``/``--tls-key`` (certificates of your own);
- ``devices/<uuid>.env`` (0600): the device's variables, its password included;
  ``devices/<uuid>.command.key`` (0600): the device's copy of its command key (installed on the
  screen as /etc/infoscreen/command.key); ``keys/<uuid>.key`` (0600, directory 0700): the server's
  copy; ``server.env`` (0600): the server account, and ``INFOSCREEN_COMMAND_KEYS`` naming ``keys/``.

Re-running on an existing directory keeps every password (read back from the env files), every
command key and the fleet CA, so adding a device changes nothing for the others. A device dropped
from the list loses its account, its env file and its key files.

The test fixture (``tests/support/broker.py``) generates its brokers with this same code.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import glob
import hashlib
import hmac
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

from infoscreen.wire import ids, signing, topics

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
TLS_PORT, PLAIN_PORT = 8883, 1883

# The dynamic-security plugin of Mosquitto 2.0: PBKDF2-HMAC-SHA512 over a 12-byte salt, a 64-byte
# digest, both base64 in the JSON. 101 iterations is the plugin's own default; the passwords are
# 256 random bits, which no iteration count makes more or less guessable.
PW_ITERATIONS = 101
PW_SALT_LEN = 12
PW_HASH_LEN = 64

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.:_\[\]-]+$")
_DNS_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")

CONF_NAME = "mosquitto.conf"
DYNSEC_NAME = "dynamic-security.json"
ACL_NAME = "acl"
SERVER_ENV_NAME = "server.env"
DEVICES_DIR = "devices"
KEYS_DIR = "keys"
TLS_DIR = "tls"
DATA_DIR = "data"
COMMAND_KEY_SUFFIX = ".command.key"

# Where Debian (and a default source build) put the plugin; --dynsec-plugin names another.
DYNSEC_PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
)

# Broker limits that bound one client. The worker advertises the same Maximum Packet Size.
MAX_PACKET_SIZE = 262144
MAX_QUEUED_MESSAGES = 1000
# 16 MiB: 64 of the largest packets; a client that reads (an operator's `watch` under a burst
# of the whole fleet's health, or a hostile screen's flood of its own topics) loses nothing.
MAX_QUEUED_BYTES = 16 * 1024 * 1024
MAX_INFLIGHT_MESSAGES = 20
MAX_KEEPALIVE_S = 120
MAX_TOPIC_ALIAS = 10
SESSION_EXPIRY = "7d"

# The fleet PKI: validity in days; a kept server certificate is re-issued when it would expire
# within RENEW_BEFORE_S, or no longer names every host it must.
CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE_S = 30 * 86400
OPENSSL_TIMEOUT_S = 30


class ProvisionError(Exception):
    """A problem with the input or the output directory, described in one line."""


# --------------------------------------------------------------------------------------------
# Passwords


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PW_ITERATIONS) -> dict:
    """The password fields of a dynamic-security client: ``salt``, ``password`` (the hash) and
    ``iterations``, as the plugin reads them."""
    if salt is None:
        salt = secrets.token_bytes(PW_SALT_LEN)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, PW_HASH_LEN)
    return {
        "salt": base64.b64encode(salt).decode("ascii"),
        "password": base64.b64encode(digest).decode("ascii"),
        "iterations": iterations,
    }


def verify_password(password: str, entry: dict) -> bool:
    """True when `entry` (a dynamic-security client's password fields) matches `password`."""
    try:
        iterations = entry["iterations"]
        salt = base64.b64decode(entry["salt"], validate=True)
        digest = base64.b64decode(entry["password"], validate=True)
    except (KeyError, TypeError, ValueError):
        return False
    if not isinstance(iterations, int) or not 1 <= iterations <= 10_000_000 or len(salt) != PW_SALT_LEN:
        return False
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, PW_HASH_LEN)
    return hmac.compare_digest(candidate, digest)


def new_password() -> str:
    # 256 bits, URL-safe alphabet: needs no quoting in an env file or a shell.
    return secrets.token_urlsafe(32)


# --------------------------------------------------------------------------------------------
# Input


def device_username(uuid: str) -> str:
    """The contract's account name convention: ``infoscreen-client-<first 8 hex of the uuid>``."""
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
        if not ids.is_uuid(line):
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


def _san_entry(name: str) -> str:
    """``IP:...`` or ``DNS:...`` for a subjectAltName; anything else is refused (the value goes
    into an openssl configuration file: no comma, newline or other syntax may pass)."""
    try:
        return f"IP:{ipaddress.ip_address(name.strip('[]'))}"
    except ValueError:
        pass
    if not _DNS_RE.match(name):
        raise ProvisionError(f"not a host name or IP address for the broker's certificate (--broker-host, "
                             f"--listen, --tls-san): {name!r}")
    return f"DNS:{name.lower()}"


# --------------------------------------------------------------------------------------------
# Output


@dataclasses.dataclass(frozen=True)
class Provisioned:
    """What `provision` wrote. Holds secrets: never print or log an instance's passwords or keys."""

    out_dir: Path
    conf_path: Path
    dynsec_path: Path
    acl_path: Path
    server_env_path: Path
    data_dir: Path
    keys_dir: Path
    listen: str
    port: int
    broker_host: str
    server_user: str
    server_password: str = dataclasses.field(repr=False)
    devices: tuple[str, ...]
    device_passwords: dict[str, str] = dataclasses.field(repr=False)
    command_keys: dict[str, bytes] = dataclasses.field(repr=False)
    tls: bool = False
    ca_file: Path | None = None  # the CA server.env pins (the generated fleet CA, or --tls-ca)
    created: tuple[str, ...] = ()  # devices given a new password by this run
    kept: tuple[str, ...] = ()  # devices whose existing password was kept
    removed: tuple[str, ...] = ()  # devices whose files were removed (no longer listed)
    tls_files: tuple[str, ...] = ()  # what happened to the fleet PKI: "ca created", "server kept", ...

    def device_env_path(self, uuid: str) -> Path:
        return self.out_dir / DEVICES_DIR / f"{uuid}.env"

    def device_key_path(self, uuid: str) -> Path:
        """The device's copy of its command key (to be installed as /etc/infoscreen/command.key)."""
        return self.out_dir / DEVICES_DIR / f"{uuid}{COMMAND_KEY_SUFFIX}"

    def server_key_path(self, uuid: str) -> Path:
        """The server's copy: ``<INFOSCREEN_COMMAND_KEYS>/<uuid>.key``."""
        return self.keys_dir / f"{uuid}.key"

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
    w("# The contract's ACL table, plus its one deliberate change (see the server block).")
    w("# Every device gets explicit per-user topics. No `pattern` lines with %c: the client id is")
    w("# chosen by the connecting client; %u would work but keeps the uuid out of the file, and")
    w("# explicit lines make this file the reviewable statement of who may do what. (Each device")
    w("# account is moreover bound to its own client id, in dynamic-security.json.)")
    w("# Nothing is granted outside a `user` block, so an anonymous client (also refused by")
    w("# allow_anonymous false) or an unknown account could do nothing at all.")
    w("# Reads are restricted too: a device reads only its own command topics and its group id, plus")
    w("# the group-wide event and power-intent topics. A subscription to anything else (say `#`)")
    w("# is granted by the broker but delivers nothing the ACL does not allow.")
    w("# Under MQTT 5 a refused QoS 1 publish gets PUBACK reason code 0x87 (not authorized); under")
    w("# MQTT 3.1.1 or at QoS 0 it is dropped silently.")
    w("")
    w("# ---- server account ------------------------------------------------------------------")
    w("# Publishes commands (canonical topic and transitional alias), group ids, group events and")
    w("# power intents for every device; reads what devices publish.")
    w("# Deliberate change to the contract's table: the server may also WRITE")
    w("# every device's service_failed topic, so it can clear the retained alert with an empty")
    w("# retained publish. A broker ACL cannot restrict a write to empty payloads: a full write.")
    w("# (The topic rows below are rendered from the one topic table of the code, wire.topics.)")
    w(f"user {server_user}")
    for line in topics.acl_lines(topics.SERVER):
        w(line)
    for uuid in devices:
        w("")
        w(f"# ---- device {uuid} ----")
        w("# reads: its own commands (both topics) and group id; group events and power intents;")
        w("# writes: its own acks (both topics), heartbeat, health, logs and the retained alert")
        w(f"user {device_username(uuid)}")
        for line in topics.acl_lines(topics.DEVICE, uuid):
            w(line)
    return "\n".join(out) + "\n"


def _dynsec_text(accounts: Sequence[tuple[str, str | None, dict]]) -> str:
    """The dynamic-security plugin's file: (username, bound client id or None, password fields).

    It holds identities only. With no roles and every default access false the plugin answers
    no ACL question itself and defers each to the acl file; were that file missing, everything
    would be refused (the broker denies what every check deferred)."""
    clients = []
    for username, clientid, pw in accounts:
        entry: dict = {"username": username}
        if clientid is not None:
            entry["clientid"] = clientid
        entry.update(pw)
        entry["roles"] = []
        clients.append(entry)
    doc = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": False,
        },
        "clients": clients,
        "groups": [],
        "roles": [],
    }
    return json.dumps(doc, indent=2) + "\n"


def _conf_text(
    *,
    out_dir: Path,
    listen: str,
    port: int,
    run_as_user: str,
    autosave_interval: int,
    log_types: Sequence[str],
    dynsec_plugin: str,
    tls: tuple[str, str] | None,
    generated_ca: bool,
) -> str:
    data_dir = out_dir / DATA_DIR
    if tls and generated_ca:
        tls_lines = [
            "# TLS on the listener, with a certificate of the fleet CA in tls/ (made by provision);",
            "# every client pins that CA (MQTT_CA_FILE) and checks the host name. No clear text.",
        ]
    elif tls:
        tls_lines = ["# TLS on the listener: clients verify this certificate (CA and host name); no clear text."]
    else:
        tls_lines = [
            "# No TLS on this listener (--plaintext): passwords and commands cross the network in",
            "# clear. Keep it on loopback or a network you trust entirely.",
        ]
    if tls:
        tls_lines += [f"certfile {tls[0]}", f"keyfile {tls[1]}", "tls_version tlsv1.2"]
    lines = [
        "# Mosquitto 2 configuration generated by `infoscreenctl broker provision`.",
        "",
        "# One set of security settings for every listener (there is one listener anyway).",
        "per_listener_settings false",
        f"listener {port} {listen}",
        *tls_lines,
        f"# MQTT 5 topic aliases are a table the broker keeps per connection: at most {MAX_TOPIC_ALIAS}",
        "# (Mosquitto's default, written down) so that one client cannot make it large.",
        f"max_topic_alias {MAX_TOPIC_ALIAS}",
        "",
        "# Only the provisioned accounts. Every client names itself: a broker-assigned id could",
        "# never be a device's own (see the binding below) nor resume a persistent session.",
        "allow_anonymous false",
        "allow_zero_length_clientid false",
        "# The accounts: the dynamic-security plugin checks the password (PBKDF2-SHA512) and, for a",
        "# device account, that the client id is the device's CLIENT_UUID, before the broker looks",
        "# at an existing connection with that id. So a device's password lets no one take another",
        "# device's connection or persistent session over. The server account is not bound: the",
        "# server, `infoscreenctl send`, `watch` and `alerts` use it at the same time, each with",
        "# its own client id. Nothing can change the accounts at run time: no account may write",
        "# the plugin's $CONTROL topic (the ACL grants it to none).",
        f"plugin {dynsec_plugin}",
        f"plugin_opt_config_file {out_dir / DYNSEC_NAME}",
        "# What each account may read and write: the plugin defers every such question here.",
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
        "",
        "# ---- limits that bound what one client (one stolen password) can cost the broker ----",
        "# A session offline for a week is forgotten with its queue: the worker asks for 7 days",
        "# (MQTT 5 Session Expiry), and this caps whatever a client asks for, MQTT 3.1.1 included.",
        f"persistent_client_expiration {SESSION_EXPIRY}",
        f"# A packet larger than {MAX_PACKET_SIZE // 1024} KiB disconnects its sender; MQTT 5 clients are told",
        "# this limit in the CONNACK. The worker advertises the same Maximum Packet Size for what it",
        "# receives, and commands, acks and health reports are a few KiB at most.",
        f"max_packet_size {MAX_PACKET_SIZE}",
        "# An offline or slow session keeps at most this many QoS 1 messages, and this many bytes,",
        "# beyond those in flight; more are dropped, so a device that never reads costs a bounded",
        "# amount of memory and of persistence.",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        "# QoS 1 messages sent to one client and not yet acknowledged.",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        "# The longest keepalive a client may ask for (MQTT 5 clients are told to use this one, also",
        f"# for a keepalive of 0): a silent or half-open connection is dropped within {MAX_KEEPALIVE_S * 3 // 2} s.",
        "# Every client of this project asks for 30 s.",
        f"max_keepalive {MAX_KEEPALIVE_S}",
        "# Not set: max_connections and memory_limit are global (they would bound the fleet, not a",
        "# client: one device could use them up for every other one).",
        "",
        "log_dest stderr",
        *[f"log_type {t}" for t in log_types],
        "connection_messages true",
        "log_timestamp true",
        "",
    ]
    if run_as_user == DEFAULT_BROKER_SYSTEM_USER:
        lines += [
            "# Started as root, the broker drops its privileges to this user right after reading",
            "# this file; the accounts, the ACL, the TLS key and the data directory must be",
            "# readable (data: writable) by it.",
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


def find_dynsec_plugin() -> str | None:
    for pattern in DYNSEC_PLUGIN_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


# --------------------------------------------------------------------------------------------
# The fleet PKI (openssl, fixed argv, no shell)

_OPENSSL_CNF = """\
# Written by `infoscreenctl broker provision` for one openssl run; removed afterwards.
[req]
distinguished_name = dn
prompt = no
[dn]
[fleet_ca]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[broker]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {sans}
"""


def _openssl(args: Sequence[str], cwd: Path, cnf: Path) -> str:
    exe = shutil.which("openssl") or "/usr/bin/openssl"
    if not os.access(exe, os.X_OK):
        raise ProvisionError("openssl is not installed (apt-get install openssl); or give --tls-cert and "
                             "--tls-key, or --plaintext")
    try:
        r = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S,
                           stdin=subprocess.DEVNULL,
                           env={"PATH": "/usr/bin:/bin", "LANG": "C", "OPENSSL_CONF": str(cnf)})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"openssl {args[0]} failed: {exc}") from None
    if r.returncode != 0:
        raise ProvisionError(f"openssl {args[0]} failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    return r.stdout


def _cert_sans(text: str) -> set[str]:
    """The subjectAltName entries printed by ``openssl x509 -ext subjectAltName``, as
    `_san_entry` spells them."""
    found: set[str] = set()
    for line in text.splitlines()[1:]:
        for item in line.split(","):
            kind, _, value = item.strip().partition(":")
            if kind == "DNS":
                found.add(f"DNS:{value.lower()}")
            elif kind == "IP Address":
                try:
                    found.add(f"IP:{ipaddress.ip_address(value)}")
                except ValueError:
                    pass
    return found


def _fleet_pki(tls_dir: Path, sans: Sequence[str], broker_uid: int | None) -> tuple[Path, Path, Path, list[str]]:
    """Make or keep ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` in `tls_dir`.

    The CA is made once and kept for ever (the screens pin it); the server certificate is kept
    while it is signed by that CA, names every one of `sans` and has more than 30 days left,
    and is issued anew otherwise. Returns (ca.crt, server.crt, server.key, what happened)."""
    tls_dir.mkdir(mode=0o755, exist_ok=True)
    ca_crt, ca_key = tls_dir / "ca.crt", tls_dir / "ca.key"
    crt, key = tls_dir / "server.crt", tls_dir / "server.key"
    what: list[str] = []
    work = Path(tempfile.mkdtemp(prefix=".openssl.", dir=tls_dir))  # 0700: keys are born private
    try:
        cnf = work / "openssl.cnf"
        cnf.write_text(_OPENSSL_CNF.format(sans=",".join(sans)))
        if not ca_crt.exists() and not ca_key.exists():
            _openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca.key"], work, cnf)
            _openssl(["req", "-new", "-x509", "-key", "ca.key", "-out", "ca.crt", "-days", str(CA_DAYS),
                      "-subj", "/CN=infoscreen fleet CA", "-extensions", "fleet_ca",
                      "-set_serial", "0x" + secrets.token_hex(16)], work, cnf)
            os.chmod(work / "ca.key", 0o600)
            os.chmod(work / "ca.crt", 0o644)
            os.replace(work / "ca.key", ca_key)
            os.replace(work / "ca.crt", ca_crt)
            what.append("ca created")
        elif not ca_crt.exists():
            raise ProvisionError(f"{ca_crt} is missing while {ca_key} exists: restore it (every screen pins "
                                 f"it), or remove {tls_dir} to start a new CA")
        else:
            what.append("ca kept")
        keep = False
        if crt.exists() and key.exists():
            try:
                printed = _openssl(["x509", "-in", str(crt), "-noout", "-ext", "subjectAltName",
                                    "-checkend", str(RENEW_BEFORE_S)], work, cnf)
                _openssl(["verify", "-CAfile", str(ca_crt), str(crt)], work, cnf)
                keep = set(sans) <= _cert_sans(printed)
            except ProvisionError:
                keep = False  # expiring, not of this CA, or unreadable: issue a new one
        if keep:
            what.append("server kept")
        else:
            if not ca_key.exists():
                raise ProvisionError(f"{ca_key} is missing: cannot issue a new server certificate; restore it, "
                                     f"or remove {tls_dir} to start a new CA (every screen then needs the new ca.crt)")
            first = next((s[4:] for s in sans if s.startswith("DNS:")), "infoscreen broker")
            _openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "server.key"],
                     work, cnf)
            _openssl(["req", "-new", "-key", "server.key", "-out", "server.csr", "-subj", f"/CN={first}"], work, cnf)
            _openssl(["x509", "-req", "-in", "server.csr", "-CA", str(ca_crt), "-CAkey", str(ca_key),
                      "-out", "server.crt", "-days", str(SERVER_DAYS), "-extfile", str(cnf),
                      "-extensions", "broker", "-set_serial", "0x" + secrets.token_hex(16)], work, cnf)
            os.chmod(work / "server.key", 0o600)
            os.chmod(work / "server.crt", 0o644)
            os.replace(work / "server.key", key)
            os.replace(work / "server.crt", crt)
            what.append("server issued")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if broker_uid is not None:
        # Mosquitto reads its key after dropping root; the CA's key stays root's alone.
        os.chown(key, broker_uid, -1)
    return ca_crt, crt, key, what


# --------------------------------------------------------------------------------------------
# provision(): read what is there, plan (pure), render (pure), write (once)


@dataclasses.dataclass(frozen=True)
class Options:
    """The checked request: what `provision` was asked to produce."""

    devices: tuple[str, ...]
    out: Path
    listen: str
    port: int
    server_user: str
    broker_host: str
    run_as_user: str
    autosave_interval: int
    log_types: tuple[str, ...]
    plugin: str
    plaintext: bool
    tls_cert: str | None  # certificates of one's own (absolute), else the fleet CA's
    tls_key: str | None
    tls_ca: str | None
    sans: tuple[str, ...]  # subjectAltName entries of the fleet certificate
    device_ca_path: str | None


@dataclasses.dataclass(frozen=True)
class Existing:
    """What an earlier run left in OUT: the clear passwords of the env files, the command key
    copies (server's, device's) of the devices asked for, the password hashes of
    dynamic-security.json, and every device file there is."""

    server_passwords: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # account -> password
    device_passwords: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # device -> password
    keys: dict[str, tuple[bytes | None, bytes | None]] = dataclasses.field(default_factory=dict, repr=False)
    hashes: dict[str, dict] = dataclasses.field(default_factory=dict, repr=False)  # account -> fields
    # (path relative to OUT, the device it is of): devices/*.env, devices/*.command.key, keys/<uuid>.key
    device_files: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the run will write, decided; holds secrets (never print it)."""

    options: Options
    server_password: str = dataclasses.field(repr=False)
    passwords: dict[str, str] = dataclasses.field(repr=False)  # device -> password
    keys: dict[str, bytes] = dataclasses.field(repr=False)  # device -> command key
    accounts: tuple[tuple[str, str | None, dict], ...] = dataclasses.field(repr=False)  # user, client id, hash
    created: tuple[str, ...]
    kept: tuple[str, ...]
    remove: tuple[str, ...]  # paths relative to OUT, of devices no longer listed
    tls: tuple[str, str] | None  # the broker's certificate and key
    ca_file: str | None  # the CA server.env pins
    device_ca: str | None  # the CA the device env files pin
    group_readable: bool  # the broker drops root: its group reads the accounts and the ACL


def check_options(devices: Sequence[str], out_dir: str | os.PathLike[str], *, listen: str, port: int | None,
                  server_user: str, broker_host: str | None, run_as_user: str, autosave_interval: int,
                  log_types: Sequence[str], plaintext: bool, tls_cert: str | None, tls_key: str | None,
                  tls_ca: str | None, tls_sans: Sequence[str], device_ca_path: str | None,
                  dynsec_plugin: str | None) -> Options:
    """The arguments of `provision`, checked (ProvisionError: which one is wrong and why)."""
    devices = parse_devices(devices, "devices")  # validates and normalises a programmatic list too
    if not _USER_RE.match(server_user):
        raise ProvisionError(f"--server-user: not a valid account name: {server_user!r}")
    if server_user.startswith(DEVICE_USER_PREFIX):
        raise ProvisionError(f"--server-user: {server_user!r} would collide with the device accounts")
    if not listen or not _HOST_RE.match(listen):
        raise ProvisionError(f"--listen: not an address: {listen!r}")
    host = broker_host or _default_broker_host(listen)
    if not _HOST_RE.match(host):
        raise ProvisionError(f"--broker-host: not a host name or address: {host!r}")
    if bool(tls_cert) != bool(tls_key):
        raise ProvisionError("--tls-cert and --tls-key go together")
    if tls_ca and not tls_cert:
        raise ProvisionError("--tls-ca needs --tls-cert and --tls-key")
    if plaintext and (tls_cert or tls_sans or device_ca_path):
        raise ProvisionError("--plaintext turns TLS off: it goes with no other TLS option")
    if tls_cert and (tls_sans or device_ca_path):
        raise ProvisionError("--tls-san and --device-ca-path are for the generated CA, not with --tls-cert")
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path and not os.path.isfile(path):
            raise ProvisionError(f"{flag}: {path} is not a file")
    if device_ca_path is not None and not os.path.isabs(device_ca_path):
        raise ProvisionError(f"--device-ca-path: not an absolute path: {device_ca_path!r}")
    if port is None:
        port = PLAIN_PORT if plaintext else TLS_PORT
    if not (1 <= int(port) <= 65535):
        raise ProvisionError(f"--port: {port} is not a TCP port")
    plugin = dynsec_plugin or find_dynsec_plugin()
    if plugin is None:
        raise ProvisionError("Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so, in Debian's "
                             "mosquitto package) was not found: give --dynsec-plugin PATH, its path on the broker")
    if not os.path.isabs(plugin):
        raise ProvisionError(f"--dynsec-plugin: not an absolute path: {plugin!r}")
    sans: list[str] = []
    if not plaintext and not tls_cert:
        names = [host, *([listen] if listen not in ("0.0.0.0", "::") else []), *tls_sans, "localhost", "127.0.0.1"]
        for name in names:
            entry = _san_entry(name)
            if entry not in sans:
                sans.append(entry)
    return Options(
        devices=tuple(devices), out=Path(out_dir).resolve(), listen=listen, port=int(port), server_user=server_user,
        broker_host=host, run_as_user=run_as_user, autosave_interval=autosave_interval, log_types=tuple(log_types),
        plugin=plugin, plaintext=plaintext,
        tls_cert=str(Path(tls_cert).resolve()) if tls_cert else None,
        tls_key=str(Path(tls_key).resolve()) if tls_key else None,
        tls_ca=tls_ca, sans=tuple(sans), device_ca_path=device_ca_path)


def read_existing(out: Path, devices: Sequence[str]) -> Existing:
    """What is in OUT already (nothing: an empty Existing); the command keys of `devices` only.
    ProvisionError for a file that is there but cannot be used: an env file that cannot be read,
    a key file that is not a key."""

    def password_in(path: Path, user: str | None) -> tuple[str, str] | None:
        if not path.is_file():
            return None
        try:
            env = parse_env_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ProvisionError(f"{path}: cannot read the existing env file: {exc}") from None
        pw, named = env.get("MQTT_PASSWORD_BROKER"), env.get("MQTT_USER")
        return (named, pw) if pw and named and (user is None or named == user) else None

    def key_of(path: Path) -> bytes | None:
        if not path.exists():
            return None
        try:
            return signing.read_key_file(path)
        except (OSError, signing.BadKey) as exc:
            raise ProvisionError(f"{path}: not a command key ({exc}); restore it or remove it") from None

    server = password_in(out / SERVER_ENV_NAME, None)
    files: list[tuple[str, str]] = []
    device_passwords: dict[str, str] = {}
    for pattern, suffix, d in (("*.env", ".env", DEVICES_DIR), (f"*{COMMAND_KEY_SUFFIX}", COMMAND_KEY_SUFFIX, DEVICES_DIR),
                               ("*.key", ".key", KEYS_DIR)):
        for path in sorted((out / d).glob(pattern)):
            name = path.name[: -len(suffix)]
            if suffix != ".key" or ids.is_uuid(name):  # keys/ may hold other files of the operator's
                files.append((f"{d}/{path.name}", name))
    for uuid in devices:
        # A device's password is the one of its own file, for its own account.
        found = password_in(out / DEVICES_DIR / f"{uuid}.env", device_username(uuid))
        if found:
            device_passwords[uuid] = found[1]
    keys = {u: (key_of(out / KEYS_DIR / f"{u}.key"), key_of(out / DEVICES_DIR / f"{u}{COMMAND_KEY_SUFFIX}"))
            for u in devices}
    hashes: dict[str, dict] = {}
    try:
        for c in json.loads((out / DYNSEC_NAME).read_text(encoding="utf-8")).get("clients", []):
            hashes[c["username"]] = c
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        hashes = {}
    return Existing(server_passwords=dict([server]) if server else {}, device_passwords=device_passwords, keys=keys,
                    hashes=hashes, device_files=tuple(files))


def plan(opts: Options, existing: Existing, *, password: Callable[[], str] = new_password,
         key: Callable[[], bytes] = signing.new_key, hashed: Callable[[str], dict] = hash_password,
         group_readable: bool = False) -> Plan:
    """What to write, from the request and what is there: pure (new secrets come from `password`
    and `key`, new hashes from `hashed`). Passwords, keys and hashes that exist are kept, so
    re-running changes nothing that need not change; a key is never replaced silently (its two
    copies differing stop the run: the screen holding the old one would refuse every signed
    command)."""
    out = opts.out
    server_password = existing.server_passwords.get(opts.server_user) or password()
    passwords: dict[str, str] = {}
    created: list[str] = []
    kept: list[str] = []
    keys: dict[str, bytes] = {}
    for uuid in opts.devices:
        pw = existing.device_passwords.get(uuid)
        (kept if pw else created).append(uuid)
        passwords[uuid] = pw or password()
        server_copy, device_copy = existing.keys.get(uuid, (None, None))
        if server_copy is not None and device_copy is not None and not hmac.compare_digest(server_copy, device_copy):
            raise ProvisionError(f"{out / KEYS_DIR / (uuid + '.key')} and "
                                 f"{out / DEVICES_DIR / (uuid + COMMAND_KEY_SUFFIX)} differ: remove the one that is wrong")
        keys[uuid] = server_copy or device_copy or key()

    def hash_for(user: str, pw: str) -> dict:
        old = existing.hashes.get(user)
        if old and verify_password(pw, old):
            return {k: old[k] for k in ("salt", "password", "iterations")}
        return hashed(pw)

    accounts = [(opts.server_user, None, hash_for(opts.server_user, server_password))]
    accounts += [(device_username(u), u, hash_for(device_username(u), passwords[u])) for u in opts.devices]
    listed = set(opts.devices)
    remove = tuple(f for f, device in existing.device_files if device not in listed)
    if opts.tls_cert and opts.tls_key:
        tls: tuple[str, str] | None = (opts.tls_cert, opts.tls_key)
        ca_file = opts.tls_ca
    elif not opts.plaintext:
        tls = (str(out / TLS_DIR / "server.crt"), str(out / TLS_DIR / "server.key"))
        ca_file = str(out / TLS_DIR / "ca.crt")
    else:
        tls, ca_file = None, None
    return Plan(options=opts, server_password=server_password, passwords=passwords, keys=keys,
                accounts=tuple(accounts), created=tuple(created), kept=tuple(kept), remove=remove, tls=tls,
                ca_file=ca_file, device_ca=opts.device_ca_path or ca_file if tls else None,
                group_readable=group_readable)


def render(p: Plan) -> dict[str, tuple[str, int]]:
    """Every file of the run: {path relative to OUT: (text, mode)}. Pure."""
    o = p.options
    shared = 0o640 if p.group_readable else 0o600
    files: dict[str, tuple[str, int]] = {
        DYNSEC_NAME: (_dynsec_text(p.accounts), shared),
        ACL_NAME: (_acl_text(o.devices, o.server_user), shared),
        CONF_NAME: (_conf_text(out_dir=o.out, listen=o.listen, port=o.port, run_as_user=o.run_as_user,
                               autosave_interval=o.autosave_interval, log_types=o.log_types, dynsec_plugin=o.plugin,
                               tls=p.tls, generated_ca=bool(p.tls and not o.tls_cert)), 0o644),
    }

    # With TLS the clients verify the broker against a pinned CA: the fleet CA (its path on the
    # screens: --device-ca-path, else where provision wrote it), or --tls-ca, or the system store.
    def tls_env(ca: str | None) -> list[tuple[str, str]]:
        if not p.tls:
            return []
        return [("MQTT_TLS", "1")] + ([("MQTT_CA_FILE", ca)] if ca else [])

    broker_env = [("MQTT_BROKER", o.broker_host), ("MQTT_PORT", str(o.port))]
    for uuid in o.devices:
        files[f"{DEVICES_DIR}/{uuid}.env"] = (_env_text(
            [("CLIENT_UUID", uuid), ("MQTT_USER", device_username(uuid)), ("MQTT_PASSWORD_BROKER", p.passwords[uuid]),
             *broker_env, *tls_env(p.device_ca)], f"infoscreen device {uuid}"), 0o600)
        files[f"{DEVICES_DIR}/{uuid}{COMMAND_KEY_SUFFIX}"] = (signing.key_text(p.keys[uuid]), 0o600)
        files[f"{KEYS_DIR}/{uuid}.key"] = (signing.key_text(p.keys[uuid]), 0o600)
    files[SERVER_ENV_NAME] = (_env_text(
        [("MQTT_USER", o.server_user), ("MQTT_PASSWORD_BROKER", p.server_password), *broker_env,
         *tls_env(p.ca_file), ("INFOSCREEN_COMMAND_KEYS", str(o.out / KEYS_DIR))], "infoscreen server account"), 0o600)
    return files


def write(p: Plan, files: dict[str, tuple[str, int]], owner: tuple[int, int] | None = None,
          broker_uid: int | None = None) -> None:
    """The one write: each file atomically with its mode from the start (a file whose text is
    already that is left alone, its mode set), the broker's ownership, then the files of devices
    no longer listed removed."""
    out = p.options.out
    for name, (text, mode) in files.items():
        path = out / name
        try:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            same = False
        if same:
            os.chmod(path, mode)
        else:
            _write_atomic(path, text, mode)
    if owner:
        for name in (DYNSEC_NAME, ACL_NAME):
            os.chown(out / name, *owner)
        os.chown(out / DATA_DIR, broker_uid if broker_uid is not None else -1, owner[1])
    for name in p.remove:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass


def _broker_owner(run_as_user: str) -> tuple[tuple[int, int] | None, int | None]:
    """Started as root, the broker reads these files after switching to `run_as_user`:
    ((root, its group), its uid), or (None, None) when nothing changes hands."""
    if os.geteuid() != 0:
        return None, None
    try:
        pw_ent = pwd.getpwnam(run_as_user)
    except KeyError:
        return None, None
    if pw_ent.pw_uid == 0:
        return None, None
    return (0, pw_ent.pw_gid), pw_ent.pw_uid


def provision(
    devices: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    listen: str = "127.0.0.1",
    port: int | None = None,
    server_user: str = DEFAULT_SERVER_USER,
    broker_host: str | None = None,
    run_as_user: str = DEFAULT_BROKER_SYSTEM_USER,
    autosave_interval: int = 30,
    log_types: Sequence[str] = ("error", "warning", "notice", "information"),
    plaintext: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    tls_sans: Sequence[str] = (),
    device_ca_path: str | None = None,
    dynsec_plugin: str | None = None,
) -> Provisioned:
    """Write (or update) a provisioned broker configuration into `out_dir`.

    `devices` are canonical UUIDs (see `parse_devices`). Existing passwords, command keys and the
    fleet CA in `out_dir` are kept. TLS by default, with a fleet CA made here (`tls_sans`: more
    names for the broker's certificate); `tls_cert`/`tls_key`: certificates of your own;
    `plaintext`: no TLS. `port` defaults to 8883 (TLS) or 1883. `run_as_user` is the ``user``
    line of the configuration: the account the broker switches to when started as root.
    Returns what was written, secrets included (never print them).

    The steps: `check_options`, `read_existing`, `plan` and `render` (both pure), the fleet PKI
    (openssl; first, so that nothing is written when it cannot be made), and one `write`.
    """
    opts = check_options(devices, out_dir, listen=listen, port=port, server_user=server_user,
                         broker_host=broker_host, run_as_user=run_as_user, autosave_interval=autosave_interval,
                         log_types=log_types, plaintext=plaintext, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
                         tls_sans=tls_sans, device_ca_path=device_ca_path, dynsec_plugin=dynsec_plugin)
    out = opts.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        for d in (out / DEVICES_DIR, out / KEYS_DIR, out / DATA_DIR):
            d.mkdir(mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
    except OSError as exc:
        raise ProvisionError(f"{out}: cannot create the output directory: {exc.strerror or exc}") from None
    owner, broker_uid = _broker_owner(run_as_user)
    tls_files: list[str] = []
    if not opts.plaintext and not opts.tls_cert:
        tls_files = _fleet_pki(out / TLS_DIR, opts.sans, broker_uid)[3]
    p = plan(opts, read_existing(out, opts.devices), group_readable=owner is not None)
    write(p, render(p), owner, broker_uid)
    return Provisioned(
        out_dir=out,
        conf_path=out / CONF_NAME,
        dynsec_path=out / DYNSEC_NAME,
        acl_path=out / ACL_NAME,
        server_env_path=out / SERVER_ENV_NAME,
        data_dir=out / DATA_DIR,
        keys_dir=out / KEYS_DIR,
        listen=opts.listen,
        port=opts.port,
        broker_host=opts.broker_host,
        server_user=opts.server_user,
        server_password=p.server_password,
        devices=opts.devices,
        device_passwords=dict(p.passwords),
        command_keys=dict(p.keys),
        tls=p.tls is not None,
        ca_file=Path(p.ca_file) if p.ca_file else None,
        created=p.created,
        kept=p.kept,
        removed=tuple(sorted({Path(f).name[: -len(".env")] for f in p.remove if f.endswith(".env")})),
        tls_files=tuple(tls_files),
    )


# --------------------------------------------------------------------------------------------
# Command line


PROG = "infoscreenctl broker provision"


def build_parser_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--devices", required=True, metavar="FILE",
                        help="device UUIDs, one a line (blank lines and # comments ignored)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (re-running on it keeps passwords, command keys and the CA)")
    parser.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                        help="address of the broker's listener (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, metavar="N",
                        help=f"listener port (default: {TLS_PORT}, or {PLAIN_PORT} with --plaintext)")
    parser.add_argument("--server-user", default=DEFAULT_SERVER_USER, metavar="NAME",
                        help=f"the server account (default: {DEFAULT_SERVER_USER})")
    parser.add_argument("--broker-host", default=None, metavar="HOST",
                        help="the broker address written into the env files and the certificate "
                             "(default: the listen address, or this host's name for a wildcard)")
    parser.add_argument("--tls-san", action="append", default=[], metavar="NAME",
                        help="another host name or IP address of the broker for its certificate (repeatable; "
                             "localhost and 127.0.0.1 are always in it)")
    parser.add_argument("--device-ca-path", default=None, metavar="PATH",
                        help="where the screens find the fleet CA, written to their env files as MQTT_CA_FILE "
                             "(default: OUT/tls/ca.crt)")
    parser.add_argument("--plaintext", action="store_true",
                        help="no TLS: a clear-text listener (loopback or a network you trust entirely)")
    parser.add_argument("--tls-cert", default=None, metavar="FILE",
                        help="the broker's certificate (PEM), of your own CA, instead of the generated one")
    parser.add_argument("--tls-key", default=None, metavar="FILE", help="its private key (PEM)")
    parser.add_argument("--tls-ca", default=None, metavar="PATH",
                        help="with --tls-cert: the CA file as the clients will see it, written to their env "
                             "files as MQTT_CA_FILE (default: the clients' system store)")
    parser.add_argument("--broker-user", default=DEFAULT_BROKER_SYSTEM_USER, metavar="NAME",
                        help="the system user the broker drops to when started as root "
                             f"(default: {DEFAULT_BROKER_SYSTEM_USER})")
    parser.add_argument("--dynsec-plugin", default=None, metavar="PATH",
                        help="mosquitto_dynamic_security.so on the broker (default: found under /usr/lib)")
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
            plaintext=args.plaintext,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            tls_sans=args.tls_san,
            device_ca_path=args.device_ca_path,
            dynsec_plugin=args.dynsec_plugin,
        )
    except ProvisionError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: {getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    out = result.out_dir
    print(f"broker configuration: {result.conf_path}")
    print(f"accounts (hashed, device accounts bound to their client id): {result.dynsec_path}")
    print(f"ACL file: {result.acl_path}")
    if result.tls_files:
        print(f"TLS: {out / TLS_DIR}/ ({', '.join(result.tls_files)}); the clients pin {result.ca_file}")
    elif result.tls:
        print("TLS: with the certificate given")
    else:
        print("TLS: off (--plaintext): keep this listener on loopback or a trusted network")
    print(f"persistence: {result.data_dir}/")
    print(f"server credentials (mode 0600): {result.server_env_path}")
    print(f"server's command keys (mode 0600): {result.keys_dir}/<uuid>.key")
    print(
        f"device credentials and command keys (mode 0600): {out / DEVICES_DIR}/<uuid>.env, "
        f"<uuid>{COMMAND_KEY_SUFFIX}: "
        f"{len(result.devices)} device(s), {len(result.created)} new, {len(result.kept)} kept, "
        f"{len(result.removed)} removed"
    )
    print(f"start the broker with: mosquitto -c {result.conf_path}")
    return 0


def register(broker_subparsers) -> argparse.ArgumentParser:
    """Add `provision` to the sub-parsers of the `broker` group of `infoscreenctl`."""
    parser = broker_subparsers.add_parser(
        "provision",
        help="write a hardened Mosquitto configuration, accounts, ACL, TLS and command keys for a list of devices",
        description="A hardened Mosquitto 2 configuration for the whole fleet, in one command.",
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
