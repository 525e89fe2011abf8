"""A real Mosquitto for the tests, provisioned by `infoscreen.ctl.provision` (the production code).

    broker = MosquittoBroker([uuid], tmp_path / "broker").start()
    broker.host, broker.port, broker.server_user, broker.server_password
    broker.device_env(uuid)      # {"CLIENT_UUID": ..., "MQTT_USER": ..., "MQTT_TLS": "1", "MQTT_CA_FILE": ...}
    broker.ca_file               # the fleet CA the clients pin (None for a plaintext broker)
    broker.device_key(uuid)      # the device's 32-byte command key (broker.server_key_path(uuid): the server's copy)
    broker.stop(); broker.start()  # an outage: same port, same persistence (retained, sessions)
    broker.kill()                # a crash: SIGKILL, changes since the last autosave are lost

TLS by default, as `broker provision` does it: a fleet CA and a server certificate for 127.0.0.1
and localhost. Every `MqttProbe` made for this host and port pins that CA unless told otherwise
(tests/support/mqtt.py). `MosquittoBroker(..., tls=False)` is a plaintext broker, for a test that
needs one; `tls=(cert, key, ca)` brings certificates of its own (`--tls-cert/--tls-key/--tls-ca`).

Readiness is an event: a thread reads the broker's log and fires when mosquitto says
``... running`` (printed after its listener is bound and its accounts and ACL are loaded) and then
logs the connection the fixture makes (only its main loop does), or when the process exits (e.g.
its port was taken). Nothing sleeps.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import weakref
import atexit
import tempfile
from pathlib import Path
from typing import Iterable

from infoscreen.ctl import provision as prov
from infoscreen.wire import signing
from tests.support import mqtt as mqtt_support

MOSQUITTO = os.environ.get("MOSQUITTO_BIN") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"

_LIVE: "weakref.WeakSet[MosquittoBroker]" = weakref.WeakSet()

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # If the test run itself is SIGKILLed, the broker must not outlive it holding its port.
    # (PDEATHSIG fires when the forking *thread* exits: start brokers from the main thread or a
    # thread that outlives them, as fixtures do.)
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# One fleet PKI per test process, made by the first broker and copied into the others before
# they are provisioned (provision keeps a CA and a certificate it finds, as on re-provisioning):
# openssl costs ~90 ms per broker otherwise, which every test would pay.
_PKI_CACHE: Path | None = None
_PKI_FILES = ("ca.crt", "ca.key", "server.crt", "server.key")


def _seed_pki(tls_dir: Path) -> None:
    if _PKI_CACHE is None or tls_dir.exists():
        return
    tls_dir.mkdir(mode=0o755)
    for name in _PKI_FILES:
        shutil.copy2(_PKI_CACHE / name, tls_dir / name)


def _remember_pki(tls_dir: Path) -> None:
    global _PKI_CACHE
    if _PKI_CACHE is not None or not all((tls_dir / n).is_file() for n in _PKI_FILES):
        return
    cache = Path(tempfile.mkdtemp(prefix="infoscreen-test-pki-"))
    for name in _PKI_FILES:
        shutil.copy2(tls_dir / name, cache / name)
    atexit.register(shutil.rmtree, cache, True)
    _PKI_CACHE = cache


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0). Callers must handle the race."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BrokerError(RuntimeError):
    pass


class MosquittoBroker:
    """One real ``mosquitto -c CONF`` in the foreground, provisioned for `devices`."""

    START_TIMEOUT = 10.0
    STOP_TIMEOUT = 5.0
    PORT_CLASH_RETRIES = 5

    def __init__(
        self,
        devices: Iterable[str],
        workdir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        server_user: str = prov.DEFAULT_SERVER_USER,
        autosave_interval: int = 30,
        run_as_user: str | None = None,
        tls: bool | tuple[str, str, str] = True,
    ) -> None:
        self.devices: list[str] = [d.lower() for d in devices]
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._port: int | None = port
        self._fixed_port = port is not None
        self.server_user = server_user
        self.autosave_interval = autosave_interval
        # TEST config: `user` equal to the account running the tests. Started as root, mosquitto
        # would otherwise switch to `mosquitto`, which can neither read these root-owned 0600
        # files in a root-only tmp dir nor write the persistence there. A user equal to the
        # current one means no switch (and as non-root it never switches). The production config
        # keeps `user mosquitto` (see provision.py); pass run_as_user="mosquitto" to test that.
        self.run_as_user = run_as_user or pwd.getpwuid(os.getuid()).pw_name
        self.tls = tls  # True: the fleet CA provision makes; False: plaintext; (cert, key, CA): own certificates
        self.provisioned: prov.Provisioned | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._running_evt = threading.Event()
        self._log_lock = threading.Lock()
        self._log: list[str] = []
        self.starts = 0
        self._provision()

    # ---- provisioning --------------------------------------------------------------------

    def _provision(self) -> None:
        if self._port is None:
            self._port = free_port(self.host)
        own = self.tls if isinstance(self.tls, tuple) else None
        if self.tls is True:
            _seed_pki(self.workdir / prov.TLS_DIR)
        old = self.provisioned
        self.provisioned = prov.provision(
            self.devices,
            self.workdir,
            listen=self.host,
            port=self._port,
            server_user=self.server_user,
            run_as_user=self.run_as_user,
            autosave_interval=self.autosave_interval,
            plaintext=self.tls is False,
            tls_cert=own[0] if own else None,
            tls_key=own[1] if own else None,
            tls_ca=own[2] if own else None,
        )
        if self.tls is True:
            _remember_pki(self.workdir / prov.TLS_DIR)
        if old is not None and old.port != self._port:
            mqtt_support.trust(self.host, old.port, None)
        mqtt_support.trust(self.host, self._port, self.ca_file)

    def set_devices(self, devices: Iterable[str]) -> None:
        """Re-provision for a new device list, as an operator re-runs `broker provision`: existing
        passwords are kept, dropped devices lose their account. A running broker is restarted
        (same port, same persistence) to load the new password and ACL files."""
        was_running = self.running
        if was_running:
            self.stop()
        self.devices = [d.lower() for d in devices]
        self._provision()
        if was_running:
            self.start()

    # ---- accessors -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._port is not None
        return self._port

    @property
    def conf_path(self) -> Path:
        return self.provisioned.conf_path

    @property
    def data_dir(self) -> Path:
        return self.provisioned.data_dir

    @property
    def server_password(self) -> str:
        return self.provisioned.server_password

    @property
    def server_env_path(self) -> Path:
        return self.provisioned.server_env_path

    def server_env(self) -> dict[str, str]:
        return prov.parse_env_file(self.server_env_path)

    def device_env_path(self, uuid: str) -> Path:
        return self.provisioned.device_env_path(uuid.lower())

    def device_env(self, uuid: str) -> dict[str, str]:
        """The lines of the device's provisioned env file (CLIENT_UUID, MQTT_USER, ...)."""
        return prov.parse_env_file(self.device_env_path(uuid))

    def device_user(self, uuid: str) -> str:
        return prov.device_username(uuid.lower())

    def device_password(self, uuid: str) -> str:
        return self.provisioned.device_passwords[uuid.lower()]

    @property
    def ca_file(self) -> str | None:
        """The CA the clients pin (server.env's MQTT_CA_FILE); None for a plaintext broker."""
        ca = self.provisioned.ca_file
        return str(ca) if ca is not None and self.provisioned.tls else None

    @property
    def keys_dir(self) -> Path:
        """The server's command keys: server.env's INFOSCREEN_COMMAND_KEYS."""
        return self.provisioned.keys_dir

    def device_key(self, uuid: str) -> bytes:
        """The device's 32-byte command key, read from the server's copy as `send` reads it."""
        return signing.read_key_file(self.server_key_path(uuid))

    def server_key_path(self, uuid: str) -> Path:
        return self.provisioned.server_key_path(uuid.lower())

    def device_key_path(self, uuid: str) -> Path:
        """The device's copy (what is installed on the screen as /etc/infoscreen/command.key)."""
        return self.provisioned.device_key_path(uuid.lower())

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        with self._log_lock:
            return "".join(self._log)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> "MosquittoBroker":
        """Start the broker and return once it accepts connections.

        The first start picks a free port and, on the tiny race where something takes it first,
        picks another one. Later starts reuse the same port and the same persistence directory.
        """
        if self.running:
            raise BrokerError("broker already running")
        timeout = self.START_TIMEOUT if timeout is None else timeout
        may_move = not self._fixed_port and self.starts == 0
        last_error = ""
        for _attempt in range(self.PORT_CLASH_RETRIES if may_move else 1):
            ok, last_error = self._start_once(timeout)
            if ok:
                self.starts += 1
                _LIVE.add(self)
                return self
            if may_move and "Address already in use" in last_error:
                self._port = None
                self._provision()  # a new free port; the passwords are kept
                continue
            break
        raise BrokerError(f"mosquitto did not start on {self.host}:{self._port}: {last_error.strip()[-2000:]}")

    def _start_once(self, timeout: float) -> tuple[bool, str]:
        self._running_evt = threading.Event()
        exited = threading.Event()
        looping = threading.Event()
        with self._log_lock:
            mark = len(self._log)
        proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            close_fds=True,
        )
        self._proc = proc
        running_evt = self._running_evt

        def read() -> None:
            logfile = open(self.workdir / "broker.log", "ab")
            try:
                assert proc.stdout is not None
                for raw in proc.stdout:
                    logfile.write(raw)
                    logfile.flush()
                    line = raw.decode("utf-8", "replace")
                    with self._log_lock:
                        self._log.append(line)
                    if " running" in line and "mosquitto version" in line:
                        running_evt.set()
                    elif running_evt.is_set() and "onnection from" in line:
                        looping.set()  # "New connection from ..." / "Client connection from ... failed"
            finally:
                logfile.close()
                exited.set()
                running_evt.set()  # wake the starter: it checks whether the process lives
                looping.set()

        self._reader = threading.Thread(target=read, name=f"mosquitto-log-{self._port}", daemon=True)
        self._reader.start()
        if not running_evt.wait(timeout):
            self._terminate(proc, 0)
            return False, f"no 'running' line within {timeout} s\n" + self._log_since(mark)
        if exited.is_set() or proc.poll() is not None:
            proc.wait()
            self._reader.join(timeout=2)
            self._proc = None
            return False, f"exit status {proc.returncode}\n" + self._log_since(mark)
        # Mosquitto 2.0 prints 'running' just before it sets its run flag: a SIGTERM in between
        # is lost (the flag is set back) and the broker runs on. Only its main loop accepts a
        # connection and logs it, so one connection, logged, proves the loop runs (and that the
        # listener is bound).
        try:
            self._touch(timeout=2)
        except OSError as exc:
            self._terminate(proc, 0)
            return False, f"port not accepting connections: {exc}\n" + self._log_since(mark)
        if not looping.wait(timeout) or exited.is_set():
            self._terminate(proc, 0)
            return False, "the broker logged no accepted connection\n" + self._log_since(mark)
        return True, ""

    def _log_since(self, mark: int) -> str:
        with self._log_lock:
            return "".join(self._log[mark:])

    def _terminate(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        if proc.poll() is None:
            if grace > 0:
                proc.send_signal(signal.SIGTERM)
                self._wake(proc)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
        proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._proc is proc:
            self._proc = None

    def _wake(self, proc: subprocess.Popen[bytes]) -> None:
        # Mosquitto 2.0 blocks its signals except between two epoll_wait calls of up to 100 ms,
        # so a SIGTERM alone takes ~100 ms to act. A connection attempt wakes its loop at once
        # (measured: ~100 ms -> ~2 ms per stop, which every test's teardown pays).
        # A bare TCP connection, closed at once by this side: a TLS handshake would keep it open
        # while the broker exits, and the broker's close would then leave its port in TIME_WAIT.
        # (On a TLS listener the broker logs the cut handshake, on its way out.)
        if self._port is None:
            return
        try:
            socket.create_connection((self.host, self._port), timeout=0.5).close()
        except OSError:
            pass

    def _touch(self, timeout: float) -> None:
        """One connection, closed again. On a TLS listener with a full handshake, so that the
        broker's log shows no failed one. This side closes first (no TLS close_notify to wait
        for), so the TIME_WAIT is this side's and the broker's port is free once it has stopped."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            if self.ca_file is not None:
                ctx = ssl.create_default_context(cafile=self.ca_file)
                ctx.check_hostname = False  # only the broker's loop is probed here, not its name
                with ctx.wrap_socket(sock):  # takes the socket over; closing it sends no close_notify
                    pass

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (mosquitto saves its database), SIGKILL after `timeout`; waits for the exit.
        Returns the exit status, None when it was not running."""
        proc = self._proc
        if proc is None:
            return None
        self._terminate(proc, self.STOP_TIMEOUT if timeout is None else timeout)
        _LIVE.discard(self)
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: a crash. Changes since the last autosave are not persisted."""
        proc = self._proc
        if proc is None:
            return None
        self._terminate(proc, 0)
        _LIVE.discard(self)
        return proc.returncode

    def restart(self, timeout: float | None = None) -> "MosquittoBroker":
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> "MosquittoBroker":
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        tls = "tls" if self.ca_file else "plaintext"
        return f"<MosquittoBroker {self.host}:{self._port} {tls} {state} devices={len(self.devices)}>"


@atexit.register
def _stop_leftovers() -> None:
    for broker in list(_LIVE):
        try:
            broker.kill()
        except Exception:
            pass
