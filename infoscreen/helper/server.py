"""infoscreen-helper: the only root process of the infoscreen client.

Two things only, reboot and power off the host, for allowed local peers, through a closed
dispatch table (in the spirit of OpenSSH's monitor.c): nothing from a request ever reaches an
argv, an environment or a path. Standard library only; of the package it imports only its
protocol. Read top to bottom: config, backends, breaker state, requests, sockets, main.
"""
import fcntl, grp, json, os, pwd, signal, socket, stat, struct, subprocess, sys, threading, time
import types

from infoscreen.helper import protocol as P

# Debian bookworm is merged-/usr (/bin -> usr/bin). A fixed absolute path: no PATH lookup.
SYSTEMCTL = "/usr/bin/systemctl"
DISPATCH = {   # closed table: action -> (pre-flight argv, real argv); tuples are immutable
    "reboot_host": ((SYSTEMCTL, "--dry-run", "reboot"), (SYSTEMCTL, "reboot")),
    "shutdown_host": ((SYSTEMCTL, "--dry-run", "poweroff"), (SYSTEMCTL, "poweroff")),
}
DRY_RUN_TIMEOUT_S, EXEC_TIMEOUT_S, WINDOW_S = 10.0, 30.0, 3600.0
MAX_WORKERS = 16   # standalone mode: concurrent connections; more are closed at once
TRUE, FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
_audit_lock = threading.Lock()

class ConfigError(Exception):
    """A start-up refusal: printed as one line naming the variable, exit status 2."""

def audit(**fields):
    # One JSON object per line on stderr (the journal): escaping means no forged lines.
    line = "infoscreen-helper audit " + json.dumps(fields, sort_keys=True) + "\n"
    with _audit_lock:
        sys.stderr.write(line)
        sys.stderr.flush()

def _number(env, name, default, lo, hi, kind=float):
    raw = env.get(name, "").strip()
    try:
        value = kind(raw) if raw else default
    except ValueError:
        raise ConfigError("%s: not a number: %r" % (name, raw[:40])) from None
    if not lo <= value <= hi:   # also rejects nan
        raise ConfigError("%s: must be between %s and %s" % (name, lo, hi))
    return value

def _ids(env, name, default, lookup):
    ids = []
    for item in filter(None, (s.strip() for s in env.get(name, default).split(","))):
        try:
            ids.append(int(item) if item.isascii() and item.isdigit() else lookup(item))
        except KeyError:
            raise ConfigError("%s: no such name on this host: %r" % (name, item[:40])) from None
    return tuple(ids)

def load_config(env):
    mode = env.get("INFOSCREEN_ENV", "").strip() or "production"
    if mode not in ("production", "development", "test"):
        raise ConfigError("INFOSCREEN_ENV: must be production, development or test")
    flag = env.get("COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE", "").strip().lower()
    if flag not in TRUE | FALSE:
        raise ConfigError("COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE: expected a boolean")
    if flag in TRUE and mode == "production":   # loud, never silently ignored
        raise ConfigError("COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE: mock execution refused "
                          "under INFOSCREEN_ENV=production")
    cfg = types.SimpleNamespace(
        mode=mode, mock=flag in TRUE, socket_ino=None,
        socket=env.get("HELPER_SOCKET", "").strip() or "/run/infoscreen-helper/helper.sock",
        state_dir=env.get("HELPER_STATE_DIR", "").strip() or "/var/lib/infoscreen-helper",
        users=_ids(env, "HELPER_ALLOWED_USERS", "", lambda n: pwd.getpwnam(n).pw_uid),
        groups=_ids(env, "HELPER_ALLOWED_GROUPS", "infoscreen", lambda n: grp.getgrnam(n).gr_gid),
        grace=_number(env, "HELPER_GRACE_S", 2.0, 0.0, 60.0),
        limit=_number(env, "HELPER_MAX_ACTIONS_PER_HOUR", 3, 0, 100000, int),
        read_timeout=_number(env, "HELPER_READ_TIMEOUT_S", 2.0, 0.05, 30.0))
    for name in ("socket", "state_dir"):
        if not os.path.isabs(getattr(cfg, name)):
            raise ConfigError("HELPER_%s: must be an absolute path" % name.upper())
    return cfg

class SubprocessExecutor:
    """The real backend: list argv, empty environment, no shell, no inherited fds, bounded."""
    mock = False

    def run(self, argv, env, timeout):
        return subprocess.run(list(argv), env=env, shell=False, close_fds=True, cwd="/",
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              timeout=timeout).returncode

