"""The repo's own copy of the wire contract stays true to the code.

docs/server-integration.md is what a server team builds against, and docs/configuration.md is
the list of every setting: these tests hold them to infoscreen.wire (signing rules, error codes,
topics), to the configuration parsers of the client and the helper, and to the repo itself (the
contract is cited from inside the repo, never from a file outside it). The documented signing
recipes are run as written: the Python one in this interpreter, the shell one with the real
openssl.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from infoscreen import config as client_config
from infoscreen.helper import protocol as helper_protocol
from infoscreen.helper import server as helper_server
from infoscreen.wire import schema, signing, topics
from infoscreen.workers.mqtt.validation import Command, validate

ROOT = Path(__file__).resolve().parents[2]
SERVER_DOC = ROOT / "docs" / "server-integration.md"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# The two codes this round adds to the ack table (the lead adds them to ErrorCode).
NEW_CODES = {"signature_invalid", "internal_error"}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The body under a Markdown heading line (e.g. "## Error codes") up to the next heading of
    the same or a higher level. Fails loudly if the heading is missing: a renamed section must be
    noticed, since code and other docs cite these headings by name."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        pytest.fail(f"heading {heading!r} not found")
    out, fenced = [], False
    for line in lines[start + 1:]:
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#+) ", line)  # a shell comment is no heading
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.S | re.M)


def table_first_cells(text: str) -> list[str]:
    """The first cell of every body row of the Markdown tables in `text`."""
    cells = []
    for line in text.splitlines():
        if not line.startswith("|") or re.match(r"\|\s*-", line):
            continue
        cells.append(line.split("|")[1].strip())
    return cells[1:] if cells else cells  # the first row is the header


# -- the test vector of "Signed power commands" ----------------------------------------------


def doc_vector() -> tuple[str, bytes, str]:
    body = section(_read(SERVER_DOC), "### Test vector")
    (block,) = code_blocks(body, "text")
    fields: dict[str, str] = {}
    for line in block.splitlines():
        label, sep, value = line.partition(":  ")
        assert sep, f"not a 'label:  value' line: {line!r}"
        fields[label] = value.lstrip(" ")
    key_hex, payload, sig = fields["key (hex)"], fields["payload"], fields["signature"]
    # The payload is the exact byte string: one line, nothing around it.
    assert payload == payload.strip() and "\n" not in payload
    stated = re.search(r"exactly these (\d+) bytes", body)
    assert stated and int(stated.group(1)) == len(payload.encode("utf-8"))
    return key_hex, payload.encode("utf-8"), sig


def test_vector_is_what_signing_computes() -> None:
    key_hex, payload, sig = doc_vector()
    key = signing.parse_key(key_hex + "\n")  # a key file in the documented format
    assert key == bytes.fromhex(key_hex) and len(key) == signing.KEY_BYTES
    assert signing.sign(key, payload) == sig
    assert signing.well_formed(sig)
    # Re-serialising changes the bytes, and the signature with them (the doc's warning).
    respaced = json.dumps(json.loads(payload)).encode()
    assert respaced != payload and signing.sign(key, respaced) != sig


def test_vector_payload_is_a_valid_command() -> None:
    _, payload, _ = doc_vector()
    obj = json.loads(payload)
    result = validate(payload, obj["client_uuid"])
    assert isinstance(result, Command), result
    assert result.command_id == obj["command_id"] and result.action == obj["action"]


def test_documented_property_name_and_scheme() -> None:
    # infoscreen/wire/signing.py cites the section by this name.
    assert "The signature" in section(_read(SERVER_DOC), "## Signed power commands")
    body = section(_read(SERVER_DOC), "### The signature")
    assert f"user property `{signing.SIGNATURE_PROPERTY}`" in body
    assert f'"{signing.SCHEME}"' in body


def test_python_recipe_signs_the_vector() -> None:
    (recipe, _publish) = code_blocks(section(_read(SERVER_DOC), "### How to sign"), "python")
    namespace: dict[str, object] = {}
    exec(compile(recipe, "server-integration.md: How to sign", "exec"), namespace)  # noqa: S102
    key_hex, payload, sig = doc_vector()
    sign = namespace["sign"]
    assert sign(key_hex, payload) == sig  # type: ignore[operator]
    assert sign(key_hex + "\n", payload) == sig  # the key file's content, newline included


def test_shell_recipe_signs_the_vector(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    (block,) = code_blocks(section(_read(SERVER_DOC), "### How to sign"), "sh")
    lines = block.splitlines()
    # Everything before the publish: reading the key, writing the bytes, signing them.
    signing_part = "\n".join(lines[: next(i for i, l in enumerate(lines) if l.startswith("mosquitto_pub"))])
    assert "openssl dgst -sha256 -mac HMAC -macopt" in signing_part
    key_hex, payload, sig = doc_vector()
    uuid = json.loads(payload)["client_uuid"]
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / f"{uuid}.key").write_text(key_hex + "\n")  # as provision writes it
    script = f"set -euo pipefail\n{signing_part}\nprintf '%s' \"$sig\"\n"
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env={"PATH": str(Path(openssl).parent) + ":/usr/bin:/bin", "uuid": uuid,
                              "payload": payload.decode()})
    assert out.returncode == 0, out.stderr
    assert out.stdout == sig
    assert (tmp_path / "command.json").read_bytes() == payload  # the exact bytes to publish


# -- the error-code table ------------------------------------------------------------------------


def documented_codes() -> list[str]:
    cells = table_first_cells(section(_read(SERVER_DOC), "## Error codes"))
    codes = [c.replace("†", "").strip().strip("`") for c in cells]
    assert all(re.fullmatch(r"[a-z_]+", c) for c in codes), codes
    assert len(codes) == len(set(codes)), "a code is listed twice"
    return codes


def test_error_table_is_the_contract_plus_this_rounds_codes() -> None:
    assert set(documented_codes()) == schema.ERROR_CODES | NEW_CODES


def test_error_table_is_exactly_error_code() -> None:
    assert set(documented_codes()) == {c.value for c in schema.ErrorCode}


def test_helper_rejected_names_the_helpers_own_codes() -> None:
    # helper_rejected's error_message starts with the helper's own code: the doc names two.
    body = section(_read(SERVER_DOC), "## Error codes")
    assert "`rate_limited: " in body and "`replayed: " in body
    assert "rate_limited" in helper_protocol.ERRORS


# -- topics and sizes ---------------------------------------------------------------------------


def test_every_topic_is_documented() -> None:
    doc = _read(SERVER_DOC)
    u, g = "{uuid}", "{group_id}"
    for topic in (*topics.command_topics(u), *topics.ack_topics(u), topics.group_id(u), topics.events(g),
                  topics.power_intent(g), topics.heartbeat(u), topics.health(u), topics.service_failed(u)):
        assert f"`{topic}`" in doc, topic
    for level in topics.LOG_LEVELS:
        assert f"/logs/{level}`" in doc, level


def test_command_size_limit_is_the_code_s() -> None:
    doc = _read(SERVER_DOC)
    assert f"over **{schema.MAX_COMMAND_BYTES} bytes** is `invalid_payload`" in doc


# -- docs/configuration.md -----------------------------------------------------------------------


def _function_calls(func: object) -> list[ast.Call]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))  # type: ignore[arg-type]
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _const_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def client_variables() -> dict[str, object]:
    """Every variable load_config reads (r.text("X", ...), r.boolean(...), env.get("X")), with its
    literal default where there is one (a missing default is `...`)."""
    found: dict[str, object] = {}
    for call in _function_calls(client_config.load_config):
        f = call.func
        if not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and call.args):
            continue
        name = _const_str(call.args[0])
        if name is None or not re.fullmatch(r"[A-Z][A-Z0-9_]+", name):
            continue
        if f.value.id == "r" or (f.value.id == "env" and f.attr == "get"):
            default = call.args[1] if f.value.id == "r" and len(call.args) > 1 else None
            found[name] = default.value if isinstance(default, ast.Constant) else ...
    return found


def helper_variables() -> dict[str, object]:
    """Every variable the helper's load_config reads: env.get("X"), _number(env, "X", default),
    _ids(env, "X", default), with the literal default of _number/_ids (else `...`)."""
    found: dict[str, object] = {}
    for call in _function_calls(helper_server.load_config):
        f = call.func
        default: ast.AST | None = None
        if isinstance(f, ast.Attribute) and f.attr == "get" and call.args:
            name = _const_str(call.args[0])
        elif isinstance(f, ast.Name) and len(call.args) > 1:
            name = _const_str(call.args[1])
            default = call.args[2] if len(call.args) > 2 else None
        else:
            continue
        if name and re.fullmatch(r"[A-Z][A-Z0-9_]+", name):
            value = default.value if isinstance(default, ast.Constant) else ...
            if found.get(name, ...) is ...:
                found[name] = value
    return found


def _default_matches(default: object, row: str) -> bool:
    cell = row.rstrip(" |").rsplit("|", 1)[1]
    if isinstance(default, bool):
        expected = "on" if default else "off"
    elif isinstance(default, (int, float)):
        expected = f"{default:g}"
    else:
        expected = f"`{default}`" if default else ""
    return bool(re.search(rf"(?<![\w.]){re.escape(expected)}(?![\w.])", cell)) if expected else True


def _config_doc_rows(part: str) -> dict[str, str]:
    """variable -> its table row, for every backticked variable in a row's first cell."""
    rows: dict[str, str] = {}
    for line in part.splitlines():
        if line.startswith("|"):
            for var in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]):
                rows[var] = line
    return rows


