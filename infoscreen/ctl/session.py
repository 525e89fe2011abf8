"""The server account's MQTT connection for the `infoscreenctl` sub-commands, and how they read
what devices publish.

Where the connection settings come from, highest priority first:

1. the options ``--broker``, ``--port``, ``--user``, ``--password-file``, ``--tls``, ``--ca-file``,
   ``--cert-file``, ``--key-file``;
2. the env file given with ``--env FILE`` (default: ``$INFOSCREENCTL_ENV``), normally the
   ``server.env`` that ``infoscreenctl broker provision`` writes (``MQTT_BROKER``, ``MQTT_PORT``,
   ``MQTT_USER``, ``MQTT_PASSWORD_BROKER``, ``MQTT_TLS``, ``MQTT_CA_FILE``, ...);
3. ``localhost:1883`` (``8883`` with TLS), no login.

A password is never taken from the command line (where ``ps`` would show it): only from the env
file or from ``--password-file``. It never appears in a message or an error.

The values are parsed by the client's own parser (infoscreen/config.py), and the connection is
the shared `infoscreen.mqttclient.Session` (TLS 1.2 at least, certificate and host name checked,
every operation waiting for the broker's answer, a bounded inbox).

Everything a device publishes is untrusted: one compromised screen holds a device account and may
write any bytes, up to the broker's packet limit, on its own topics. `read_json`, `field` and
`printable` are the few rules the tools read such payloads with: a size cap checked before
parsing, every parser error (a recursion limit included) turned into `Unreadable`, a depth cap,
typed bounded fields, and text made safe for the operator's terminal.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import types
import typing
from typing import Any, Iterable

import msgspec

from infoscreen.config import ConfigError, read_env_file
from infoscreen.mqttclient import (  # noqa: F401 - re-exported for the sub-commands
    MQTT_VARS,
    RC_NO_MATCHING_SUBSCRIBERS,
    RC_SUCCESS,
    ConnectionEvent,
    Received,
    Session,
    SessionError,
    Settings,
    rc_int,
    rc_text,
    settings_from_env,
)
from infoscreen.wire import topics as wire_topics
from infoscreen.wire.ids import is_uuid

ENV_VAR_DEFAULT = "INFOSCREENCTL_ENV"


def check_device_uuid(value: str) -> str:
    """A device UUID as used in topics: canonical 8-4-4-4-12 form, returned in lower case (the
    client generates lower-case ones and `broker provision` writes the ACL in lower case). Rejects
    anything else, in particular MQTT wildcards, which would widen a topic."""
    v = value.strip()
    if not is_uuid(v):
        raise argparse.ArgumentTypeError(f"not a device UUID (8-4-4-4-12 hex digits): {value!r}")
    return v.lower()


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("broker connection (the server account)")
    g.add_argument("--env", metavar="FILE", default=os.environ.get(ENV_VAR_DEFAULT),
                   help="env file with MQTT_BROKER, MQTT_PORT, MQTT_USER, MQTT_PASSWORD_BROKER (and "
                        "MQTT_TLS, MQTT_CA_FILE, ...): the server.env written by broker provision "
                        f"(default: ${ENV_VAR_DEFAULT})")
    g.add_argument("--broker", metavar="HOST", help="broker host (overrides the env file)")
    g.add_argument("-p", "--port", type=int, metavar="N", help="broker port (overrides the env file)")
    g.add_argument("-u", "--user", metavar="NAME", help="broker account (overrides the env file)")
    g.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the password (there is no --password: a password "
                        "on the command line is visible to every user of the machine)")
    g.add_argument("--tls", action="store_true", default=None, help="connect with TLS")
    g.add_argument("--ca-file", metavar="FILE", help="CA certificate(s) to verify the broker with")
    g.add_argument("--cert-file", metavar="FILE", help="client certificate (TLS)")
    g.add_argument("--key-file", metavar="FILE", help="client key (TLS)")
    g.add_argument("-i", "--client-id", metavar="ID", help="MQTT client id (default: infoscreenctl-<random>)")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the broker to accept the connection (default: 10)")


def _warn(text: str) -> None:
    print(f"infoscreenctl: warning: {text}", file=sys.stderr)


def _read_secret_file(path: str, what: str) -> str:
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().rstrip("\r\n")
    except OSError as exc:
        raise SessionError(f"{what}: cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    except UnicodeDecodeError:
        raise SessionError(f"{what}: {path} is not UTF-8 text") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        _warn(f"{path} holds a password and is accessible to other users "
              f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    return first


def env_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The variables of the env file given with ``--env`` (none: empty); SessionError if it
    cannot be read. Warns once when it holds a password that other users can read."""
    env: dict[str, str] = {}
    if getattr(args, "env", None):
        try:
            env = read_env_file(args.env)
        except ConfigError as exc:
            raise SessionError(f"--env: {exc}".replace("configuration error: --env-file: ", "")) from None
        try:
            st = os.stat(args.env)
            if env.get("MQTT_PASSWORD_BROKER") and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                _warn(f"{args.env} holds a password and is accessible to other users "
                      f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        except OSError:
            pass
    return env


# The connection options and the variable each one overrides.
_OPTION_VARS = (("broker", "MQTT_BROKER"), ("port", "MQTT_PORT"), ("user", "MQTT_USER"),
                ("ca_file", "MQTT_CA_FILE"), ("cert_file", "MQTT_CERT_FILE"), ("key_file", "MQTT_KEY_FILE"))


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    """Merge the options over the env file (`env`: its variables, already read by
    `env_from_args`; None: read it here) and parse them as the client does (infoscreen/config.py,
    through `mqttclient.settings_from_env`); raise SessionError on a bad value."""
    if env is None:
        env = env_from_args(args)
    merged = {k: v for k, v in env.items() if k in MQTT_VARS}
    for opt, var in _OPTION_VARS:
        value = getattr(args, opt, None)
        if value is not None:
            merged[var] = str(value)
    if getattr(args, "tls", None):
        merged["MQTT_TLS"] = "1"
    if getattr(args, "password_file", None):
        merged["MQTT_PASSWORD_BROKER"] = _read_secret_file(args.password_file, "--password-file")
    timeout = float(getattr(args, "connect_timeout", 10.0) or 10.0)
    if not 0 < timeout <= 600:
        raise SessionError("--connect-timeout must be between 0 and 600 seconds")
    try:
        settings = settings_from_env(merged, client_id=getattr(args, "client_id", None), connect_timeout=timeout)
    except ConfigError as exc:
        raise SessionError(str(exc).replace("configuration error: ", "", 1)) from None
    if settings.user is None:
        _warn("no broker account given (--env server.env or --user): connecting without login")
    return settings


def open_session(args: argparse.Namespace, *, subscriptions: Iterable[str] = (), session_expiry: int = 0,
                 client_id_prefix: str = "infoscreenctl") -> Session:
    """Settings from `args`, connected, subscribed."""
    s = Session(settings_from_args(args), client_id_prefix=client_id_prefix)
    s.connect(session_expiry=session_expiry)
    subs = list(subscriptions)
    if subs:
        try:
            s.subscribe(subs)
        except BaseException:
            s.close()
            raise
    return s


def format_elapsed(seconds: float) -> str:
    """+0.4 ms, +12.3 ms, +1.25 s, +1 m 05 s."""
    if seconds < 1.0:
        return f"+{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"+{seconds:.2f} s"
    m, s = divmod(int(seconds), 60)
    return f"+{m} m {s:02d} s"


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# ---- payloads from devices (untrusted) -----------------------------------------------------------

MAX_DEPTH = 32  # the contract's payloads are at most 3 levels deep
# How many devices a tool keeps state for, from the uuids in the topics it sees: far above a
# fleet, and a bound on memory however many topics a broker (misconfigured ACL) lets through.
MAX_DEVICES = 10_000


class Unreadable(ValueError):
    """A device's payload that is not read; the message says why in a few words, never quoting it."""


def device_of(topic: str, kind: str) -> str | None:
    """The device uuid of the per-device topic `kind` (a row of wire.topics.TABLE: "heartbeat",
    "health", "service_failed", "ack", ...), else None. Everything a tool reports about a device
    is keyed on this uuid, the one the broker's ACL ties to the publishing account, never on a
    uuid inside a payload."""
    return wire_topics.device_topic(topic, kind)


def _depth_within(obj: Any, limit: int) -> bool:
    # Iterative: a recursive walk is what a deeply nested payload is built to break.
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return False
            children = value.values() if isinstance(value, dict) else value
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def read_object(payload: bytes, max_bytes: int, what: str) -> tuple[Any, str | None]:
    """(the JSON object of a device's `payload`, None), or (its JSON value or None, the problem):
    never raises. `what` names the payload in the problem ("heartbeat", "alert", ...)."""
    try:
        obj = read_json(payload, max_bytes)
    except Unreadable as exc:
        return None, f"unreadable {what}: {exc}"
    if not isinstance(obj, dict):
        return obj, f"unreadable {what}: not a JSON object"
    return obj, None


def read_json(payload: bytes, max_bytes: int) -> Any:
    """The JSON value of a device's `payload`, or `Unreadable`.

    The size is checked before anything is parsed. msgspec's parser refuses what is not strict
    JSON (NaN, Infinity, lone surrogates, integers beyond 64 bits) and raises RecursionError on
    deep nesting; what it accepts deeper than MAX_DEPTH is refused too, so no later recursive
    step (printing it as JSON) can hit the recursion limit."""
    if len(payload) > max_bytes:
        raise Unreadable(f"too large ({len(payload)} bytes; at most {max_bytes} are read)")
    try:
        obj = msgspec.json.decode(payload)
    except RecursionError:
        raise Unreadable("nested too deep") from None
    except Exception:  # noqa: BLE001 - DecodeError, ValidationError (a number out of range), ...
        raise Unreadable("not JSON") from None
    if not _depth_within(obj, MAX_DEPTH):
        raise Unreadable("nested too deep")
    return obj


def field(obj: Any, key: str, typ: Any) -> Any:
    """`obj[key]` as `typ` (a msgspec type, its bounds included: e.g. a str of at most 64
    characters), or None when `obj` is not an object, the key is absent or null, or the value
    is not of that type. One wrong field costs that field only."""
    if not isinstance(obj, dict):
        return None
    value = obj.get(key)
    if value is None:
        return None
    try:
        return msgspec.convert(value, typ)
    except (msgspec.ValidationError, TypeError, ValueError):
        return None


def _struct_of(typ: Any) -> Any:
    """The Struct type of a field typed `S` or `S | None`, else None."""
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        return typ
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1:
        return _struct_of(args[0])
    return None


def fields_of(obj: Any, struct: type[msgspec.Struct]) -> dict[str, Any]:
    """Every field of the wire payload `struct` (wire/schema.py) read from a device's JSON value
    `obj` one by one, with the field's own type and bounds: a missing or wrong field is None (a
    nested payload block: the dict of its fields, or None when it is not an object), so one
    wrong field costs that field only. `obj` itself not an object: every field is None."""
    out: dict[str, Any] = {}
    for f in msgspec.structs.fields(struct):
        nested = _struct_of(f.type)
        if nested is not None:
            value = obj.get(f.name) if isinstance(obj, dict) else None
            out[f.name] = fields_of(value, nested) if isinstance(value, dict) else None
        else:
            out[f.name] = field(obj, f.name, f.type)
    return out


def printable(text: str, max_len: int = 200) -> str:
    """A device's text made safe to print on the operator's terminal: characters that are not
    printable (ESC and the other controls, CR, bidi overrides, line separators) are written as
    escapes, so no payload can move the cursor or redraw another device's row; at most
    `max_len` characters, a longer text ends with "...". """
    cut = len(text) > max_len
    head = text[:max_len]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in head)
    if cut or len(head) > max_len:
        return head[: max_len - 3] + "..." if max_len >= 3 else head[:max_len]
    return head
