"""The supervisor's side of the privilege boundary against the real helper (mock backend):
outcomes come back to the loop, one request at a time, remembered for a restarted worker."""

from __future__ import annotations

from tests.support.waiting import wait_until

import signal
import uuid

import pytest

from infoscreen.ipc import messages
from infoscreen.loop import Loop
from infoscreen.supervisor.executor import Executor
from tests.support.tree import Helper


@pytest.fixture
def helper(tmp_path):
    h = Helper(tmp_path)
    yield h
    h.stop()


def run_until(loop: Loop, got: list, n: int, timeout: float = 10.0) -> None:
    deadline = loop.time() + timeout
    while len(got) < n:
        assert loop.time() < deadline, f"only {len(got)} results: {got}"
        loop.run_once(max_wait_s=deadline - loop.time())


def make(helper: Helper, timeout_s: float = 2.0) -> tuple[Loop, Executor, list]:
    loop = Loop()
    got: list[messages.ExecResult] = []
    ex = Executor(loop, str(helper.socket), timeout_s, got.append)
    return loop, ex, got


def req(action: str = "reboot_host") -> messages.ExecRequest:
    from tests.helper.helper_support import command_payload
    cid = str(uuid.uuid4())
    return messages.ExecRequest(command_id=cid, action=action, payload=command_payload(action, cid))


def test_request_reaches_the_helper_and_the_outcome_comes_back(helper):
    helper.start()
    loop, ex, got = make(helper)
    r = req()
    ex.request(r)
    run_until(loop, got, 1)
    assert got[0].ok and got[0].mock and got[0].known and got[0].command_id == r.command_id
    assert r.command_id in helper.log_text()
    # Asked again (a restarted worker), it is answered from memory and never re-executed.
    ex.query(messages.ExecQuery(command_id=r.command_id))
    ex.request(r)
    assert [g.ok for g in got] == [True, True, True]
    def executions():
        return [l for l in helper.log_text().splitlines() if r.command_id in l and '"event": "exec"' in l]
    wait_until(lambda: executions(), 5, what="exec audit line")   # written after the grace period
    assert len(executions()) == 1
    ex.query(messages.ExecQuery(command_id="never-seen"))
    assert got[-1].known is False


def test_one_power_action_at_a_time(helper):
    helper.env["HELPER_GRACE_S"] = "0"
    helper.start()
    loop, ex, got = make(helper)
    first, second = req(), req("shutdown_host")
    ex.request(first)
    ex.request(second)  # while the first is in flight
    assert got and got[0].command_id == second.command_id and got[0].error_code == "busy"
    run_until(loop, got, 2)
    assert got[1].command_id == first.command_id and got[1].ok


def test_helper_stopped_is_helper_unavailable(helper):
    loop, ex, got = make(helper)  # never started: no socket
    ex.request(req())
    run_until(loop, got, 1)
    assert got[0].error_code == "helper_unavailable" and not got[0].ok


def test_helper_stalled_is_helper_timeout(helper):
    helper.start()
    helper.proc.send_signal(signal.SIGSTOP)
    try:
        loop, ex, got = make(helper, timeout_s=0.5)
        t0 = loop.time()
        ex.request(req())
        run_until(loop, got, 1)
        assert got[0].error_code == "helper_timeout"
        assert loop.time() - t0 < 1.5
    finally:
        helper.proc.send_signal(signal.SIGCONT)


def test_helper_refusal_is_helper_rejected(helper):
    helper.env["HELPER_MAX_ACTIONS_PER_HOUR"] = "1"
    helper.start()
    loop, ex, got = make(helper)
    ex.request(req())
    run_until(loop, got, 1)
    ex.request(req())
    run_until(loop, got, 2)
    assert got[0].ok
    assert got[1].error_code == "helper_rejected" and "rate_limited" in (got[1].error_message or "")