def test_every_client_variable_is_documented() -> None:
    variables = client_variables()
    assert {"CLIENT_UUID", "MQTT_PASSWORD_BROKER", "HEARTBEAT_INTERVAL_S"} <= set(variables)  # the scan works
    rows = _config_doc_rows(section(_read(CONFIG_DOC), "## The client"))
    missing = sorted(set(variables) - set(rows) - {"RUNTIME_DIRECTORY"})
    assert not missing, f"read by infoscreen/config.py, not in docs/configuration.md: {missing}"
    assert "`RUNTIME_DIRECTORY`" in section(_read(CONFIG_DOC), "## The client")


def test_client_defaults_match_the_code() -> None:
    rows = _config_doc_rows(section(_read(CONFIG_DOC), "## The client"))
    for var, default in client_variables().items():
        if default is ... or default is None or var not in rows:
            continue
        assert _default_matches(default, rows[var]), (var, default, rows[var])


def test_every_helper_variable_is_documented() -> None:
    variables = helper_variables()
    assert {"HELPER_GRACE_S", "HELPER_ALLOWED_GROUPS", "INFOSCREEN_ENV"} <= set(variables)  # the scan works
    rows = _config_doc_rows(section(_read(CONFIG_DOC), "## The helper"))
    missing = sorted(set(variables) - set(rows))
    assert not missing, f"read by infoscreen/helper/server.py, not in docs/configuration.md: {missing}"


