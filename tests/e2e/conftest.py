"""End-to-end fixtures: the product installed from its Debian package (scripts/build-deb) and
configured by infoscreen-configure, in a container booted
with a real systemd (tests/e2e/container.py), talking to a real Mosquitto with the production ACL
on host loopback (tests/support/broker.py; the container shares the host's network).

These tests are marked ``e2e`` and skipped unless ``INFOSCREEN_E2E=1`` (scripts/test-e2e sets it):
the normal ``pytest`` run of ./scripts/test stays fast and needs no root.

One container for the whole session, booted again by the tests that end it (reboot, poweroff).
Logs (console of every boot, the container's journal, the broker log, install output) go to
``$INFOSCREEN_E2E_LOGDIR`` or a fresh /tmp/infoscreen-e2e-logs.* directory, kept after the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.e2e.container import Container, ContainerUnavailable, RunRoot, ensure_root
from tests.support.broker import MosquittoBroker
from infoscreen.wire import signing
from tests.support.mqtt import MqttProbe

ROOT = Path(__file__).resolve().parents[2]
E2E = os.environ.get("INFOSCREEN_E2E") == "1"
UNIT = "infoscreen-simclient.service"
NOTIFY_UNIT = f"infoscreen-notify-failure@{UNIT}.service"
DROPIN_DIR = f"/etc/systemd/system/{UNIT}.d"
ENV_FILE = "/etc/infoscreen/infoscreen.env"

# Settings of the device's .env in the container beyond the broker account; production, so the
# helper really executes (no mock) and the supervisor runs unprivileged.
# The one difference between the container and a screen. systemd-nspawn gives each boot of the
# container its own boot id by mounting a file over /proc/sys/kernel/random/boot_id. For a service
# with ProtectKernelTunables=yes or ProtectControlGroups=yes, systemd (252) sets up /proc/sys anew
# without that overmount, so the service reads the HOST kernel's boot id, which a container reboot
# does not change (measured: reboot_host then ends `reboot_not_observed`; a bind mount of the proc
# file fails with 226/NAMESPACE). On a screen the kernel's boot id is the real one. So that the
# units run here exactly as shipped, this container publishes its boot id in a file at every boot
# and the device's .env points the client at it with the contract's INFOSCREEN_BOOT_ID_FILE.
BOOT_ID_COPY = "/run/e2e-boot-id"
BOOT_ID_UNIT = "e2e-boot-id.service"
BOOT_ID_UNIT_TEXT = f"""[Unit]
Description=e2e container: this boot's id where the hardened client can read it
DefaultDependencies=no
After=local-fs.target
Before=infoscreen-simclient.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'cat /proc/sys/kernel/random/boot_id > {BOOT_ID_COPY}.tmp && chmod 0644 {BOOT_ID_COPY}.tmp && mv {BOOT_ID_COPY}.tmp {BOOT_ID_COPY}'