class MockExecutor:
    """Mock mode (never in production): records what the real backend would get, runs nothing."""
    mock = True

    def run(self, argv, env, timeout):
        audit(event="mock_exec", argv=list(argv), env=dict(env), shell=False, timeout_s=timeout)
        return 0

def _ensure_state_dir(path):
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise ConfigError("HELPER_STATE_DIR: %s must be a real directory of ours, not "
                          "writable by group or others" % path)

def _try_lock(state_dir):
    # flock on an open file description: exclusive across processes (Accept=yes instances)
    # and threads alike; the kernel drops it if we die.
    fd = os.open(os.path.join(state_dir, "power.lock"),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None

def _save_times(state_dir, times):
    # write, fsync, rename, fsync the directory: a power cut leaves the old or the new file.
    path = os.path.join(state_dir, "actions.json")
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"v": 1, "ts": times}))
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def _load_times(state_dir, now, limit):
    """Wall-clock times of recent actions: they must survive reboots (docs/security.md)."""
    try:
        fd = os.open(os.path.join(state_dir, "actions.json"), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            times = json.loads(f.read(1 << 20))["ts"]
        if not all(type(t) in (int, float) and t == t for t in times):
            raise ValueError("bad timestamp")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError):
        audit(event="state_corrupt", state_dir=state_dir)   # fail closed for one hour, heal
        times, kept = None, [now] * limit
    else:   # clamp future times (the clock went back) to now: they count one hour, no longer
        kept = [min(t, now) for t in times if t > now - WINDOW_S]
    if kept != times:
        _save_times(state_dir, kept)
    return kept

