"""The durable state of the MQTT worker: one SQLite file in the state dir.

WAL journal with ``synchronous=FULL``: a commit returns only once it is on disk, so the
order "record committed -> ExecRequest sent" and "ack row committed -> ack published"
holds across a SIGKILL and a power cut.

Tables:

* ``commands``: one row per command id ever answered (dedup, at-most-once), with its
  latest status and the data to judge its expiry without trusting the wall clock.
* ``outbox``: ack publications not yet acknowledged by the broker (one row per status and
  per ack topic), in commit order.
* ``kv``: small JSON values (broker_connection state, group id, power evidence).
* ``redeliveries``: how often the broker resent a message (by digest) whose handling may have
  killed the worker, so that a poison message is given up after a bounded number of tries.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .clock import Deadline

DB_NAME = "mqtt-worker.sqlite3"
# A bound on the records kept, whatever the clock says: a device gets a handful of commands a
# day, so only a flood (random command ids) reaches it, and then the oldest finished records go
# first. Checked every CAP_CHECK_EVERY inserts so the common path stays one small transaction.
MAX_RECORDS = 20_000
CAP_CHECK_EVERY = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands(
    key            TEXT PRIMARY KEY,
    command_id     TEXT NOT NULL,
    action         TEXT,
    status         TEXT NOT NULL,
    error_code     TEXT,
    error_message  TEXT,
    received_wall  REAL NOT NULL,
    expires_wall   REAL NOT NULL,
    deadline_mono  REAL NOT NULL,
    boot_id        TEXT,
    updated_mono   REAL NOT NULL,
    exec_boot_id   TEXT,
    exec_mono      REAL,
    exec_wall      REAL,
    purge_wall     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_status ON commands(status);
CREATE TABLE IF NOT EXISTS outbox(
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    key      TEXT NOT NULL,
    topic    TEXT NOT NULL,
    payload  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS kv(
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS redeliveries(
    digest     TEXT PRIMARY KEY,
    tries      INTEGER NOT NULL,
    first_wall REAL NOT NULL
);
"""


@dataclass
class Record:
    key: str
    command_id: str
    action: str | None
    status: str
    error_code: str | None
    error_message: str | None
    received_wall: float
    deadline: Deadline
    exec_boot_id: str | None = None
    exec_mono: float | None = None
    exec_wall: float | None = None
    purge_wall: float = 0.0


@dataclass
class OutRow:
    seq: int
    key: str
    topic: str
    payload: bytes


