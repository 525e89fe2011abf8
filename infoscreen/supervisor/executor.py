"""Power actions on behalf of the MQTT worker: one at a time, through the helper.

The helper call blocks (connect, send, wait for the answer, bounded by the helper
timeout), so it runs on a short-lived thread; the outcome comes back to the main loop
through a pipe the loop polls, and is answered there. Outcomes are remembered (a
bounded cache) so a restarted MQTT worker can ask for one it missed (``ExecQuery``);
a request is never re-sent to the helper.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable

from ..ipc import messages
from ..loop import Loop
from ..wire.schema import ACTIONS, ErrorCode
from .helper_client import call_helper

log = logging.getLogger(__name__)

RESULT_CACHE = 256  # far more than the breaker lets through in a day


class Executor:
    def __init__(
        self,
        loop: Loop,
        helper_socket: str,
        timeout_s: float,
        reply: Callable[[messages.ExecResult], None],
        call: Callable[..., object] = call_helper,
    ) -> None:
        self.loop = loop
        self.helper_socket = helper_socket
        self.timeout_s = timeout_s
        self.reply = reply
        self.call = call
        self.results: collections.OrderedDict[str, messages.ExecResult] = collections.OrderedDict()
        self.in_flight: str | None = None
        self._done: collections.deque[messages.ExecResult] = collections.deque()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._r, self._on_done)

    def request(self, req: messages.ExecRequest) -> None:
        if req.command_id in self.results:  # already ran: answer, never run again
            self.reply(self.results[req.command_id])
            return
        if req.action not in ACTIONS:
            self._finish(self._failed(req, ErrorCode.HELPER_REJECTED, f"unsupported action {req.action!r}"))
            return
        if self.in_flight is not None:
            busy = self._failed(req, ErrorCode.BUSY, f"power command {self.in_flight} is being executed")
            self.reply(busy)  # not cached: the command itself was never attempted
            return
        self.in_flight = req.command_id
        threading.Thread(target=self._run, args=(req,), name=f"helper-{req.command_id[:8]}", daemon=True).start()

    def query(self, q: messages.ExecQuery) -> None:
        known = self.results.get(q.command_id)
        if known is not None:
            self.reply(known)
        elif q.command_id == self.in_flight:
            pass  # the answer is on its way; it will be sent when the helper replies
        else:
            self.reply(messages.ExecResult(command_id=q.command_id, action=None, known=False))

    def _run(self, req: messages.ExecRequest) -> None:
        try:
            out = self.call(self.helper_socket, req.action, req.command_id, self.timeout_s,
                            req.payload, req.signature)
            result = messages.ExecResult(
                command_id=req.command_id,
                action=req.action,
                known=True,
                ok=bool(out.ok),
                mock=bool(out.mock),
                error_code=out.error_code,
                error_message=out.error_message,
            )
        except Exception as exc:  # noqa: BLE001 - a client bug must still give an answer
            result = self._failed(req, ErrorCode.HELPER_UNAVAILABLE, f"helper client error: {exc!r}"[:300])
        self._done.append(result)
        try:
            os.write(self._w, b"!")
        except BlockingIOError:
            pass  # the loop has a wake-up pending already

    def _on_done(self) -> None:
        try:
            os.read(self._r, 4096)
        except BlockingIOError:
            pass
        while self._done:
            self._finish(self._done.popleft())

    def _finish(self, result: messages.ExecResult) -> None:
        if self.in_flight == result.command_id:
            self.in_flight = None
        self.results[result.command_id] = result
        while len(self.results) > RESULT_CACHE:
            self.results.popitem(last=False)
        level = logging.INFO if result.ok else logging.WARNING
        log.log(level, "power action %s for command %s: %s%s", result.action, result.command_id,
                "ok" if result.ok else result.error_code, " (mock)" if result.mock else "")
        self.reply(result)

    @staticmethod
    def _failed(req: messages.ExecRequest, code: ErrorCode, message: str) -> messages.ExecResult:
        return messages.ExecResult(
            command_id=req.command_id, action=req.action, known=True, ok=False,
            error_code=code.value, error_message=message,
        )
