"""Fixtures of the helper tests: a real helper process on a real socket in a temp dir.
Every wait has a timeout; every process started here is stopped here."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helper.helper_support import Helper

@pytest.fixture
def sockdir():
    """A socket directory any uid can traverse (0755) but only root can write; short path."""
    path = tempfile.mkdtemp(prefix="ish-", dir="/tmp")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def helper_env(sockdir):
    return {
        "HELPER_SOCKET": str(sockdir / "helper.sock"),
        "HELPER_STATE_DIR": str(sockdir / "state"),
        "HELPER_ALLOWED_USERS": "",
        "HELPER_ALLOWED_GROUPS": str(os.getgid()),
        "HELPER_GRACE_S": "0",
        "HELPER_MAX_ACTIONS_PER_HOUR": "1000",
        "HELPER_READ_TIMEOUT_S": "1",
        "INFOSCREEN_ENV": "test",
        "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE": "1",
    }


@pytest.fixture
def start_helper(helper_env):
    """start_helper(**env_overrides) -> Helper, returned once it announced it serves."""
    started: list[Helper] = []

    def start(argv=None, pass_fds=(), wait=True, **overrides) -> Helper:
        env = {**helper_env, **{k: str(v) for k, v in overrides.items()}}
        helper = Helper(env, argv=argv, pass_fds=pass_fds)
        started.append(helper)
        if wait:
            helper.wait_audit(event="start")
        return helper

    yield start
    for helper in started:
        helper.stop()
