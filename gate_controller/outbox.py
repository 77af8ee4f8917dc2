"""The gate agent's durable local store (SQLite, WAL): its captures, its last valid config, the
signed messages it has acted on (so that a replay is refused also after a restart) and what it
knew of the server's clock.

Every capture is written here, with its `seq`, before it is published, and stays "in the outbox"
until the server acks it. The row then stays for a day without its payload, as the journal of
what the gate did for that capture (who decided, whether the barrier opened), so that a late or
redelivered command never lifts the barrier twice. `seq` is SQLite's AUTOINCREMENT rowid: it
grows across restarts and is never reused, also after rows are pruned.

Calls are synchronous on the event loop on purpose: a gate handles a car every few seconds and
each call is one small indexed statement, so handing them to a thread would cost more than it
saves. `synchronous=FULL`: a capture the camera was told is stored survives a power cut.
"""

import hashlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from uuid import UUID

DecidedBy = Literal["server", "offline", "abandoned"]
UsedOnceKind = Literal["camera_signature", "remote_open"]
AckOutcome = Literal["acked", "absent", "other_payload"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    capture_id   TEXT NOT NULL UNIQUE,
    payload      BLOB,             -- the capture as it is (re)sent; NULL once acked
    created_at   REAL NOT NULL,
    -- 'abandoned': the agent stopped before the capture was decided
    decided_by   TEXT CHECK (decided_by IN ('server', 'offline', 'abandoned')),
    action       TEXT,
    opened_at    REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_send_at REAL,             -- NULL: not to be resent (awaiting its decision, or acked)
    acked_at     REAL
);
CREATE INDEX IF NOT EXISTS captures_unacked ON captures (seq) WHERE acked_at IS NULL;
CREATE INDEX IF NOT EXISTS captures_acked_at ON captures (acked_at) WHERE acked_at IS NOT NULL;
-- Events the server must hear of (a manual open), until the broker has acknowledged them.
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    payload BLOB NOT NULL
);
-- Signed messages the gate acted on, each to be acted on once (a camera report's signature, an
-- operator's remote open), until they expire: a replay after that fails its own time check.
-- On disk, so that a restart within that time does not make a replay new again.
CREATE TABLE IF NOT EXISTS used_once (
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS used_once_expires_at ON used_once (expires_at);
CREATE TABLE IF NOT EXISTS gate_config (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    payload BLOB NOT NULL
);
-- What the gate knew of the server's clock, for its next start (epoch seconds): `floor`, a
-- signed server time it verified, reckoned on to when it was written (a time the server has
-- passed, so a lower bound of its time ever after); `offset_s`, the server's time less the
-- gate's wall clock as last learnt.
CREATE TABLE IF NOT EXISTS server_clock (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    floor    REAL,
    offset_s REAL
);
"""


@dataclass(frozen=True, slots=True)
class ServerClock:
    floor: float | None
    offset_s: float | None


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    seq: int
    decided_by: DecidedBy | None
    action: str | None
    opened: bool
    acked: bool


class Outbox:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, capture_id: UUID, now: float, payload_for: Callable[[int], bytes]) -> int:
        """Stores a new capture, whose payload is built from the seq it gets; returns the seq."""
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO captures (capture_id, created_at) VALUES (?, ?)",
                (str(capture_id), now),
            )
            seq = cursor.lastrowid
            assert seq is not None
            self._db.execute(
                "UPDATE captures SET payload = ? WHERE seq = ?", (payload_for(seq), seq)
            )
        return seq

    def decide(
        self,
        capture_id: UUID,
        decided_by: DecidedBy,
        action: str,
        *,
        send_at: float,
        payload: bytes | None = None,
    ) -> None:
        """Records who decided what; an unacked capture is (re)sent from `send_at`, with
        `payload` instead of the stored one when given."""
        with self._db:
            self._db.execute(
                """UPDATE captures SET decided_by = ?, action = ?,
                       payload = CASE WHEN acked_at IS NULL THEN coalesce(?, payload) END,
                       next_send_at = CASE WHEN acked_at IS NULL THEN ? END
                   WHERE capture_id = ?""",
                (decided_by, action, payload, send_at, str(capture_id)),
            )

    def mark_opened(self, capture_id: UUID, now: float) -> bool:
        """True for the first opening of this capture's barrier, False when it already opened."""
        with self._db:
            cursor = self._db.execute(
                "UPDATE captures SET opened_at = ? WHERE capture_id = ? AND opened_at IS NULL",
                (now, str(capture_id)),
            )
        return cursor.rowcount == 1

    def mark_newest_opened(self, now: float) -> None:
        """The barrier was lifted by hand: the car first in the lane (the newest capture) went
        through it, so no later open of its capture lifts the barrier again."""
        with self._db:
            self._db.execute(
                """UPDATE captures SET opened_at = ?
                   WHERE seq = (SELECT max(seq) FROM captures) AND opened_at IS NULL""",
                (now,),
            )

    def ack(self, capture_id: UUID, now: float, payload_sha256: str | None) -> AckOutcome:
        """Drops the capture from the outbox when the ack answers the payload it holds (its
        SHA-256, hex): "acked"; "absent" when it is not in the outbox; "other_payload" when
        the ack answers another message sent under its id (the capture stays)."""
        with self._db:
            row = self._db.execute(
                "SELECT payload FROM captures WHERE capture_id = ? AND acked_at IS NULL",
                (str(capture_id),),
            ).fetchone()
            if row is None or row[0] is None:
                return "absent"
            if hashlib.sha256(row[0]).hexdigest() != payload_sha256:
                return "other_payload"
            self._db.execute(
                """UPDATE captures SET acked_at = ?, payload = NULL, next_send_at = NULL
                   WHERE capture_id = ?""",
                (now, str(capture_id)),
            )
        return "acked"

    def due(self, now: float, limit: int = 100) -> list[tuple[UUID, bytes]]:
        """Captures to (re)send now, in seq order."""
        rows = self._db.execute(
            """SELECT capture_id, payload FROM captures
               WHERE acked_at IS NULL AND next_send_at <= ? AND payload IS NOT NULL
               ORDER BY seq LIMIT ?""",
            (now, limit),
        ).fetchall()
        return [(UUID(capture_id), payload) for capture_id, payload in rows]

    def sent(self, capture_id: UUID, now: float, first_retry_s: float, max_retry_s: float) -> None:
        """Schedules the next resend, doubling the wait per attempt up to `max_retry_s`."""
        with self._db:
            self._db.execute(
                """UPDATE captures
                   SET next_send_at = ? + min(? * (1 << min(attempts, 16)), ?),
                       attempts = attempts + 1
                   WHERE capture_id = ? AND acked_at IS NULL""",
                (now, first_retry_s, max_retry_s, str(capture_id)),
            )

    def resend_all(self, now: float, *, backing_off_only: bool) -> int:
        """Makes decided, unacked captures due now: all of them (the link is back), or those
        already resent at least once (the server answers again)."""
        with self._db:
            cursor = self._db.execute(
                """UPDATE captures SET next_send_at = ?
                   WHERE acked_at IS NULL AND decided_by IS NOT NULL
                     AND (next_send_at IS NULL OR next_send_at > ?)
                     AND (attempts > 0 OR NOT ?)""",
                (now, now, backing_off_only),
            )
        return cursor.rowcount

    def abandon_undecided(self, now: float) -> int:
        """Captures a previous run stored but never decided: sent as they are, nothing done."""
        with self._db:
            cursor = self._db.execute(
                """UPDATE captures SET decided_by = 'abandoned', next_send_at = ?
                   WHERE decided_by IS NULL AND acked_at IS NULL""",
                (now,),
            )
        return cursor.rowcount

    def record(self, capture_id: UUID) -> CaptureRecord | None:
        row = self._db.execute(
            """SELECT seq, decided_by, action, opened_at IS NOT NULL, acked_at IS NOT NULL
               FROM captures WHERE capture_id = ?""",
            (str(capture_id),),
        ).fetchone()
        if row is None:
            return None
        return CaptureRecord(row[0], row[1], row[2], bool(row[3]), bool(row[4]))

    def latest_seq(self) -> int | None:
        seq: int | None = self._db.execute("SELECT max(seq) FROM captures").fetchone()[0]
        return seq

    def length(self) -> int:
        count: int = self._db.execute(
            "SELECT count(*) FROM captures WHERE acked_at IS NULL"
        ).fetchone()[0]
        return count

    def unacked(self) -> list[tuple[int, UUID]]:
        rows = self._db.execute(
            "SELECT seq, capture_id FROM captures WHERE acked_at IS NULL ORDER BY seq"
        ).fetchall()
        return [(seq, UUID(capture_id)) for seq, capture_id in rows]

    def prune(self, acked_before: float) -> int:
        with self._db:
            cursor = self._db.execute("DELETE FROM captures WHERE acked_at < ?", (acked_before,))
        return cursor.rowcount

    def use_once(self, kind: UsedOnceKind, key: str, expires_at: float, now: float) -> bool:
        """True the first time `key` is used before it expires, False for a replay; expired
        keys of its kind are forgotten (each kind's `now` is by the clock its keys are kept
        by)."""
        with self._db:
            self._db.execute("DELETE FROM used_once WHERE kind = ? AND expires_at < ?", (kind, now))
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO used_once (kind, key, expires_at) VALUES (?, ?, ?)",
                (kind, key, expires_at),
            )
        return cursor.rowcount == 1

    def save_config(self, payload: bytes) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO gate_config (id, payload) VALUES (1, ?)", (payload,)
            )

    def load_config(self) -> bytes | None:
        row = self._db.execute("SELECT payload FROM gate_config WHERE id = 1").fetchone()
        return bytes(row[0]) if row else None

    def save_clock_floor(self, floor: float) -> None:
        with self._db:
            self._db.execute(
                """INSERT INTO server_clock (id, floor) VALUES (1, ?)
                   ON CONFLICT (id) DO UPDATE SET floor = excluded.floor""",
                (floor,),
            )

    def save_clock_offset(self, offset_s: float) -> None:
        with self._db:
            self._db.execute(
                """INSERT INTO server_clock (id, offset_s) VALUES (1, ?)
                   ON CONFLICT (id) DO UPDATE SET offset_s = excluded.offset_s""",
                (offset_s,),
            )

    def load_server_clock(self) -> ServerClock | None:
        row = self._db.execute("SELECT floor, offset_s FROM server_clock WHERE id = 1").fetchone()
        return ServerClock(*row) if row else None

    def add_event(self, payload: bytes) -> None:
        with self._db:
            self._db.execute("INSERT INTO events (payload) VALUES (?)", (payload,))

    def pending_events(self, limit: int = 100) -> list[tuple[int, bytes]]:
        rows = self._db.execute(
            "SELECT id, payload FROM events ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [(event_id, bytes(payload)) for event_id, payload in rows]

    def event_sent(self, event_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM events WHERE id = ?", (event_id,))
