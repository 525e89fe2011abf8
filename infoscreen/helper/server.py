"""infoscreen-helper, the only root process of the client: it reboots or powers off the host
for allowed local peers through a closed dispatch table (as OpenSSH's monitor.c): nothing from a
request reaches an argv, an environment or a path. With a command key, only a command signed
with it acts, once. Standard library only. docs/security.md."""
import contextlib, datetime, errno, fcntl, grp, hashlib, hmac, json, os, pwd, re, signal, socket
import stat, struct, subprocess, sys, threading, time, types

from infoscreen import __version__
from infoscreen.helper import protocol as P

# Debian bookworm is merged-/usr (/bin -> usr/bin). A fixed absolute path: no PATH lookup.
SYSTEMCTL = "/usr/bin/systemctl"
DISPATCH = {   # closed table: action -> (pre-flight argv, real argv); tuples are immutable
    "reboot_host": ((SYSTEMCTL, "--dry-run", "reboot"), (SYSTEMCTL, "reboot")),
    "shutdown_host": ((SYSTEMCTL, "--dry-run", "poweroff"), (SYSTEMCTL, "poweroff")),
}
# The pre-flight answers in milliseconds; 3 s lets `exec_timeout` reach a client that waits 5 s.
DRY_RUN_TIMEOUT_S, EXEC_TIMEOUT_S, WINDOW_S = 3.0, 30.0, 3600.0
# The replay store keeps an id for the longest validity of a command; the clock's trust flag.
KEEP_S, TIMESYNC_FLAG = 7 * 86400, "/run/systemd/timesync/synchronized"
MAX_WORKERS = 16   # standalone mode: concurrent connections; more are closed at once
TRUE, FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_audit_lock = threading.Lock()

class ConfigError(Exception):
    """A start-up refusal: printed as one line naming the variable, exit status 2."""

def audit(**fields):
    # One JSON object per line on stderr (the journal): escaping means no forged lines. One
    # write(2) that never raises: a broken stderr must not cost an answered request its action.
    line = ("infoscreen-helper audit " + json.dumps(fields, sort_keys=True) + "\n").encode()
    with _audit_lock, contextlib.suppress(OSError):
        os.write(2, line)

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

def _flag(env, name):
    flag = env.get(name, "").strip().lower()
    if flag not in TRUE | FALSE:
        raise ConfigError("%s: expected a boolean" % name)
    return flag in TRUE