[Install]
RequiredBy=infoscreen-simclient.service
"""
DEVICE_EXTRA_ENV = {
    "INFOSCREEN_ENV": "production",
    "HEARTBEAT_INTERVAL_S": "5",
    "HEALTH_INTERVAL_S": "5",
    "INFOSCREEN_BOOT_ID_FILE": BOOT_ID_COPY,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end under a real systemd in a container (scripts/test-e2e)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if E2E:
        return
    skip = pytest.mark.skip(reason="end-to-end suite: run scripts/test-e2e (sets INFOSCREEN_E2E=1)")
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(skip)


class Device:
    """The session's container with the product installed, and its broker."""

    def __init__(self, container: Container, broker: MosquittoBroker, uuid: str, log_dir: Path,
                 key: bytes = b""):
        self.c = container
        self.broker = broker
        self.uuid = uuid
        self.key = key  # the device's command key: the server's copy
        self.log_dir = log_dir
        self.base_env = ""
        self.install_output = ""
        self.debs: dict[str, str] = {}  # revision -> the package file in the container
        self.deb_files: dict[str, Path] = {}  # revision -> the package file on the host
        self.before_configure: dict[str, str] = {}
        self.verify_output: dict[str, subprocess.CompletedProcess[str]] = {}

    # ---- systemd
    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        return self.c.show(unit, *props)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.c.exec(["systemctl", *args], check=check)

    def wait_active(self, timeout: float = 60) -> dict[str, str]:
        return self.c.wait_unit(
            UNIT, lambda p: p["ActiveState"] == "active" and p["SubState"] == "running", timeout, "active (running)"
        )

    def ensure_booted(self) -> None:
        if not self.c.running:
            self.c.boot()

    def reset(self) -> dict[str, str]:
        """The service as installed: no test drop-in, the original .env, no failed state or
        start-limit history, running."""
        self.ensure_booted()
        self.c.exec(["sh", "-c", f"rm -f {DROPIN_DIR}/50-e2e-*.conf"])
        self.c.exec(["sh", "-c", f"cat > {ENV_FILE}"], input=self.base_env)
        self.systemctl("daemon-reload")
        self.systemctl("reset-failed", UNIT, NOTIFY_UNIT, check=False)
        self.systemctl("restart", UNIT)
        return self.wait_active()

    def dropin(self, name: str, text: str) -> None:
        """A test drop-in (removed by reset()): ``name`` must start with ``50-e2e-``."""
        assert name.startswith("50-e2e-")
        self.c.exec(["mkdir", "-p", DROPIN_DIR])
        self.c.exec(["sh", "-c", f"cat > {DROPIN_DIR}/{name}.conf"], input=text)
        self.systemctl("daemon-reload")

    def children(self, pid: int | str) -> dict[int, str]:
        """pid -> command line of the direct children of ``pid`` (container pid namespace)."""
        r = self.c.exec(["ps", "-o", "pid=,args=", "--ppid", str(pid)], check=False)
        out: dict[int, str] = {}
        for line in r.stdout.splitlines():
            p, _, args = line.strip().partition(" ")
            if p.isdigit():
                out[int(p)] = args
        return out

    def worker_pid(self, module: str) -> int:
        main_pid = self.show("MainPID")["MainPID"]
        for pid, args in self.children(main_pid).items():
            if module in args:
                return pid
        raise LookupError(f"no child of {main_pid} runs {module}: {self.children(main_pid)}")

    # ---- broker
    def server_probe(self) -> MqttProbe:
        return MqttProbe(
            self.broker.host, self.broker.port, username=self.broker.server_user, password=self.broker.server_password
        ).connect()

    def publish_command(self, probe: MqttProbe, cmd: dict, *, topic: str = "commands", retain: bool = False,
                        signed: bool = True) -> int:
        """Publish a command as the server does: the exact bytes, signed with the device's key."""
        payload = json.dumps(cmd).encode()
        props = [(signing.SIGNATURE_PROPERTY, signing.sign(self.key, payload))] if signed else None
        return probe.publish(self.topic(topic), payload, retain=retain, user_properties=props)

    def topic(self, leaf: str) -> str:
        return f"infoscreen/{self.uuid}/{leaf}"


def build_debs(dest: Path, log_dir: Path, revisions: tuple[str, ...] = ("1", "2")) -> dict[str, Path]:
    """The package for this machine's architecture (amd64), built by scripts/build-deb: revision
    1 is installed, revision 2 is the upgrade."""
    out = {}
    with open(log_dir / "build-deb.log", "w") as log:
        for rev in revisions:
            r = subprocess.run([str(ROOT / "scripts/build-deb"), "--arch", "amd64", "--out", str(dest), "--revision", rev],
                               stdout=subprocess.PIPE, stderr=log, text=True, check=True, timeout=600)
            out[rev] = Path(r.stdout.strip().splitlines()[-1])
    return out


def _stage(root: Path, debs: dict[str, Path], env_text: str, key: bytes, ca_file: str | None) -> None:
    for deb in debs.values():
        shutil.copy2(deb, root / "root" / deb.name)
    if ca_file:  # the fleet CA the env file pins: infoscreen-configure installs it as /etc/infoscreen/ca.crt
        shutil.copy2(ca_file, root / "root/fleet-ca.crt")
    dev = root / "root/device.env"
    dev.write_text(env_text)
    dev.chmod(0o600)
    # Beside the env file, as `broker provision` writes it: infoscreen-configure takes it from there.
    key_file = root / "root/device.command.key"
    key_file.write_text(signing.key_text(key))
    key_file.chmod(0o600)


def install_deb(container: Container, deb: str) -> subprocess.CompletedProcess[str]:
    """apt installs a local package file (its dependencies are in the root already)."""
    return container.exec(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
                           "--no-install-recommends", deb], check=False, timeout=300)


@pytest.fixture(scope="session")
def e2e_log_dir() -> Path:
    d = os.environ.get("INFOSCREEN_E2E_LOGDIR")
    path = Path(d) if d else Path(tempfile.mkdtemp(prefix="infoscreen-e2e-logs."))
    path.mkdir(parents=True, exist_ok=True)
    print(f"\ne2e: logs in {path}", file=sys.stderr)
    return path


