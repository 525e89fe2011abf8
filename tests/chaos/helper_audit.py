"""What the helper really did, read from its audit lines (`infoscreen-helper audit {json}`, one
write(2) each: a SIGKILL never leaves half a line), across any number of helper processes.

In mock mode the helper logs `mock_exec` for what it would run: the pre-flight (`--dry-run`) and,
after its grace, the action itself; the action is then recorded as an `exec` line naming the
command. The action's `mock_exec` line names no command, so it is attributed to the command that
holds the helper's lock at that moment: the last request answered `ok` (and delivered) of the
same helper process. That is exact because the lock is held from the pre-flight through the
action, so no other request can be answered `ok` in between. Outside mock mode (the e2e suite),
`exec` lines alone say what started.

    audit = HelperAudit.parse(text)
    audit.executions["<command id>"]   # how often the action ran (mock_exec of the action)
    audit.scheduled["<command id>"]    # how often a request was answered ok
    audit.unattributed                 # action executions with no holder: must stay 0
    audit.pending                      # a command still in the grace of a live helper
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

MARK = "infoscreen-helper audit "


def records(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        idx = line.find(MARK)
        if idx >= 0:
            out.append(json.loads(line[idx + len(MARK):]))
    return out


@dataclass
class HelperAudit:
    executions: Counter = field(default_factory=Counter)  # command id -> action executions
    scheduled: Counter = field(default_factory=Counter)  # command id -> requests answered ok
    exec_outcomes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    refusals: Counter = field(default_factory=Counter)  # helper error code -> requests
    starts: int = 0
    unattributed: int = 0
    state_corrupt: int = 0
    # Answered ok, then the helper died before the action (its `exec` line never came).
    died_in_grace: set[str] = field(default_factory=set)
    pending: str | None = None  # at the end of the text: answered ok, its action still to come

    @classmethod
    def parse(cls, text: str) -> "HelperAudit":
        audit = cls()
        holder: str | None = None  # the command whose answered request holds the lock
        for rec in records(text):
            event = rec.get("event")
            if event == "start":
                audit.starts += 1
                if holder is not None and not audit.executions[holder]:
                    audit.died_in_grace.add(holder)
                holder = None  # a new process: the old one's lock died with it
            elif event == "request":
                cid = (rec.get("command_id") or "").lower()
                if rec.get("outcome") == "ok" and rec.get("answer_delivered", True):
                    audit.scheduled[cid] += 1
                    holder = cid
                elif rec.get("outcome") != "ok":
                    audit.refusals[rec.get("outcome")] += 1
            elif event == "mock_exec" and "--dry-run" not in rec.get("argv", []):
                if holder is None:
                    audit.unattributed += 1
                else:
                    audit.executions[holder] += 1
            elif event == "exec":
                cid = (rec.get("command_id") or "").lower()
                audit.exec_outcomes[cid].append(rec.get("outcome", ""))
                if holder == cid:
                    holder = None
            elif event == "state_corrupt":
                audit.state_corrupt += 1
        audit.pending = holder
        return audit

    def started(self, cid: str) -> int:
        """`exec` lines of a command that got as far as running its action (real mode)."""
        return sum(1 for o in self.exec_outcomes.get(cid.lower(), [])
                   if o == "ok" or o.startswith(("exit status", "exec_failed"))
                   or (o.startswith("interrupted") and "during" in o))
