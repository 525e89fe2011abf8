"""The programs' help, man pages and bash completion: generated from the argument parsers
(packaging/cli_docs.py), plain text, with mosquitto_pub/sub's short flags where they mean the
same (-p port, -u user, -i client id; -h stays help)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "packaging"))

import cli_docs  # noqa: E402


def all_parsers():
    for p in cli_docs.programs():
        if p.parser is not None:
            yield (p.name,), p.parser
            for path, sub in cli_docs.subcommands(p.parser):
                yield (p.name, *path), sub


def test_help_texts_are_plain_text():
    for path, parser in all_parsers():
        texts = [parser.description, parser.epilog] + [a.help for a in parser._actions] + \
                [g.title for g in parser._action_groups] + [g.description for g in parser._action_groups]
        for t in texts:
            assert not t or "`" not in t, (" ".join(path), t)


@pytest.mark.parametrize("command", ["send", "watch", "alerts"])
def test_mosquitto_short_flags(command):
    parser = dict(all_parsers())[("infoscreenctl", command)]
    flags = {o: a for a in parser._actions for o in a.option_strings}
    assert flags["-p"] is flags["--port"] and flags["-u"] is flags["--user"] and flags["-i"] is flags["--client-id"]
    assert flags["-h"].dest == "help"


def test_every_program_has_a_man_page(tmp_path):
    assert cli_docs.main(["man", str(tmp_path)]) == 0
    pages = {p.name for p in tmp_path.iterdir()}
    assert pages == {"infoscreenctl.1", "infoscreen-simclient.8", "infoscreen-notify-failure.8",
                     "infoscreen-helper.8", "infoscreen-configure.8"}
    ctl = (tmp_path / "infoscreenctl.1").read_text()
    for needle in (".SH NAME", ".SS send", ".SS broker provision", "\\-\\-expires\\-in"):
        assert needle in ctl
    assert "\\-\\-check\\-config" in (tmp_path / "infoscreen-simclient.8").read_text()
    assert "\\-\\-env\\-from" in (tmp_path / "infoscreen-configure.8").read_text()
    # man itself renders them without a warning, when it is installed.
    man = subprocess.run(["sh", "-c", "command -v man"], capture_output=True, text=True).stdout.strip()
    if man:
        r = subprocess.run([man, "--warnings", "-l", str(tmp_path / "infoscreenctl.1")], capture_output=True,
                           text=True, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0 and "send" in r.stdout and not r.stderr.strip(), r.stderr


def complete(tmp_path: Path, *words: str) -> list[str]:
    script = tmp_path / "infoscreenctl"
    line = " ".join(f"'{w}'" for w in words)
    r = subprocess.run(["bash", "-c", f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
                        "_infoscreenctl; printf '%s\\n' \"${COMPREPLY[@]}\""], capture_output=True, text=True, check=True)
    return r.stdout.split()


def test_bash_completion_follows_the_subcommands(tmp_path):
    assert cli_docs.main(["completion", str(tmp_path)]) == 0
    assert set(complete(tmp_path, "infoscreenctl", "")) >= {"send", "watch", "alerts", "broker", "--version"}
    assert complete(tmp_path, "infoscreenctl", "br") == ["broker"]
    assert complete(tmp_path, "infoscreenctl", "broker", "") == ["-h", "--help", "provision"] or \
        "provision" in complete(tmp_path, "infoscreenctl", "broker", "")
    assert "--expires-in" in complete(tmp_path, "infoscreenctl", "send", "--ex")
    # A value that looks like a subcommand is not one: the options stay send's.
    assert "--wait" in complete(tmp_path, "infoscreenctl", "send", "--device", "watch", "--wa")
    assert complete(tmp_path, "infoscreenctl", "send", "--device", "x", "re") == ["reboot"]