def _record(row: sqlite3.Row) -> Record:
    return Record(
        key=row["key"],
        command_id=row["command_id"],
        action=row["action"],
        status=row["status"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        received_wall=row["received_wall"],
        deadline=Deadline(row["expires_wall"], row["deadline_mono"], row["boot_id"], row["updated_mono"]),
        exec_boot_id=row["exec_boot_id"],
        exec_mono=row["exec_mono"],
        exec_wall=row["exec_wall"],
        purge_wall=row["purge_wall"],
    )


class Store:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        path = Path(state_dir) / DB_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=2000")
        with self.txn():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
        self._inserts = 0
        self.max_records = MAX_RECORDS

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def txn(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- commands --------------------------------------------------------------------
    def get(self, key: str) -> Record | None:
        row = self.db.execute("SELECT * FROM commands WHERE key=?", (key,)).fetchone()
        return _record(row) if row is not None else None

    def by_status(self, status: str) -> list[Record]:
        return [_record(r) for r in self.db.execute("SELECT * FROM commands WHERE status=?", (status,))]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM commands").fetchone()[0]

    def _add_rows(self, db: sqlite3.Connection, key: str, acks: Sequence[tuple[str, bytes]]) -> list[OutRow]:
        out = []
        for topic, payload in acks:
            cur = db.execute("INSERT INTO outbox(key, topic, payload) VALUES (?,?,?)", (key, topic, payload))
            out.append(OutRow(cur.lastrowid, key, topic, payload))
        return out

    def insert(self, rec: Record, acks: Sequence[tuple[str, bytes]], kv: dict[str, Any] | None = None) -> list[OutRow]:
        """Create the record (or replace a purged/expired one) and its first ack rows, atomically."""
        d = rec.deadline
        with self.txn() as db:
            db.execute("DELETE FROM outbox WHERE key=?", (rec.key,))
            db.execute(
                "INSERT OR REPLACE INTO commands(key, command_id, action, status, error_code, error_message,"
                " received_wall, expires_wall, deadline_mono, boot_id, updated_mono, exec_boot_id, exec_mono,"
                " exec_wall, purge_wall) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.key, rec.command_id, rec.action, rec.status, rec.error_code, rec.error_message,
                 rec.received_wall, d.expires_wall, d.deadline_mono, d.boot_id, d.updated_mono,
                 rec.exec_boot_id, rec.exec_mono, rec.exec_wall, rec.purge_wall),
            )
            self._kv(db, kv)
            rows = self._add_rows(db, rec.key, acks)
        self._inserts += 1
        if self._inserts % CAP_CHECK_EVERY == 0:
            self.enforce_cap()
        return rows

    def enforce_cap(self) -> int:
        """Forget the oldest finished records beyond max_records (and their pending acks)."""
        with self.txn() as db:
            excess = self.count() - self.max_records
            if excess <= 0:
                return 0
            keys = [r[0] for r in db.execute(
                "SELECT key FROM commands WHERE status IN ('completed','failed') ORDER BY rowid LIMIT ?",
                (excess,))]
            for k in keys:
                db.execute("DELETE FROM outbox WHERE key=?", (k,))
                db.execute("DELETE FROM commands WHERE key=?", (k,))
        return len(keys)

    def update(self, rec: Record, acks: Sequence[tuple[str, bytes]], kv: dict[str, Any] | None = None) -> list[OutRow]:
        """Write the record's status (and execution fields) with its new ack rows, atomically."""
        d = rec.deadline
        with self.txn() as db:
            db.execute(
                "UPDATE commands SET status=?, error_code=?, error_message=?, updated_mono=?, deadline_mono=?,"
                " boot_id=?, exec_boot_id=?, exec_mono=?, exec_wall=? WHERE key=?",
                (rec.status, rec.error_code, rec.error_message, d.updated_mono, d.deadline_mono, d.boot_id,
                 rec.exec_boot_id, rec.exec_mono, rec.exec_wall, rec.key),
            )
            self._kv(db, kv)
            return self._add_rows(db, rec.key, acks)

    def add_acks(self, key: str, acks: Sequence[tuple[str, bytes]]) -> list[OutRow]:
        with self.txn() as db:
            return self._add_rows(db, key, acks)

    def purge(self, wall_now: float) -> int:
        """Forget records past their keep time (judged only with a synchronised clock)."""
        with self.txn() as db:
            keys = [r[0] for r in db.execute("SELECT key FROM commands WHERE purge_wall <= ?"
                                             " AND status IN ('completed','failed')", (wall_now,))]
            for k in keys:
                db.execute("DELETE FROM outbox WHERE key=?", (k,))
                db.execute("DELETE FROM commands WHERE key=?", (k,))
        return len(keys)

    # -- outbox ----------------------------------------------------------------------
    def outbox_rows(self) -> list[OutRow]:
        return [OutRow(r["seq"], r["key"], r["topic"], bytes(r["payload"]))
                for r in self.db.execute("SELECT seq, key, topic, payload FROM outbox ORDER BY seq")]

    def delete_rows(self, seqs: Sequence[int]) -> None:
        """Forget delivered outbox rows. Committed without an fsync of its own (synchronous=NORMAL
        for this one transaction, in WAL mode): it survives a crash of the process, and only a
        power cut before the next synced commit can undo it, which re-sends acks already
        delivered (a duplicate, never a loss). So no fsync stands in the way of the next command."""
        if not seqs:
            return
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self.txn() as db:
                db.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in seqs])
        finally:
            self.db.execute("PRAGMA synchronous=FULL")

    def deadlines(self, keys: Sequence[str]) -> dict[str, Deadline]:
        out = {}
        for k in keys:
            r = self.db.execute("SELECT expires_wall, deadline_mono, boot_id, updated_mono FROM commands WHERE key=?",
                                (k,)).fetchone()
            if r is not None:
                out[k] = Deadline(r[0], r[1], r[2], r[3])
        return out

    # -- redeliveries ------------------------------------------------------------------
    def note_redelivery(self, digest: str, wall: float) -> int:
        """One more delivery of a message the broker resent; returns the deliveries noted."""
        with self.txn() as db:
            db.execute("INSERT INTO redeliveries(digest, tries, first_wall) VALUES (?,1,?)"
                       " ON CONFLICT(digest) DO UPDATE SET tries = tries + 1", (digest, wall))
            return db.execute("SELECT tries FROM redeliveries WHERE digest=?", (digest,)).fetchone()[0]

    def forget_redelivery(self, digest: str) -> None:
        with self.txn() as db:
            db.execute("DELETE FROM redeliveries WHERE digest=?", (digest,))

    def purge_redeliveries(self, before_wall: float) -> None:
        with self.txn() as db:
            db.execute("DELETE FROM redeliveries WHERE first_wall < ?", (before_wall,))

    # -- kv --------------------------------------------------------------------------
    def kv_get(self, k: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT v FROM kv WHERE k=?", (k,)).fetchone()
        if row is None:
            return default
        try:
            return json.loads(row[0])
        except ValueError:
            return default

    def kv_set(self, k: str, v: Any) -> None:
        with self.txn() as db:
            self._kv(db, {k: v})

    @staticmethod
    def _kv(db: sqlite3.Connection, kv: dict[str, Any] | None) -> None:
        for k, v in (kv or {}).items():
            db.execute("INSERT OR REPLACE INTO kv(k, v) VALUES (?,?)", (k, json.dumps(v)))