def load_key(path):
    """The device's command key, or None without a key file. Only we may read or write it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError("HELPER_COMMAND_KEY_FILE: cannot open %s: %s" % (path, exc.strerror))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError("HELPER_COMMAND_KEY_FILE: %s: not a file of ours, or group/other "
                              "may access it" % path)
        text = os.read(fd, 66)
    finally:
        os.close(fd)
    if not re.fullmatch(rb"[0-9a-f]{64}\n?", text):
        raise ConfigError("HELPER_COMMAND_KEY_FILE: %s is not 64 lower-case hex characters" % path)
    return bytes.fromhex(text[:64].decode())

def load_config(env):
    mode = env.get("INFOSCREEN_ENV", "").strip() or "production"
    if mode not in ("production", "development", "test"):
        raise ConfigError("INFOSCREEN_ENV: must be production, development or test")
    mock = _flag(env, "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE")
    if mock and mode == "production":   # loud, never silently ignored
        raise ConfigError("COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE: mock execution refused "
                          "under INFOSCREEN_ENV=production")
    cfg = types.SimpleNamespace(
        mode=mode, mock=mock, socket_ino=None,
        clock_always=env.get("INFOSCREEN_CLOCK_TRUST", "").strip() == "always",
        socket=env.get("HELPER_SOCKET", "").strip() or "/run/infoscreen-helper/helper.sock",
        state_dir=env.get("HELPER_STATE_DIR", "").strip() or "/var/lib/infoscreen-helper",
        command_key_file=env.get("HELPER_COMMAND_KEY_FILE", "").strip() or "/etc/infoscreen/command.key",
        users=_ids(env, "HELPER_ALLOWED_USERS", "", lambda n: pwd.getpwnam(n).pw_uid),
        groups=_ids(env, "HELPER_ALLOWED_GROUPS", "infoscreen", lambda n: grp.getgrnam(n).gr_gid),
        grace=_number(env, "HELPER_GRACE_S", 2.0, 0.0, 60.0),
        # A breaker, not a quota: at most 100 in production; test harnesses may go higher.
        limit=_number(env, "HELPER_MAX_ACTIONS_PER_HOUR", 3, 0,
                      100 if mode == "production" else 100000, int),
        read_timeout=_number(env, "HELPER_READ_TIMEOUT_S", 1.0, 0.05, 30.0))
    for name in ("socket", "state_dir", "command_key_file"):
        if not os.path.isabs(getattr(cfg, name)):
            raise ConfigError("HELPER_%s: must be an absolute path" % name.upper())
    cfg.key = load_key(cfg.command_key_file)
    if cfg.key is None and mode == "production" and not _flag(env, "HELPER_ALLOW_UNSIGNED"):
        raise ConfigError("HELPER_COMMAND_KEY_FILE: no command key at %s; production needs one (or "
                          "HELPER_ALLOW_UNSIGNED=1 for a fleet that does not sign)" % cfg.command_key_file)
    return cfg

def execute(argv, timeout, mock):
    """The one place anything runs: list argv, empty environment, no shell, no inherited fds,
    bounded. Mock mode (never in production) records what would run and runs nothing."""
    if mock:
        audit(event="mock_exec", argv=list(argv), env={}, shell=False, timeout_s=timeout)
        return 0
    return subprocess.run(list(argv), env={}, shell=False, close_fds=True, cwd="/",
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          timeout=timeout).returncode

def _try_lock(state_dir):
    # flock on the state directory, opened anew: exclusive across processes (Accept=yes
    # instances) and threads alike, dropped by the kernel if we die. Also the breaker's dir_fd.
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None

def _save_state(dfd, state):
    # write, fsync, rename, fsync the directory: a power cut leaves the old or the new file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open("actions.json.tmp", flags, 0o600, dir_fd=dfd), "w") as f:
        f.write(json.dumps(dict(state, v=2)))
        f.flush()
        os.fsync(f.fileno())
    os.rename("actions.json.tmp", "actions.json", src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)

def _number_ok(x):
    return type(x) in (int, float) and x == x and abs(x) < 1e12

def _load_state(dfd, limit):
    """Breaker times, high-water time mark, replay store, kept across reboots (docs/security.md).
    Now is the wall clock, but never below the mark plus the monotonic time since it was set."""
    mono = time.monotonic()
    try:
        fd = os.open("actions.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        with os.fdopen(fd, "rb") as f:   # 16 MiB: room for 100000 times and ids
            st = json.loads(f.read(1 << 24))
        ts, seen = st["ts"], st.get("seen", {})
        hw, hw_mono = st.get("hw", 0.0), st.get("hw_mono", mono)   # v1 files: no mark yet
        if not (all(map(_number_ok, ts + [hw, hw_mono] + list(seen.values())))
                and all(P.COMMAND_ID.fullmatch(k) for k in seen)):
            raise ValueError("bad state")
    except FileNotFoundError:
        ts, seen, hw, hw_mono = [], {}, 0.0, mono
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        audit(event="state_corrupt")   # fail closed for one hour, then heal
        ts, seen, hw, hw_mono = None, {}, 0.0, mono
    now = max(time.time(), hw + max(0.0, mono - hw_mono))
    # Clamp future times (an edited file, an old version's) to now: they count one hour, no more.
    state = dict(ts=[now] * limit if ts is None else [min(t, now) for t in ts if t > now - WINDOW_S],
                 seen={k: u for k, u in seen.items() if u > now}, hw=now, hw_mono=mono)
    if (state["ts"], state["seen"]) != (ts, seen):   # healed, clamped or pruned: keep it so
        _save_state(dfd, state)
    return state

def authenticate(cfg, action, command_id, payload, sig):
    """With a key: the signature over the payload bytes (constant time). Then, from the payload
    itself: this action, this command id, and (with a trusted clock) not expired. Returns the
    payload's expires_at. Raises ProtocolError; costs the breaker nothing."""
    if cfg.key is not None:
        want = "hmac-sha256=" + hmac.new(cfg.key, payload, hashlib.sha256).hexdigest()
        if not (sig and P.SIGNATURE.fullmatch(sig) and hmac.compare_digest(want, sig)):
            raise P.ProtocolError("signature_invalid", "missing or wrong signature", command_id)
    try:
        cmd = P.load_object(payload)
        cid, expires = cmd.get("command_id"), datetime.datetime.fromisoformat(cmd["expires_at"])
        if expires.tzinfo is None:
            raise ValueError("no time zone")
    except (P.ProtocolError, KeyError, TypeError, ValueError):
        raise P.ProtocolError("bad_request", "payload: no command with expires_at", command_id) from None
    if cmd.get("action") != action or not isinstance(cid, str) or cid.lower() != command_id.lower():
        raise P.ProtocolError("bad_request", "the payload names another action or id", command_id)
    expires, now = expires.timestamp(), time.time()
    trusted = cfg.clock_always or os.path.exists(TIMESYNC_FLAG)
    if trusted and not now < expires <= now + KEEP_S:
        raise P.ProtocolError("expired", "expires_at is past or more than 7 days ahead", command_id)
    return expires

