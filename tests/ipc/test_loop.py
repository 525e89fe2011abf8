"""The event loop: one deadline, fd/socket readers, signals as callbacks, raising callbacks contained."""

from __future__ import annotations

import os
import signal
import socket

from infoscreen.loop import Loop


def test_timers_fire_in_order_and_cancel():
    loop = Loop()
    got = []
    now = loop.time()
    loop.call_at(now + 0.02, lambda: got.append(2))
    loop.call_at(now + 0.01, lambda: got.append(1))
    t = loop.call_at(now + 0.015, lambda: got.append("cancelled"))
    t.cancel()
    loop.call_at(now + 0.03, loop.stop)
    loop.run_forever()
    assert got == [1, 2]


def test_a_raising_callback_is_logged_and_the_loop_goes_on(caplog):
    loop = Loop()
    got = []
    loop.call_later(0, lambda: 1 / 0)
    loop.call_later(0.01, lambda: (got.append("after"), loop.stop()))
    loop.run_forever()
    assert got == ["after"]
    assert "ZeroDivisionError" in caplog.text


def test_plain_socket_objects_and_fds_as_readers():
    loop = Loop()
    a, b = socket.socketpair()
    r, w = os.pipe()
    got = []
    loop.add_reader(a, lambda: got.append(a.recv(10)))
    loop.add_reader(r, lambda: got.append(os.read(r, 10)))
    b.send(b"sock")
    os.write(w, b"pipe")
    loop.run_once(1.0)
    assert sorted(got) == [b"pipe", b"sock"]
    loop.remove_reader(a)
    b.send(b"again")
    loop.run_once(0.05)
    assert len(got) == 2
    for f in (a, b):
        f.close()
    os.close(r)
    os.close(w)


def test_signals_become_callbacks():
    loop = Loop()
    got = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: (got.append("usr1"), loop.stop()))
    loop.call_later(0, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    loop.call_later(5, loop.stop)  # a bound, should the signal never arrive
    loop.run_forever()
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    assert got == ["usr1"]