def _schedule(action, command_id, cfg, executor):
    """Check that the action can run, record it, and return the deferred execution."""
    dry_argv, argv = DISPATCH[action]
    lock = _try_lock(cfg.state_dir)
    if lock is None:
        raise P.ProtocolError("busy", "another power action is in progress", command_id)
    try:
        now = time.time()
        times = _load_times(cfg.state_dir, now, cfg.limit)
        if len(times) >= cfg.limit:
            raise P.ProtocolError("rate_limited", "%d power actions in the last hour, limit %d"
                                  % (len(times), cfg.limit), command_id)
        try:
            status = executor.run(dry_argv, {}, DRY_RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise P.ProtocolError("exec_timeout", "pre-flight check took over %ss"
                                  % DRY_RUN_TIMEOUT_S, command_id) from None
        except OSError as exc:
            raise P.ProtocolError("exec_failed", "pre-flight: " + type(exc).__name__,
                                  command_id) from None
        if status != 0:
            raise P.ProtocolError("exec_failed", "pre-flight check exited with status %d"
                                  % status, command_id)
        _save_times(cfg.state_dir, times + [now])   # OSError -> internal_error, not scheduled
    except BaseException:
        os.close(lock)
        raise

    def run_later(cancel=False):
        # The lock stays held through grace and execution: requests meanwhile get `busy`.
        rec = dict(event="exec", action=action, command_id=command_id, argv=list(argv))
        start = time.monotonic()
        try:
            if cancel:   # the client was not told "scheduled": never act behind its back
                rec["outcome"] = "cancelled: answer not delivered"
                return
            time.sleep(cfg.grace)
            status = executor.run(argv, {}, EXEC_TIMEOUT_S)
            rec["outcome"] = "ok" if status == 0 else "exit status %d" % status
        except (subprocess.TimeoutExpired, OSError) as exc:
            rec["outcome"] = "exec_failed: " + type(exc).__name__
        finally:
            os.close(lock)
            rec["duration_ms"] = round((time.monotonic() - start) * 1000, 1)
            audit(**rec)
    return run_later

def handle(conn, cfg, executor):
    """Answer one connection exactly once; return the deferred action or None. Never raises."""
    start, pending = time.monotonic(), None
    rec = dict(event="request", action=None, command_id=None, mock=executor.mock)
    try:
        # The kernel's record of the peer at connect(): not forgeable by the peer.
        # Primary gid only: supplementary groups are not checked (docs/security.md).
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        rec["peer_pid"], rec["peer_uid"], rec["peer_gid"] = _, uid, gid = struct.unpack("3i", creds)
        if not (uid == 0 or uid in cfg.users or gid in cfg.groups):
            raise P.ProtocolError("peer_not_allowed", "uid %d gid %d not allowed" % (uid, gid))
        try:
            data = P.read_frame(conn, start + cfg.read_timeout)
        except (socket.timeout, ConnectionError):
            raise P.ProtocolError("bad_request", "no complete request before the deadline")
        rec["action"], rec["command_id"] = P.decode_request(data)
        pending = _schedule(rec["action"], rec["command_id"], cfg, executor)
        reply, rec["outcome"] = P.encode_response(True, rec["command_id"], executor.mock), "ok"
    except Exception as exc:   # a ProtocolError, or anything else: fail closed, keep serving
        err = exc if isinstance(exc, P.ProtocolError) else P.ProtocolError(
            "internal_error", type(exc).__name__)
        rec["command_id"] = rec["command_id"] or err.command_id
        rec["outcome"] = err.code
        reply = P.encode_response(False, rec["command_id"], executor.mock, err.code, err.message)
    try:
        conn.settimeout(cfg.read_timeout)
        conn.sendall(reply)
    except OSError:
        rec["answer_delivered"] = False
        if pending:
            pending(cancel=True)
            pending = None
    finally:
        try:   # EOF now, not at close(): with Accept=yes systemd holds another copy of
            conn.shutdown(socket.SHUT_RDWR)   # this fd until the instance exits
        except OSError:
            pass
        conn.close()
    rec["duration_ms"] = round((time.monotonic() - start) * 1000, 1)
    audit(**rec)
    return pending

def _activated_socket():
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if os.environ.get("LISTEN_FDS") != "1":
        raise ConfigError("LISTEN_FDS: exactly one socket expected")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ConfigError("LISTEN_FDS: fd 3 is not a Unix stream socket")
    return sock

def _bind(cfg):
    path, directory = cfg.socket, os.path.dirname(cfg.socket)
    try:
        st = os.lstat(directory)
    except OSError:
        raise ConfigError("HELPER_SOCKET: directory %s does not exist" % directory) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IWOTH:
        raise ConfigError("HELPER_SOCKET: %s must be a real directory not writable by others"
                          % directory)
    try:
        st = os.lstat(path)   # lstat: a symlink is seen as a symlink, never followed
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError("HELPER_SOCKET: %s exists and is not a socket; refusing" % path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                raise ConfigError("HELPER_SOCKET: %s is served by another process" % path)
        os.unlink(path)   # stale socket of a dead helper
    # Bind under a temporary name and rename into place once listening with its final owner:
    # a client never finds the path before the helper can serve it.
    tmp = "%s.%d.tmp" % (path, os.getpid())
    if _inode(tmp) is not None:   # leftover of a crashed helper that had the same pid
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)   # created 0660 from the start: no window with a wider mode
    try:
        sock.bind(tmp)
    finally:
        os.umask(old)
    if os.geteuid() == 0 and cfg.groups:
        os.chown(tmp, 0, cfg.groups[0], follow_symlinks=False)
    sock.listen(16)
    os.rename(tmp, path)
    cfg.socket_ino = _inode(path)
    return sock

def _inode(path):
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None

def _worker(conn, cfg, executor, slots):
    try:
        pending = handle(conn, cfg, executor)
    finally:
        slots.release()
    if pending:
        pending()

def serve(listener, cfg, executor):
    slots = threading.BoundedSemaphore(MAX_WORKERS)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as exc:   # e.g. EMFILE: back off instead of spinning
            audit(event="accept_failed", detail=type(exc).__name__)
            time.sleep(0.1)
            continue
        if not slots.acquire(blocking=False):
            conn.close()
            audit(event="overload_closed")
            continue
        threading.Thread(target=_worker, args=(conn, cfg, executor, slots), daemon=True).start()

def main():
    try:
        cfg = load_config(os.environ)
        _ensure_state_dir(cfg.state_dir)
        sock = _activated_socket() or _bind(cfg)
    except (ConfigError, OSError) as exc:
        text = str(exc) if isinstance(exc, ConfigError) else "startup: %s" % exc
        sys.stderr.write("infoscreen-helper: refusing to start: %s\n" % text.replace("\n", " "))
        sys.exit(2)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    executor = MockExecutor() if cfg.mock else SubprocessExecutor()
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    audit(event="start", pid=os.getpid(), mode=cfg.mode, mock=cfg.mock, listening=listening,
          socket=cfg.socket if cfg.socket_ino else "(activated)")
    try:
        if listening:
            serve(sock, cfg, executor)
        else:   # Accept=yes: fd 3 is the one connection of this instance
            pending = handle(sock, cfg, executor)
            if pending:
                pending()
    finally:   # unlink only the socket we made, if it is still there
        if cfg.socket_ino and _inode(cfg.socket) == cfg.socket_ino:
            os.unlink(cfg.socket)