def test_helper_defaults_match_the_code() -> None:
    rows = _config_doc_rows(section(_read(CONFIG_DOC), "## The helper"))
    checked = 0
    for var, default in helper_variables().items():
        if default is ... or var not in rows or var == "HELPER_READ_TIMEOUT_S":  # see below
            continue
        checked += 1
        assert _default_matches(default, rows[var]), (var, default, rows[var])
    assert checked >= 3  # grace, breaker, groups: the scan works


def test_helper_read_timeout_default_is_one_second() -> None:
    rows = _config_doc_rows(section(_read(CONFIG_DOC), "## The helper"))
    default = helper_variables()["HELPER_READ_TIMEOUT_S"]
    assert default == 1 and _default_matches(default, rows["HELPER_READ_TIMEOUT_S"])


def test_this_rounds_variables_are_documented() -> None:
    doc = _read(CONFIG_DOC)
    client = _config_doc_rows(section(doc, "## The client"))
    helper = _config_doc_rows(section(doc, "## The helper"))
    assert {"HELPER_COMMAND_KEY_FILE", "MQTT_ALLOW_PLAINTEXT", "DISPLAY_PROCESS_USER"} <= set(client)
    assert {"HELPER_COMMAND_KEY_FILE", "HELPER_ALLOW_UNSIGNED", "HELPER_READ_TIMEOUT_S"} <= set(helper)
    assert "`/etc/infoscreen/command.key`" in client["HELPER_COMMAND_KEY_FILE"]
    assert "`/etc/infoscreen/command.key`" in helper["HELPER_COMMAND_KEY_FILE"]
    assert "INFOSCREEN_COMMAND_KEYS" in _config_doc_rows(section(doc, "## Server side: `infoscreenctl`"))


# -- self-contained ----------------------------------------------------------------------------------

OUTSIDE = ("CONTRACT.md", "../shared")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
    files = []
    for name in out.stdout.decode().split("\0"):
        if name and name != THIS and (ROOT / name).is_file():
            files.append(ROOT / name)
    return files


def test_owned_docs_point_nowhere_outside_the_repo() -> None:
    for doc in (SERVER_DOC, CONFIG_DOC):
        text = _read(doc)
        for needle in (*OUTSIDE, "the seed", "seed's"):
            assert needle not in text, f"{doc.name} mentions {needle!r}"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            assert not re.match(r"[a-z]+:", target), f"{doc.name} links outside the repo: {target}"
            assert (doc.parent / target).resolve().is_file(), f"{doc.name}: broken link {target}"


def test_anchors_of_the_server_doc_exist() -> None:
    text = re.sub(r"^```.*?^```$", "", _read(SERVER_DOC), flags=re.S | re.M)  # no code blocks

    def slug(heading: str) -> str:  # GitHub's: lower case, punctuation dropped, spaces to hyphens
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, anchor


def test_no_file_in_the_repo_points_outside_it() -> None:
    offenders = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in OUTSIDE if n in text]
    assert not offenders, "\n".join(offenders)
