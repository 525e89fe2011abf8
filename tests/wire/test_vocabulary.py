"""One vocabulary in the repo: topics, actions, error codes and the id rule are declared once, in
infoscreen/wire, and every program uses that declaration; the helper's standard-library copies
are tied to it here. Also the shape of the code that keeps it so: one MQTT client layer off the
device, and a device side that never imports the operator's tool.

These walk the source with `ast` (string constants that are not docstrings, imports, calls), so
a comment or a docstring may still name a topic or a code in prose.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from infoscreen.helper import protocol as helper_protocol
from infoscreen.helper import server as helper_server
from infoscreen.supervisor import helper_client
from infoscreen.wire import ids, schema

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "infoscreen"
HELPER = PKG / "helper"  # standard library only: keeps its own copies, tied below
WIRE = PKG / "wire"


def sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant of a module that is not a docstring (f-string
    parts included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


# -- topics -------------------------------------------------------------------------------------


TOPIC_LITERAL = re.compile(r"(?<![\w/.-])infoscreen/")


def test_no_topic_is_spelled_outside_wire() -> None:
    """Every topic comes from wire/topics.py's table; a path such as /etc/infoscreen/ is no topic."""
    topic = TOPIC_LITERAL
    offenders = [f"{rel(p)}:{line}: {value[:60]!r}" for p in sources() if WIRE not in p.parents
                 for line, value in string_constants(p) if topic.search(value)]
    assert not offenders, "\n".join(offenders)


def test_the_scan_finds_a_topic_literal(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text('"""infoscreen/x in a docstring is prose."""\nT = f"infoscreen/{u}/commands"\n'
                     'K = "/etc/infoscreen/command.key"\n')
    found = sorted(v for _, v in string_constants(probe))
    assert found == ["/commands", "/etc/infoscreen/command.key", "infoscreen/"]
    assert [v for v in found if TOPIC_LITERAL.search(v)] == ["infoscreen/"]


# -- actions ------------------------------------------------------------------------------------


ACTION_VALUES = tuple(a.value for a in schema.Action)


def test_the_helpers_actions_are_the_wires() -> None:
    assert helper_protocol.ACTIONS == ACTION_VALUES
    assert tuple(helper_server.DISPATCH) == ACTION_VALUES
    assert schema.ACTIONS == frozenset(ACTION_VALUES)


def test_the_action_set_is_declared_once() -> None:
    """No action name in code outside wire/schema.py, except the helper's tied copies."""
    offenders = [f"{rel(p)}:{line}: {value!r}" for p in sources()
                 if p != WIRE / "schema.py" and HELPER not in p.parents
                 for line, value in string_constants(p) if value in ACTION_VALUES]
    assert not offenders, "\n".join(offenders)


# -- error codes ----------------------------------------------------------------------------------


CODES = frozenset(c.value for c in schema.ErrorCode)
# Modules of the command lifecycle, being rewritten elsewhere as this is written: their literals
# are the known rest (strict: once they are gone, the marker must go too).
NOT_YET: dict[str, str] = {}  # a file that still has error-code literals, with the reason


def _code_literal_cases() -> list:
    cases = []
    for p in sources():
        if p == WIRE / "schema.py" or HELPER in p.parents:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=NOT_YET[rel(p)])] if rel(p) in NOT_YET else []
        cases.append(pytest.param(p, id=rel(p), marks=marks))
    return cases


@pytest.mark.parametrize("path", _code_literal_cases())
def test_no_error_code_literal_outside_error_code(path: Path) -> None:
    found = [f"{line}: {value!r}" for line, value in string_constants(path) if value in CODES]
    assert not found, f"{rel(path)}: use wire.schema.ErrorCode: " + ", ".join(found)


def test_the_helper_codes_the_client_maps_are_in_the_helpers_table() -> None:
    # Passed through under the same name: ack codes, and helper codes.
    assert helper_client._SAME_NAME <= CODES
    assert helper_client._SAME_NAME <= set(helper_protocol.ERRORS)
    assert helper_client._EXECUTION_CODES <= set(helper_protocol.ERRORS)
    # Every other helper code becomes helper_rejected (with the helper's code in the message).
    for code in helper_protocol.ERRORS:
        out = helper_client._map_answer({"ok": False, "mock": False, "error_code": code, "error_message": "x"})
        assert out.error_code in CODES
        expected = (code if code in helper_client._SAME_NAME else "execution_failed"
                    if code in helper_client._EXECUTION_CODES else "helper_rejected")
        assert out.error_code == expected, code


