"""The demo (README's first command, via ``scripts/demo``): the whole agent on this machine, narrated.

It starts, all inside one temporary directory and on loopback only:

1. Mosquitto on a free port, configured by ``infoscreenctl broker provision`` (accounts, ACL, TLS
   with a fleet CA, command keys);
2. the privileged helper in mock mode (it executes nothing), holding the screen's command key;
3. a stand-in display process named ``display_manager``;
4. the supervisor ``infoscreen-simclient`` with its two workers (MQTT and health);

the helper's and the supervisor's environments are built as the tests' tree builds them
(infoscreen/ctl/localtree.py). Then it plays the server's part with the server account over TLS,
signing every command as ``infoscreenctl send`` does: a reboot followed to `completed`, an invalid
command and its `failed` ack, an unsigned reboot refused (`signature_invalid`), a SIGKILL of the
MQTT worker while a command is in flight (the supervisor replaces it; the ack still arrives), and
a health payload. Finally it stops
everything it started (also on Ctrl-C or an error) and exits 0.

Run: ``scripts/demo`` (installs what is missing first), or ``.venv/bin/python -m infoscreen.ctl.demo``.
Options: ``--keep`` keeps the temporary directory (logs, configuration) for a look afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, Callable

import msgspec
import psutil

from infoscreen.ctl import cli, localtree
from infoscreen.ctl.send import KEYS_VAR, follow_command, load_command_key, open_for_device, prepare_command
from infoscreen.ctl.session import Received, Session, env_from_args, settings_from_args
from infoscreen.wire import topics
from infoscreen.wire.schema import Action, ErrorCode, Health

PY = sys.executable
DISPLAY_NAME = localtree.DISPLAY_NAME
START_TIMEOUT_S = 20.0

class DemoError(Exception):
    pass


class _Stop(BaseException):
    """SIGTERM/SIGHUP to the demo: unwind through the `finally` that stops everything."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, total: int, title: str) -> None:
    say()
    say(f"[{n}/{total}] {title}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Child:
    """A process the demo started: own session and process group, log file, stopped by `stop()`."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                 executable: str | None = None, pipe_output: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, executable=executable, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_output else self._log,
            stderr=subprocess.STDOUT if pipe_output else self._log,
            start_new_session=True, preexec_fn=localtree.die_with_parent, close_fds=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group after `grace` s; waits for the exit."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in its process group (a worker, a child of a child)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_broker(conf: Path, log_path: Path) -> Child:
    mosquitto = os.environ.get("MOSQUITTO_BIN") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(mosquitto):
        raise DemoError("mosquitto is not installed (run ./scripts/bootstrap)")
    child = Child("mosquitto", [mosquitto, "-c", str(conf)], log_path, pipe_output=True)
    running = threading.Event()

    def read() -> None:
        assert child.proc.stdout is not None
        with open(log_path, "ab") as log:
            for raw in child.proc.stdout:
                log.write(raw)
                log.flush()
                if b" running" in raw and b"mosquitto version" in raw:
                    running.set()
        running.set()  # exited: wake the waiter

    threading.Thread(target=read, name="mosquitto-log", daemon=True).start()
    # The 'running' line is logged after the listener is bound and the password/ACL files loaded.
    if not running.wait(START_TIMEOUT_S) or not child.alive():
        child.stop(0.5)
        raise DemoError(f"mosquitto did not start:\n{child.log_tail()}")
    return child


def wait_path(path: Path, child: Child, timeout: float) -> None:
    """Wait for a socket file the child creates (no event source for that short of inotify: short,
    growing re-checks, bounded)."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not path.exists():
        if not child.alive():
            raise DemoError(f"{child.name} exited with status {child.proc.returncode}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise DemoError(f"{child.name} did not create {path} within {timeout:g} s:\n{child.log_tail()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def mqtt_worker_pid(supervisor_pid: int) -> int | None:
    """The MQTT worker, told apart from the health worker by its command line."""
    try:
        children = psutil.Process(supervisor_pid).children()
    except psutil.NoSuchProcess:
        return None
    for c in children:
        try:
            if "infoscreen.workers.mqtt" in c.cmdline() and c.status() != psutil.STATUS_ZOMBIE:
                return c.pid
        except psutil.Error:
            continue
    return None


def next_message(session: Session, want: Callable[[Received], bool], timeout: float, what: str) -> Received:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DemoError(f"no {what} within {timeout:g} s")
        item = session.get(remaining)
        if isinstance(item, Received) and want(item):
            return item


def drain(session: Session) -> None:
    while session.get(0) is not None:
        pass


def indent(line: str) -> None:
    """The lifecycle lines of `follow_command`, shifted under the narration (alignment kept)."""
    say("  " + line if line.startswith("  ") else "    " + line)


def run_demo(workdir: Path) -> None:
    total = 6
    device = str(uuidlib.uuid4())
    port = free_port()
    say("infoscreen demo: one screen agent and its broker, on this machine, in a few seconds.")
    say(f"Everything lives in {workdir} and listens on 127.0.0.1 only; it is all stopped at the end.")

    children: list[Child] = []
    observer: Session | None = None
    server: Session | None = None
    try:
        # ---- 1. broker -------------------------------------------------------------------------
        step(1, total, "The MQTT broker (Mosquitto), hardened by `infoscreenctl broker provision`")
        devices_file = workdir / "devices.txt"
        devices_file.write_text(f"# the demo's one screen\n{device}\n")
        broker_dir = workdir / "broker"
        me = pwd.getpwuid(os.getuid()).pw_name
        say(f"  $ infoscreenctl broker provision --devices devices.txt --out broker/ --port {port}")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            # --broker-user: the broker keeps running as this user (root would switch to `mosquitto`,
            # which could not read the demo's private temporary directory).
            rc = cli.main(["broker", "provision", "--devices", str(devices_file), "--out", str(broker_dir),
                           "--port", str(port), "--broker-user", me])
        if rc != 0:
            raise DemoError(f"broker provision failed ({rc}): {buf.getvalue()}")
        say("  It wrote one account per screen plus a server account (passwords hashed), an ACL that")
        say("  lets each screen read only its own commands and write only its own acks/health, and")
        say("  a config with anonymous access off and TCP_NODELAY on. Credentials went to 0600 files,")
        say("  never to the terminal.")
        broker = start_broker(broker_dir / "mosquitto.conf", workdir / "mosquitto.log")
        children.append(broker)
        say(f"  Mosquitto is running on 127.0.0.1:{port} (pid {broker.pid}), TLS only.")

        # The server's side logs in and signs exactly as `infoscreenctl ... --env broker/server.env`
        # does: TLS pinned to the fleet CA, the command key from INFOSCREEN_COMMAND_KEYS.
        server_args = argparse.Namespace(env=str(broker_dir / "server.env"))
        server_env = env_from_args(server_args)
        server_settings = settings_from_args(server_args, server_env)
        if not server_settings.tls:
            raise DemoError("provision did not turn TLS on")
        key = load_command_key(server_env[KEYS_VAR], device)
        if key is None:
            raise DemoError(f"provision wrote no command key for {device}")
        observer = Session(server_settings, client_id_prefix="demo-observer").connect()
        observer.subscribe([topics.heartbeat(device), topics.health(device)])

        # ---- 2. the screen's processes ------------------------------------------------------------
        step(2, total, "The screen: privileged helper (mock mode), a display stand-in, the supervisor")
        helper_sock = workdir / "helper" / "helper.sock"
        helper_sock.parent.mkdir(mode=0o755)
        (workdir / "helper-state").mkdir(mode=0o700)
        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("COMMAND_", "NOTIFY_", "WATCHDOG_", "LISTEN_"))}
        # The screen's copy of its command key, as install-device puts it (root's, 0600, on a real
        # screen; here the demo user's own 0600 file, which the helper accepts from its own user).
        key_file = broker_dir / "devices" / f"{device}.command.key"
        helper = Child("helper", [PY, "-m", "infoscreen.helper"], workdir / "helper.log",
                       env=localtree.helper_env(helper_sock, workdir / "helper-state",
                                                HELPER_COMMAND_KEY_FILE=str(key_file)))
        children.append(helper)
        wait_path(helper_sock, helper, START_TIMEOUT_S)
        say(f"  helper (pid {helper.pid}): the only root part on a real screen; it can do exactly two")
        say("  things, reboot and power off, and only for a command signed with this screen's key.")
        say("  Here it runs in mock mode: it executes nothing.")

        sleep = shutil.which("sleep") or "/bin/sleep"
        display = Child("display", [DISPLAY_NAME, "infinity"], workdir / "display.log", executable=sleep,
                        env=base_env)
        children.append(display)
        say(f"  display stand-in (pid {display.pid}): a process named `{DISPLAY_NAME}` that the health")
        say("  worker watches in place of the real display software.")

        run_dir = workdir / "run"
        sup_env = localtree.supervisor_env(state_dir=workdir / "state", runtime_dir=run_dir, helper_socket=helper_sock,
                                           device_env={}, base=base_env, HEARTBEAT_INTERVAL_S="2",
                                           HEALTH_INTERVAL_S="2", HELPER_COMMAND_KEY_FILE=str(key_file))
        # The device's own variables come from its provisioned env file, as on a screen.
        supervisor = Child("supervisor", [PY, "-m", "infoscreen.supervisor", "--env-file",
                                          str(broker_dir / "devices" / f"{device}.env")],
                           workdir / "supervisor.log", env=sup_env)
        children.append(supervisor)
        t0 = time.monotonic()
        try:
            next_message(observer, lambda m: m.topic == topics.heartbeat(device), START_TIMEOUT_S,
                         "first heartbeat from the screen")
        except DemoError:
            raise DemoError(f"the screen did not come online:\n{supervisor.log_tail(3000)}") from None
        mqtt_pid = mqtt_worker_pid(supervisor.pid)
        say(f"  supervisor `infoscreen-simclient` (pid {supervisor.pid}) started two workers: MQTT (pid {mqtt_pid})")
        say(f"  and health. The screen {device} is online:")
        say(f"  its first heartbeat arrived {(time.monotonic() - t0) * 1000:.0f} ms after the start.")

        server = Session(server_settings, client_id_prefix="demo-server").connect()
        open_for_device(server, device)  # both ack topics, before any command is published

        # ---- 3. a reboot ------------------------------------------------------------------------------
        step(3, total, "The server sends `reboot_host` and follows its acks")
        say("  (what `infoscreenctl send reboot --device UUID --wait` does), signed with the screen's key")
        say("  (an HMAC over the payload's bytes, in the MQTT 5 user property `signature`). The screen")
        say("  answers on two topics; each status is shown once, with the time since the publish.")
        cmd = prepare_command(device, Action.REBOOT.value, 120, key, requested_by="demo")
        res = follow_command(server, device, cmd.command.command_id, cmd.payload, action=Action.REBOOT.value,
                             expires_at=cmd.expires_at, wait=True, timeout=30, emit=indent, signature=cmd.signature)
        if res.outcome != "completed":
            raise DemoError(f"the reboot did not complete: {res.final_line}")
        say("  On a real screen the host reboots after `execution_started`, and `completed` arrives")
        say("  10-90 s later, once the client has seen a new boot. Mock mode completes at once.")

        # ---- 4. an invalid command ------------------------------------------------------------------
        step(4, total, "An invalid command: the screen refuses it with a `failed` ack and an error code")
        bad = prepare_command(device, "format_disk", 120, key, requested_by="demo")  # signed, and still refused
        say('  payload: {"action": "format_disk", ...}  (only reboot_host and shutdown_host exist)')
        res = follow_command(server, device, bad.command.command_id, bad.payload, action="format_disk",
                             expires_at=bad.expires_at, wait=True, timeout=30, emit=indent, signature=bad.signature)
        if res.outcome != "failed" or res.last is None or res.last.error_code != ErrorCode.UNSUPPORTED_ACTION.value:
            raise DemoError(f"expected failed/unsupported_action, got: {res.final_line}")
        say("  And a reboot without a signature (what `send --unsigned` does): this screen has a key,")
        say("  so it refuses it.")
        unsigned = prepare_command(device, Action.REBOOT.value, 120, None, requested_by="demo")
        res = follow_command(server, device, unsigned.command.command_id, unsigned.payload, action=Action.REBOOT.value,
                             expires_at=unsigned.expires_at, wait=True, timeout=30, emit=indent)
        if res.outcome != "failed" or res.last is None or res.last.error_code != ErrorCode.SIGNATURE_INVALID.value:
            raise DemoError(f"expected failed/signature_invalid, got: {res.final_line}")
        say("  Nothing was executed. Every error code is listed in docs/server-integration.md.")

        # ---- 5. the MQTT worker is killed while a command is in flight --------------------------------
        step(5, total, "Crash test: the MQTT worker is killed (SIGKILL) with a command in flight")
        old = mqtt_worker_pid(supervisor.pid)
        if old is None:
            raise DemoError("no MQTT worker found")
        drain(observer)
        cmd = prepare_command(device, Action.REBOOT.value, 120, key, requested_by="demo")
        os.kill(old, signal.SIGKILL)
        t_kill = time.monotonic()
        say(f"  killed the MQTT worker (pid {old}); now the server publishes a reboot while it is dead:")
        res = follow_command(server, device, cmd.command.command_id, cmd.payload, action=Action.REBOOT.value,
                             expires_at=cmd.expires_at, wait=True, timeout=30, emit=indent, signature=cmd.signature)
        if res.outcome != "completed":
            raise DemoError(f"the command in flight did not complete: {res.final_line}")
        hb = next_message(observer, lambda m: m.topic == topics.heartbeat(device), 10, "heartbeat of the new worker")
        new = mqtt_worker_pid(supervisor.pid)
        say(f"  The supervisor noticed the exit at once and started a new MQTT worker (pid {new});")
        say(f"  it was back on the broker {(hb.at - t_kill) * 1000:.0f} ms after the kill. Meanwhile the broker")
        say("  held the command in the screen's persistent session, so nothing was lost: the new")
        say("  worker received it and its acks reached the server.")

        # ---- 6. health ------------------------------------------------------------------------------------
        step(6, total, "A health report (every HEALTH_INTERVAL_S; 2 s here, 60 s by default)")

        def fresh_health(m: Received) -> bool:
            if m.topic != topics.health(device):
                return False
            try:
                return msgspec.json.decode(m.payload, type=Health).broker_connection.reconnect_count >= 1
            except msgspec.MsgspecError:
                return False

        report = next_message(observer, fresh_health, 15, "health report after the restart")
        h = msgspec.to_builtins(msgspec.json.decode(report.payload, type=Health))
        shown = {k: h[k] for k in ("timestamp", "actual_state", "broker_connection", "supervisor") if k in h}
        for line in json.dumps(shown, indent=2).splitlines():
            say("    " + line)
        say("  broker_connection counts the screen's reconnects (1: the restart above) and the time of")
        say("  the last disconnect; the full payload also has:")
        say(f"  {', '.join(k for k in h if k not in shown)}.")
    finally:
        say()
        say("Stopping everything the demo started ...")
        for s in (server, observer):
            if s is not None:
                s.close()
        for c in reversed(children):
            c.stop()
        left = [c.name for c in children if c.alive()]
        if left:
            say(f"  still running: {', '.join(left)}")
        else:
            say(f"  stopped: {', '.join(c.name for c in reversed(children))}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configuration)")
    args = parser.parse_args(argv)

    def on_signal(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    # Short: the supervisor's IPC socket path lives under it and ipc:// paths are limited to ~107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="isd-", dir="/tmp"))
    started = time.monotonic()
    ok: bool | None = False
    try:
        run_demo(workdir)
        ok = True
    except DemoError as exc:
        say()
        say(f"demo failed: {exc}")
    except (KeyboardInterrupt, _Stop) as exc:
        say()
        say(f"demo interrupted ({'Ctrl-C' if isinstance(exc, KeyboardInterrupt) else exc}); "
            "everything it started was stopped.")
        ok = None  # stopped on request: clean up as after a success
        return 130
    finally:
        if args.keep or ok is False:  # a failure: keep the logs for a look
            say(f"Logs and configuration kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if ok:
        say(f"Demo finished in {time.monotonic() - started:.1f} s. Next: docs/server-integration.md, and "
            "`infoscreenctl --help`.")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
