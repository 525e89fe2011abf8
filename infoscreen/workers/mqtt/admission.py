"""Admission of a received command: a pure decision over facts the interpreter gathered.

The first that holds decides (the order is the contract's: a known command is answered with
its latest status whatever else is wrong with the copy):

1. no readable ``command_id``: ignored (no ack is possible; logged and on ``logs/warn``)
2. the ``command_id`` is recorded: a repeat (never executed again)
3. a command given up by the intake: refused ``internal_error``
4. a defect found by validation (validation.py): refused with its code
5. a keyed device and no well-formed ``signature`` property: refused ``signature_invalid``
6. expired or too far ahead (clock.judge): refused with its code
7. another command executing: refused ``busy`` (its ack owed until the command's own expiry)
8. else admitted
"""

from __future__ import annotations

import msgspec

from ...wire.schema import ErrorCode


class Ignore(msgspec.Struct, frozen=True):
    reason: str


class Repeat(msgspec.Struct, frozen=True):
    pass


class Refuse(msgspec.Struct, frozen=True):
    code: str
    message: str
    own_deadline: bool = False  # keep the failed ack until the command's expiry when later


class Admit(msgspec.Struct, frozen=True):
    pass


Verdict = Ignore | Repeat | Refuse | Admit


def admit(
    *,
    command_id: str | None,
    known: bool,
    given_up: str | None = None,
    defect: tuple[str, str] | None = None,
    unsigned_on_keyed: bool = False,
    expiry: tuple[str | None, str | None] = (None, None),
    busy_with: tuple[str, str | None] | None = None,
) -> Verdict:
    """``defect``: validation's (code, message); ``expiry``: judge's (code, message), (None,
    None) when in time; ``busy_with``: (command_id, action) of the command executing."""
    if command_id is None:
        return Ignore("no readable command_id")
    if known:
        return Ignore("given up, but already recorded") if given_up is not None else Repeat()
    if given_up is not None:
        return Refuse(ErrorCode.INTERNAL_ERROR.value, f"given up: {given_up}")
    if defect is not None:
        return Refuse(defect[0] or ErrorCode.INVALID_PAYLOAD.value, defect[1])
    if unsigned_on_keyed:
        # Only the helper can tell a wrong signature; a missing one is refused here at once.
        return Refuse(ErrorCode.SIGNATURE_INVALID.value,
                      "this device has a command key and the command has no valid signature")
    code, message = expiry
    if code is not None:
        return Refuse(code, message or code)
    if busy_with is not None:
        other, action = busy_with
        return Refuse(ErrorCode.BUSY.value, f"command {other} ({action}) is being executed", own_deadline=True)
    return Admit()
