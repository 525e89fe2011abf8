"""Log lines carry their syslog priority when stderr is the journal (JOURNAL_STREAM), so that
`journalctl -p warning` shows the client's warnings; plain lines elsewhere. Run in a child
whose stderr is a file, with JOURNAL_STREAM naming that file as systemd names the journal's
stream (the e2e suite checks `journalctl -p warning` itself)."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = ("from infoscreen import logsetup; log = logsetup.setup('infoscreen-x'); log.warning('w1'); log.info('i1');"
        "log.error('e1')\ntry:\n    1/0\nexcept ZeroDivisionError:\n    log.exception('boom')")


def run(tmp_path, journal: bool) -> list[str]:
    out = tmp_path / ("j" if journal else "p")
    with open(out, "w") as f:
        st = os.fstat(f.fileno())
        env = {"PATH": os.environ["PATH"]}
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        else:
            env["JOURNAL_STREAM"] = "1:2"  # another stream: not ours
        subprocess.run([sys.executable, "-c", CODE], stderr=f, env=env, check=True, timeout=30)
    return out.read_text().splitlines()


def test_every_line_carries_its_priority_in_the_journal(tmp_path):
    lines = run(tmp_path, journal=True)
    assert lines[0].startswith("<4>infoscreen-x[") and lines[0].endswith(": w1")
    assert lines[1].startswith("<6>") and lines[2].startswith("<3>")
    assert all(line.startswith("<3>") for line in lines[3:]) and "ZeroDivisionError" in lines[-1]


def test_plain_lines_elsewhere(tmp_path):
    lines = run(tmp_path, journal=False)
    assert lines[0].startswith("infoscreen-x[") and not any(line.startswith("<") for line in lines)


def test_the_workers_are_told_where_the_journal_is():
    from infoscreen.supervisor.process import PROCESS_VARS
    assert "JOURNAL_STREAM" in PROCESS_VARS
