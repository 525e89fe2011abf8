"""A real systemd, booted in a systemd-nspawn container, for the end-to-end suite.

Three parts, each usable alone:

* ``ensure_root()``: a Debian bookworm root (debootstrap minbase + systemd, dbus, python3-venv)
  cached under ``/var/tmp/infoscreen-e2e-root/<key>``, where ``<key>`` hashes everything that goes
  into it (suite, mirror, package list, the customisation below); rebuilt when missing. Builders
  take an exclusive lock, so two runs never build the same root at once.
* ``RunRoot``: a throw-away copy of the cached root for one run (an overlayfs mount, or ``cp -a``
  where overlayfs cannot be mounted), so runs never pollute the cache.
* ``Container``: boots a ``RunRoot`` with ``systemd-nspawn --boot`` and drives it from the host.
  The host has no systemd, so the container is not registered (``--register=no --keep-unit``) and
  ``machinectl`` cannot reach it; commands run in it through ``nsenter`` into the namespaces of the
  container's PID 1. It shares the host's network, so a broker on host loopback is reachable.

Facts this module relies on (Debian bookworm, systemd 252): ``systemctl reboot`` inside makes
``systemd-nspawn`` exit with status 133, ``poweroff`` with 0; booting the same root again gives a
new ``/proc/sys/kernel/random/boot_id``; the container powers off cleanly on SIGRTMIN+4 sent to
its PID 1 (systemd's "poweroff" signal). The same signal sent to the ``systemd-nspawn`` process
kills nspawn alone and leaves the container running, orphaned (measured here), and SIGTERM to
nspawn is not enough either.

Command line (used by scripts/test-e2e): ``python -m tests.e2e.container preflight`` builds or finds
the root and boots it once; exit status 3 with one line when this machine cannot boot a container.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# ------------------------------------------------------------------------------------------ root
ROOT_VERSION = 1  # bump to force a rebuild when the customisation below changes in meaning
SUITE = "bookworm"
MIRROR = os.environ.get("INFOSCREEN_E2E_MIRROR", "http://deb.debian.org/debian")
# What a screen has: systemd as PID 1, the system D-Bus (an unprivileged `systemctl show`, as the
# notify-failure unit does, goes through it), Debian's python3 with venv (install-device builds
# /opt/infoscreen/venv with it), procps for debugging by hand.
PACKAGES: tuple[str, ...] = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps")
# Units that only add noise or boot time in a throw-away container.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "systemd-networkd-wait-online.service",
    "console-getty.service",
    "getty@tty1.service",
)
CACHE_BASE = Path(os.environ.get("INFOSCREEN_E2E_CACHE", "/var/tmp/infoscreen-e2e-root"))

NSPAWN = "systemd-nspawn"
NSENTER = "nsenter"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_REBOOT = 133  # systemd-nspawn's exit status when the container asked for a reboot


class ContainerUnavailable(RuntimeError):
    """This machine cannot boot a systemd container (no privileges, no namespaces, ...)."""


def _log(msg: str) -> None:
    print(f"e2e: {msg}", file=sys.stderr, flush=True)


def root_key() -> str:
    spec = "\n".join(
        [
            f"v{ROOT_VERSION}",
            SUITE,
            MIRROR,
            "minbase",
            ",".join(sorted(PACKAGES)),
            "mask:" + ",".join(sorted(MASKED_UNITS)),
        ]
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _customise(root: Path) -> None:
    """Make the debootstrapped tree boot quickly and quietly as a container."""
    (root / "etc/hostname").write_text("infoscreen-e2e\n")
    (root / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n127.0.1.1\tinfoscreen-e2e\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    # Empty: every run writes its own (RunRoot), so journals of two runs never mix.
    (root / "etc/machine-id").write_text("")
    systemd_dir = root / "etc/systemd/system"
    systemd_dir.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        link = systemd_dir / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    default = systemd_dir / "default.target"
    if default.is_symlink() or default.exists():
        default.unlink()
    default.symlink_to("/lib/systemd/system/multi-user.target")
    # A persistent journal: the reboot test reads what the previous boot logged.
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    jconf = root / "etc/systemd/journald.conf.d"
    jconf.mkdir(parents=True, exist_ok=True)
    (jconf / "e2e.conf").write_text("[Journal]\nStorage=persistent\nRateLimitBurst=0\n")
    for junk in (root / "var/cache/apt/archives").glob("*.deb"):
        junk.unlink()


def _check_tools() -> None:
    missing = [t for t in ("debootstrap", NSPAWN, NSENTER) if shutil.which(t) is None]
    if missing:
        raise ContainerUnavailable(
            f"missing {' '.join(missing)} (apt-get install debootstrap systemd-container util-linux)"
        )
    if os.geteuid() != 0:
        raise ContainerUnavailable("must run as root (debootstrap, mount, systemd-nspawn)")


def ensure_root(rebuild: bool = False) -> Path:
    """Return the cached pristine root for ``root_key()``, building it first when missing."""
    _check_tools()
    base = CACHE_BASE / root_key()
    base.mkdir(parents=True, exist_ok=True)
    root = base / "rootfs"
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rebuild or not (root / "STAMP").is_file():
            tmp = base / "rootfs.new"
            if tmp.exists():
                shutil.rmtree(tmp)
            if root.exists():
                shutil.rmtree(root)
            _log(f"building the container root {base} (debootstrap, about a minute)")
            t0 = time.monotonic()
            logf = base / "build.log"
            with open(logf, "w") as out:
                rc = subprocess.call(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        "--include=" + ",".join(PACKAGES),
                        SUITE,
                        str(tmp),
                        MIRROR,
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if rc != 0:
                tail = logf.read_text(errors="replace").splitlines()[-20:]
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"debootstrap failed ({rc}); log {logf}:\n" + "\n".join(tail))
            _customise(tmp)
            (tmp / "STAMP").write_text(root_key() + "\n")
            tmp.rename(root)
            _log(f"container root built in {time.monotonic() - t0:.0f} s")
    return root


RUN_PARENT = "/var/tmp"
RUN_PREFIX = "infoscreen-e2e-run."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Remove what an earlier run killed outright (SIGKILL, power loss) left behind: its
    container (only the systemd-nspawn processes whose command line names that run's directory,
    by pid), its overlay mount and its directory. Runs whose owner is alive are left alone."""
    removed: list[str] = []
    for d in sorted(Path(RUN_PARENT).glob(RUN_PREFIX + "*")):
        try:
            owner = int((d / "owner").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            owner = 0
        if owner and _alive(owner):
            continue
        merged = str(d / "merged")
        for rec in d.glob("nspawn.*"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(rec.name.split(".", 1)[1])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if f"--directory={merged}".encode() in cmdline:
                    for child in _children(pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(child, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if os.path.ismount(merged):
            subprocess.run(["umount", "-l", merged], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed


class RunRoot:
    """A throw-away copy of the cached root: overlayfs when possible, else ``cp -a``."""

    def __init__(self, pristine: Path, force_copy: bool = False):
        self.pristine = pristine
        self.dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=RUN_PARENT))
        # Who owns this run: cleanup_stale() removes runs whose owner died without cleaning up.
        (self.dir / "owner").write_text(f"{os.getpid()}\n")
        self.path = self.dir / "merged"
        self.path.mkdir()
        self.mounted = False
        if not force_copy:
            (self.dir / "upper").mkdir()
            (self.dir / "work").mkdir()
            opts = f"lowerdir={pristine},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"
            r = subprocess.run(
                ["mount", "-t", "overlay", "infoscreen-e2e", "-o", opts, str(self.path)],
                capture_output=True,
                text=True,
            )
            self.mounted = r.returncode == 0
        if not self.mounted:
            self.path.rmdir()
            subprocess.run(["cp", "-a", str(pristine), str(self.path)], check=True)
        mid = secrets.token_hex(16)
        (self.path / "etc/machine-id").write_text(mid + "\n")
        self.how = "overlayfs" if self.mounted else "cp -a"

    def cleanup(self) -> None:
        if self.mounted:
            for _ in range(20):
                if subprocess.run(["umount", str(self.path)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.25)  # a process of the container may still hold a file; bounded
            else:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RunRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# ------------------------------------------------------------------------------------ container
def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def _ns_pid(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1
) -> object:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Container:
    """One bootable container over one run root. ``boot()`` may be called again after it exited
    (after a reboot or a poweroff), on the same root: state on disk survives, the boot id does not."""

    def __init__(self, root: Path, name: str, log_dir: Path):
        self.root = root
        self.name = name
        self.log_dir = log_dir
        self.boots = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.exit_status: int | None = None
        self._console = None

    # ---- lifecycle
    def boot(self, timeout: float = 90) -> None:
        if self.running:
            raise RuntimeError("container already running")
        self.boots += 1
        self.exit_status = None
        console_log = self.log_dir / f"{self.name}-boot{self.boots}.console.log"
        self._console = open(console_log, "wb")  # noqa: SIM115 - closed in _reap
        argv = [
            NSPAWN,
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--console=pipe",
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        record = self.root.parent / f"nspawn.{self.proc.pid}"
        if self.root.name == "merged" and self.root.parent.name.startswith(RUN_PREFIX):
            record.write_text(f"{self.name}\n")
        try:
            self.leader = int(
                wait_for(self._find_leader, min(timeout, 30), "the container's PID 1")  # type: ignore[arg-type]
            )
            state = ""

            def booted() -> bool:
                nonlocal state
                if self.proc is not None and self.proc.poll() is not None:
                    raise ContainerUnavailable(
                        f"systemd-nspawn exited with {self.proc.returncode} while booting "
                        f"(console: {console_log}): " + self._console_tail()
                    )
                r = self.exec(["systemctl", "is-system-running"], check=False, timeout=10)
                state = r.stdout.strip()
                return state in ("running", "degraded")

            wait_for(booted, timeout, "the container's systemd to finish booting", interval=0.2)
            if state == "degraded":
                failed = self.exec(["systemctl", "--failed", "--no-legend", "--plain"], check=False)
                _log(f"container booted degraded: {failed.stdout.strip()}")
        except BaseException:
            self.kill()
            raise

    def _console_tail(self, n: int = 5) -> str:
        path = self.log_dir / f"{self.name}-boot{self.boots}.console.log"
        with contextlib.suppress(OSError):
            lines = path.read_text(errors="replace").strip().splitlines()
            return " | ".join(lines[-n:])
        return ""

    def _find_leader(self) -> int | None:
        """The host pid of the container's PID 1: the descendant of systemd-nspawn whose pid in
        its own namespace is 1 and which runs systemd (not nspawn's transient stub)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ContainerUnavailable(
                f"systemd-nspawn exited with {self.proc.returncode} at start: " + self._console_tail()
            )
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            for child in _children(pid):
                ns = _ns_pid(child)
                if len(ns) >= 2 and ns[-1] == 1:
                    with contextlib.suppress(OSError):
                        exe = os.readlink(f"/proc/{child}/exe")
                        if "systemd" in exe:
                            return child
                todo.append(child)
        return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        """Wait for systemd-nspawn to exit (the container rebooted or powered off); its status."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"container {self.name} still running after {timeout:.0f} s") from None
        self._reap()
        return rc

    def _reap(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            self.exit_status = self.proc.returncode
        self.leader = None
        # Without a tmpfs /run on the host, nspawn leaves its propagation directory behind.
        prop = Path("/run/systemd/nspawn/propagate") / self.name
        if self.proc is not None and self.proc.returncode is not None and prop.is_dir() and not os.path.ismount(prop):
            shutil.rmtree(prop, ignore_errors=True)
        if self._console is not None:
            self._console.close()
            self._console = None

    def stop(self, timeout: float = 30) -> int | None:
        """Orderly shutdown (SIGRTMIN+4 to the container's systemd), then SIGKILL after ``timeout``."""
        if not self.running:
            self._reap()
            return self.exit_status
        assert self.proc is not None
        # SIGRTMIN+4 asks systemd (the container's PID 1) for a poweroff. Sent to systemd-nspawn
        # it would kill nspawn alone and leave the container orphaned, still running.
        target = self.leader or self._find_leader()
        if target is None:
            self.kill()
            return self.exit_status
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGRTMIN + 4)
        try:
            return self.wait_exit(timeout)
        except TimeoutError:
            _log(f"container {self.name} ignored the shutdown request; killing it")
            self.kill()
            return self.exit_status

    def kill(self) -> None:
        """Kill the container outright: its PID 1 (which takes its whole pid namespace along),
        then systemd-nspawn."""
        if self.proc is None:
            return
        if self.leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self._reap()

    def power_cut(self, timeout: float = 30) -> int:
        """Cut the power: SIGKILL to the container's PID 1 and to systemd-nspawn, back to back.
        When a pid namespace's init dies the kernel SIGKILLs every other process in it, so no
        unit stops, nothing is flushed or unmounted by the container, and nspawn (killed too)
        tears nothing down in order. Returns nspawn's exit status (-9); ``boot()`` starts the same
        root again. PID 1 goes first: SIGKILL to nspawn alone would leave the container running,
        orphaned. What a kill cannot take away is the host's page cache: data written but not yet
        fsynced survives here, where a screen would lose it."""
        if not self.running:
            raise RuntimeError(f"container {self.name} is not running")
        assert self.proc is not None
        leader = self.leader or self._find_leader()
        pidfd = None
        if leader is not None:
            with contextlib.suppress(ProcessLookupError):
                pidfd = os.pidfd_open(leader)
                os.kill(leader, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            rc = self.proc.wait(timeout=timeout)
            if pidfd is not None:  # the namespace is gone once its init has exited
                import select

                if not select.select([pidfd], [], [], timeout)[0]:
                    raise TimeoutError(f"container {self.name}: PID 1 still there {timeout:.0f} s after SIGKILL")
        finally:
            if pidfd is not None:
                os.close(pidfd)
        self._reap()
        return rc

    # ---- commands inside
    def _nsenter(self, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        if self.leader is None or not self.running:
            raise RuntimeError(f"container {self.name} is not running")
        environ = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        environ.update(env or {})
        return [
            NSENTER,
            f"--target={self.leader}",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--cgroup",
            "--root",
            "--wd",
            "--",
            "/usr/bin/env",
            "-i",
            *[f"{k}={v}" for k, v in environ.items()],
            *argv,
        ]

    def exec(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container as root; text output captured."""
        r = subprocess.run(
            self._nsenter(argv, env),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, list(argv), r.stdout, r.stderr)
        return r

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(self._nsenter(argv), text=True, **kw)  # type: ignore[call-overload]

    # ---- systemd helpers
    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.exec(["systemctl", "show", "-p", ",".join(props), "--", unit])
        out: dict[str, str] = {}
        for line in r.stdout.splitlines():
            k, _, v = line.partition("=")
            out[k] = v
        return out

    def wait_unit(
        self,
        unit: str,
        predicate: Callable[[dict[str, str]], bool],
        timeout: float,
        what: str,
        props: Sequence[str] = ("ActiveState", "SubState", "Result", "NRestarts", "MainPID", "StatusText"),
    ) -> dict[str, str]:
        last: dict[str, str] = {}

        def check() -> dict[str, str] | None:
            nonlocal last
            last = self.show(unit, *props)
            return last if predicate(last) else None

        try:
            return wait_for(check, timeout, f"{unit}: {what}", interval=0.2)  # type: ignore[return-value]
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last state {last}") from None

    def journal(self, unit: str | None = None, boot: str | None = None, output: str = "cat") -> str:
        argv = ["journalctl", "--no-pager", "-q", "-o", output]
        if unit:
            argv += ["-u", unit]
        if boot:
            argv += ["-b", boot]
        return self.exec(argv, check=False, timeout=30).stdout

    def wait_journal(self, pattern: str, unit: str | None = None, timeout: float = 30) -> re.Match[str]:
        rx = re.compile(pattern, re.M)

        def check() -> re.Match[str] | None:
            return rx.search(self.journal(unit))

        return wait_for(check, timeout, f"journal line /{pattern}/" + (f" of {unit}" if unit else ""), 0.25)  # type: ignore[return-value]

    def boot_id(self) -> str:
        return self.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()

    def write_file(self, path: str, content: str, mode: int = 0o644) -> None:
        """Write a file inside the container's root from the host (works running or not)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        os.chmod(target, mode)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def booted(name: str = "infoscreen-e2e", log_dir: Path | None = None) -> Iterator[Container]:
    """A throw-away container, booted; everything removed on exit."""
    pristine = ensure_root()
    logs = log_dir or Path(tempfile.mkdtemp(prefix="infoscreen-e2e-logs."))
    with RunRoot(pristine) as rr:
        c = Container(rr.path, name, logs)
        try:
            c.boot()
            yield c
        finally:
            c.stop()


def preflight() -> int:
    """Build or find the root, boot it once and power it off. 0 ok, 3 cannot boot here."""
    for d in cleanup_stale():
        _log(f"removed a stale run left behind by a killed test run: {d}")
    try:
        t0 = time.monotonic()
        with booted("infoscreen-e2e-preflight") as c:
            bid = c.boot_id()
            ver = c.exec(["systemctl", "--version"]).stdout.splitlines()[0]
            c.exec(["systemctl", "poweroff", "--no-block"])
            rc = c.wait_exit(60)
        _log(f"preflight: booted {ver} (boot id {bid}), powered off with status {rc}, {time.monotonic() - t0:.1f} s")
        return 0
    except ContainerUnavailable as e:
        print(f"e2e: CANNOT BOOT A SYSTEMD CONTAINER ON THIS MACHINE: {e}", file=sys.stderr, flush=True)
        return 3


if __name__ == "__main__":
    if sys.argv[1:] == ["preflight"]:
        sys.exit(preflight())
    if sys.argv[1:] == ["build"]:
        print(ensure_root(rebuild=True))
        sys.exit(0)
    if sys.argv[1:] == ["path"]:
        print(ensure_root())
        sys.exit(0)
    print("usage: python -m tests.e2e.container preflight|build|path", file=sys.stderr)
    sys.exit(2)