def _schedule(action, command_id, expires, cfg):
    """Lock, replay store, breaker, pre-flight, record; return what runs after the answer."""
    dry_argv, argv = DISPATCH[action]
    lock = _try_lock(cfg.state_dir)
    if lock is None:
        raise P.ProtocolError("busy", "another power action is in progress", command_id)
    try:
        state = _load_state(lock, cfg.limit)
        times, key = state["ts"], command_id.lower()
        if key in state["seen"]:
            raise P.ProtocolError("replayed", "this command id already ran here", command_id)
        if len(times) >= cfg.limit:
            raise P.ProtocolError("rate_limited", "%d power actions in the last hour, limit %d"
                                  % (len(times), cfg.limit), command_id)
        try:
            status = execute(dry_argv, DRY_RUN_TIMEOUT_S, cfg.mock)
        except (subprocess.TimeoutExpired, OSError) as exc:
            code = "exec_timeout" if isinstance(exc, subprocess.TimeoutExpired) else "exec_failed"
            raise P.ProtocolError(code, "pre-flight check: %s" % exc, command_id) from None
        if status != 0:
            raise P.ProtocolError("exec_failed", "pre-flight exit status %d" % status, command_id)
        # The id stays used even if the answer is lost: never twice (fail closed).
        state["seen"][key] = max(state["hw"] + KEEP_S, expires)
        _save_state(lock, dict(state, ts=times + [state["hw"]]))   # OSError: internal_error
    except BaseException:
        os.close(lock)
        raise

    def run_later(cancel=False):
        # The lock stays held through grace and execution: requests meanwhile get `busy`.
        rec = dict(event="exec", action=action, command_id=command_id, argv=list(argv),
                   outcome="cancelled: answer not delivered" if cancel else "grace")
        start = time.monotonic()
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)   # blocked by handle()
            if cancel:   # never act behind the client's back, and un-count the action while
                _save_state(lock, state)   # the lock is still ours
                return
            time.sleep(cfg.grace)
            rec["outcome"] = "started"
            status = execute(argv, EXEC_TIMEOUT_S, cfg.mock)
            rec["outcome"] = "ok" if status == 0 else "exit status %d" % status
        except (subprocess.TimeoutExpired, OSError) as exc:
            rec["outcome"] = (rec["outcome"] + "; breaker state not rewritten: " if cancel
                              else "exec_failed: ") + type(exc).__name__
        except BaseException as exc:   # SIGTERM: expected while a reboot stops this unit
            rec["outcome"] = "interrupted: %s %s the action" % (
                getattr(exc, "signal", type(exc).__name__),
                "during" if rec["outcome"] == "started" else "before")
            raise
        finally:
            os.close(lock)
            rec["duration_ms"] = round((time.monotonic() - start) * 1000, 1)
            audit(**rec)
    return run_later

def handle(conn, cfg):
    """Answer one connection exactly once, then run what it scheduled. Raises only on signals."""
    start, pending = time.monotonic(), None
    rec = dict(event="request", action=None, command_id=None, mock=cfg.mock)
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
        rec["action"], rec["command_id"], payload, sig = P.decode_request(data)
        rec["signed"] = sig is not None
        expires = authenticate(cfg, rec["action"], rec["command_id"], payload, sig)
        pending = _schedule(rec["action"], rec["command_id"], expires, cfg)
        reply, rec["outcome"] = P.encode_response(True, rec["command_id"], cfg.mock), "ok"
    except Exception as exc:   # a ProtocolError, or anything else: fail closed, keep serving
        err = exc if isinstance(exc, P.ProtocolError) else P.ProtocolError(
            "internal_error", type(exc).__name__)
        rec["command_id"], rec["outcome"] = rec["command_id"] or err.command_id, err.code
        reply = P.encode_response(False, rec["command_id"], cfg.mock, err.code, err.message)
    try:
        conn.settimeout(cfg.read_timeout)
        conn.sendall(reply)
    except OSError:   # the client was not told "scheduled": the action is cancelled below
        rec["answer_delivered"] = False
    finally:
        with contextlib.suppress(OSError):   # EOF now, not at close(): with Accept=yes
            conn.shutdown(socket.SHUT_RDWR)   # systemd holds a copy of this fd until we exit
        conn.close()
    rec["duration_ms"] = round((time.monotonic() - start) * 1000, 1)
    if pending:   # a stop signal from here on arrives inside run_later, which audits it
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    audit(**rec)
    if pending:
        pending(cancel="answer_delivered" in rec)