# -- the id rule -----------------------------------------------------------------------------------


def test_the_uuid_rule_is_declared_once() -> None:
    """No UUID pattern outside wire/ids.py (the helper's copy is tied in tests/helper)."""
    pattern = re.compile(r"\{8\}-|\{4\}-")
    offenders = [f"{rel(p)}:{line}" for p in sources() if p != WIRE / "ids.py" and p != HELPER / "protocol.py"
                 for line, value in string_constants(p) if pattern.search(value)]
    assert not offenders, offenders
    assert helper_protocol.COMMAND_ID.pattern == ids.UUID_PATTERN


# -- one MQTT client layer -----------------------------------------------------------------------


def paho_client_calls() -> list[str]:
    """Where a paho client is constructed: a call of `Client` or of a class deriving from it."""
    sites = []
    for p in sources():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        subclasses = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                      and any((b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")) == "Client"
                              for b in n.bases)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Call):
                name = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                if name == "Client" or name in subclasses:
                    sites.append(f"{rel(p)}:{n.lineno}")
    return sites


def test_at_most_two_paho_clients_are_constructed() -> None:
    """The device's own (workers/mqtt/connection.py) and the shared one (mqttclient.py)."""
    sites = paho_client_calls()
    assert len(sites) <= 2, sites
    assert {s.split(":")[0] for s in sites} == {"infoscreen/workers/mqtt/connection.py", "infoscreen/mqttclient.py"}


def test_one_set_of_tls_rules() -> None:
    import ssl

    from infoscreen import mqttclient
    from infoscreen.workers.mqtt import connection

    assert connection.configure_mqtt_security is mqttclient.configure_mqtt_security
    ctx = mqttclient.tls_context(None)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    # Nobody builds a TLS context or calls tls_set elsewhere.
    for p in sources():
        if p == PKG / "mqttclient.py":
            continue
        text = p.read_text(encoding="utf-8")
        assert "tls_set(" not in text and "create_default_context(" not in text and "SSLContext(" not in text, rel(p)


def test_the_alert_unit_stays_small() -> None:
    lines = [l for l in (PKG / "notify_failure" / "main.py").read_text().splitlines() if l.strip()]
    assert len(lines) <= 250, len(lines)


# -- the device side never imports the operator side ----------------------------------------------


DEVICE_SIDE = ("infoscreen.supervisor", "infoscreen.workers", "infoscreen.helper", "infoscreen.notify_failure")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The modules a source file imports (relative imports resolved; `from a import b` counts
    both a and a.b, since b may be a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sources()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module of the package `start` imports, directly or not (importing a.b.c runs a and
    a.b too)."""
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        for dep in graph.get(mod, ()):
            parts = dep.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in graph and prefix not in seen:
                    seen.add(prefix)
                    todo.append(prefix)
    return seen


@pytest.mark.parametrize("side", DEVICE_SIDE)
def test_the_device_side_never_imports_the_operator_side(side: str) -> None:
    graph = import_graph()
    starts = [m for m in graph if m == side or m.startswith(side + ".")]
    assert starts
    for start in starts:
        bad = sorted(m for m in reachable(graph, start) | {start} if m == "infoscreen.ctl" or m.startswith("infoscreen.ctl."))
        assert not bad, f"{start} imports {bad}"


def test_the_shared_client_layer_is_off_the_operator_side() -> None:
    graph = import_graph()
    assert not any(m.startswith("infoscreen.ctl") for m in reachable(graph, "infoscreen.mqttclient"))
    assert "infoscreen.mqttclient" in reachable(graph, "infoscreen.notify_failure.main")
    assert "infoscreen.mqttclient" in reachable(graph, "infoscreen.ctl.session")


def test_the_import_walk_sees_an_operator_import() -> None:
    graph = import_graph()
    assert "infoscreen.ctl.session" in reachable(graph, "infoscreen.ctl.send")
    assert "infoscreen.wire.topics" in reachable(graph, "infoscreen.workers.mqtt.worker")  # a relative import