@pytest.fixture(scope="session")
def device(e2e_log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    if not E2E:
        pytest.skip("end-to-end suite: run scripts/test-e2e")
    try:
        pristine = ensure_root()
    except ContainerUnavailable as e:
        pytest.fail(f"cannot build the container root: {e}")
    debs = build_debs(tmp_path_factory.mktemp("debs"), e2e_log_dir)

    uuid = str(uuidlib.uuid4())
    broker = MosquittoBroker([uuid], tmp_path_factory.mktemp("broker"))
    broker.start()
    env = dict(broker.device_env(uuid))
    env.update(DEVICE_EXTRA_ENV)
    if env.get("MQTT_CA_FILE"):  # a path on this host: the container gets its own copy
        env["MQTT_CA_FILE"] = "/root/fleet-ca.crt"
    key = signing.new_key()
    env_text = "".join(f"{k}={v}\n" for k, v in env.items())

    run_root = RunRoot(pristine)
    container = Container(run_root.path, "infoscreen-e2e", e2e_log_dir)
    dev = Device(container, broker, uuid, e2e_log_dir, key)
    dev.debs = {rev: f"/root/{p.name}" for rev, p in debs.items()}
    dev.deb_files = debs
    try:
        _stage(run_root.path, debs, env_text, key, broker.ca_file)
        container.boot()
        # The package installs, and starts nothing until the screen is configured.
        r = install_deb(container, dev.debs["1"])
        dev.install_output = r.stdout + r.stderr
        dev.before_configure = {
            "enabled": container.exec(["systemctl", "is-enabled", UNIT], check=False).stdout.strip(),
            "active": container.exec(["systemctl", "is-active", UNIT], check=False).stdout.strip(),
        }
        if r.returncode == 0:
            r = container.exec(["infoscreen-configure", "--env-from", "/root/device.env"], check=False, timeout=120)
            dev.install_output += r.stdout + r.stderr
        dev.base_env = container.exec(["cat", ENV_FILE]).stdout if r.returncode == 0 else ""
        container.exec(["sh", "-c", f"cat > /etc/systemd/system/{BOOT_ID_UNIT}"], input=BOOT_ID_UNIT_TEXT)
        container.exec(["systemctl", "daemon-reload"])
        container.exec(["systemctl", "enable", "--now", BOOT_ID_UNIT])
        # The suite schedules a real reboot, a real power-off and a reboot cut off in its grace:
        # the breaker's default (3 an hour) would leave no margin for a run on the same boot.
        container.exec(["sh", "-c", "echo HELPER_MAX_ACTIONS_PER_HOUR=10 >> /etc/infoscreen/helper.env"])
        (e2e_log_dir / "install.log").write_text(dev.install_output)
        if r.returncode != 0:
            pytest.fail(f"installing the package failed ({r.returncode}):\n{dev.install_output[-3000:]}")
        units = [UNIT, "infoscreen-notify-failure@.service"]
        units += [p.name for p in sorted((ROOT / "systemd").glob("infoscreen-helper*"))]
        for unit in units:
            target = f"/lib/systemd/system/{unit}"
            if unit.endswith("@.service"):  # a template verifies as an instance
                target = f"/etc/systemd/system/{unit.replace('@.', '@e2e.')}"
                container.exec(["ln", "-sf", f"/lib/systemd/system/{unit}", target])
            dev.verify_output[unit] = container.exec(["systemd-analyze", "verify", target], check=False)
            if unit.endswith("@.service"):
                container.exec(["rm", "-f", target])
        yield dev
    finally:
        with contextlib.suppress(Exception):
            _save_journal(dev, run_root.path)
        container.kill() if container.running and not _try_stop(container) else None
        with contextlib.suppress(Exception):
            shutil.copy2(broker.workdir / "broker.log", e2e_log_dir / "broker.log")
        broker.stop()
        run_root.cleanup()


def _try_stop(c: Container) -> bool:
    c.stop(timeout=30)
    return not c.running


def _save_journal(dev: Device, root: Path) -> None:
    out = dev.log_dir / "journal.txt"
    r = subprocess.run(
        ["journalctl", "--no-pager", "-o", "short-monotonic", f"--directory={root / 'var/log/journal'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode == 0 and r.stdout.strip():
        out.write_text(r.stdout)
    elif dev.c.running:
        out.write_text(dev.c.exec(["journalctl", "--no-pager", "-o", "short-monotonic"], check=False).stdout)


@pytest.fixture
def machine(device: Device) -> Device:
    """The session's device, booted (again, after a test that ended it)."""
    device.ensure_booted()
    return device


def command_for(machine: Device, action: str, *, issued: datetime, expires: datetime, requested_by: str) -> dict[str, str]:
    """A command for the device as the server publishes it (sign it with machine.publish_command)."""
    return {
        "schema_version": "1.0",
        "command_id": str(uuidlib.uuid4()),
        "client_uuid": machine.uuid,
        "action": action,
        "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "requested_by": requested_by,
    }


def wait_time(seconds: float) -> float:
    """A deadline helper for tests: monotonic time ``seconds`` from now."""
    return time.monotonic() + seconds
