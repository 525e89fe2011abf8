"""Health probes against real processes: found by name or pidfile, states, failures reported."""

from __future__ import annotations

import signal
import subprocess

import pytest

from infoscreen.workers.health.probes import DisplayProbe, HostProbe, collect


@pytest.fixture
def display():
    # A stand-in display process: its argv[0] is the name the probe looks for.
    p = subprocess.Popen(["bash", "-c", "exec -a display_manager sleep 60"])
    yield p
    p.kill()
    p.wait(5)


def test_display_found_by_name_and_states(display):
    from tests.support.waiting import wait_until

    probe = DisplayProbe("display_manager")
    st = wait_until(lambda: (s := probe.probe()).pid == display.pid and s, 5)
    assert st.status == "running" and st.process == "display_manager"
    display.send_signal(signal.SIGSTOP)
    assert wait_until(lambda: probe.probe().status == "stopped", 5)
    display.send_signal(signal.SIGCONT)
    display.kill()
    display.wait(5)
    st = probe.probe()
    assert st.status == "not_running" and st.pid is None


def test_display_by_pidfile(display, tmp_path):
    pidfile = tmp_path / "display.pid"
    probe = DisplayProbe("whatever", str(pidfile))
    assert probe.probe().status == "not_running"  # no pidfile yet
    pidfile.write_text(f"{display.pid}\n")
    assert probe.probe().pid == display.pid
    pidfile.write_text("garbage")
    assert probe.probe().status == "not_running"


def test_failing_probes_are_reported_not_raised(tmp_path):
    host = HostProbe(str(tmp_path / "missing-dir"), str(tmp_path / "no-boot-id"))
    report = collect(DisplayProbe("no-such-display-process"), host)
    assert report.actual_state.status == "not_running"
    assert any(e.startswith("disk:") for e in report.probe_errors)
    assert any(e.startswith("boot_id:") for e in report.probe_errors)
    assert report.host.disk_percent is None and report.host.boot_id is None
    assert report.host.memory_percent is not None and report.host.uptime_s > 0


def test_host_facts(tmp_path):
    boot = tmp_path / "boot_id"
    boot.write_text("0f0e0d0c-0000-4000-8000-000000000001\n")
    report = collect(DisplayProbe("x"), HostProbe(str(tmp_path), str(boot)))
    assert report.host.boot_id == "0f0e0d0c-0000-4000-8000-000000000001"
    assert 0 <= report.host.disk_percent <= 100 and report.probe_errors == []