def _activated_socket():
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if os.environ.get("LISTEN_FDS") != "1":
        raise ConfigError("LISTEN_FDS: exactly one socket expected")
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ConfigError("LISTEN_FDS: fd 3 is not a Unix stream socket")
    return sock

def _lstat(path):   # lstat: a symlink is seen as a symlink, never followed
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None

def _own_dir(name, path):
    # Whoever may write a directory may swap what is in it: only we may (as root: only root).
    st = _lstat(path)
    if (st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise ConfigError("%s: %s must be our directory, not group/other-writable" % (name, path))

def _bind(cfg):
    path = cfg.socket
    _own_dir("HELPER_SOCKET", os.path.dirname(path))
    st = _lstat(path)
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError("HELPER_SOCKET: %s exists and is not a socket; refusing" % path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)   # only "nobody listens" is stale; a full backlog is not
            if probe.connect_ex(path) != errno.ECONNREFUSED:
                raise ConfigError("HELPER_SOCKET: %s is served by another process" % path)
        os.unlink(path)   # stale socket of a dead helper
    # Bind under a temporary name and rename into place once listening with its final owner:
    # a client never finds the path before the helper can serve it.
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with contextlib.suppress(FileNotFoundError):   # a crashed helper's, with the same pid
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)   # created 0660 from the start: no window with a wider mode
    sock.bind(tmp)
    os.umask(old)
    if os.geteuid() == 0 and cfg.groups:
        os.chown(tmp, 0, cfg.groups[0], follow_symlinks=False)
    sock.listen(16)
    os.rename(tmp, path)
    cfg.socket_ino = os.lstat(path).st_ino
    return sock

def serve(listener, cfg):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as exc:   # e.g. EMFILE: back off instead of spinning
            audit(event="accept_failed", detail=type(exc).__name__)
            time.sleep(0.1)
            continue
        try:   # a thread per connection, bounded; only this thread starts them
            if threading.active_count() > MAX_WORKERS:
                raise RuntimeError("%d connections in progress" % MAX_WORKERS)
            threading.Thread(target=handle, args=(conn, cfg), daemon=True).start()
        except RuntimeError as exc:   # also "can't start new thread": close it, keep serving
            conn.close()
            audit(event="overload_closed", detail=str(exc))

def _on_signal(signum, _frame):
    # Exit 0 (systemd stops us so, as does a reboot); the name is for an interrupted action.
    exc = SystemExit(0)
    exc.signal = signal.Signals(signum).name
    raise exc

def main():
    if sys.argv[1:] == ["--version"]: return print("infoscreen-helper", __version__)  # settings: env only
    try:
        cfg = load_config(os.environ)
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        _own_dir("HELPER_STATE_DIR", cfg.state_dir)
        sock = _activated_socket() or _bind(cfg)
    except (ConfigError, OSError) as exc:
        text = str(exc) if isinstance(exc, ConfigError) else "startup: %s" % exc
        sys.stderr.write("infoscreen-helper: refusing to start: %s\n" % text.replace("\n", " "))
        sys.exit(2)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    audit(event="start", pid=os.getpid(), mode=cfg.mode, mock=cfg.mock, listening=listening,
          command_auth="signed" if cfg.key else "unsigned",
          socket=cfg.socket if cfg.socket_ino else "(activated)")
    try:
        if listening:
            serve(sock, cfg)
        else:   # Accept=yes: fd 3 is the one connection of this instance
            handle(sock, cfg)
    finally:   # unlink only the socket we made, if it is still there
        if cfg.socket_ino and getattr(_lstat(cfg.socket), "st_ino", None) == cfg.socket_ino:
            os.unlink(cfg.socket)
