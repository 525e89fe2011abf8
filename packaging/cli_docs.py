"""Man pages and bash completion, generated from the programs' own argument parsers.

    python packaging/cli_docs.py man DIR          one PROGRAM.SECTION per program
    python packaging/cli_docs.py completion DIR   one bash completion file per program

Generated, never written by hand, so a flag added to a parser is in its man page and its
completion in the next build (scripts/build-deb calls this; tests/packaging checks both).
The root helper has no parser (its settings are its environment, and it takes only
--version): its page is described here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infoscreen import __version__  # noqa: E402


@dataclass
class Program:
    name: str
    section: int
    summary: str
    parser: argparse.ArgumentParser | None
    extra: list[tuple[str, str]] = field(default_factory=list)  # (heading, text)


def programs() -> list[Program]:
    from infoscreen.ctl.cli import build_parser as ctl
    from infoscreen.notify_failure.main import build_parser as notify
    from infoscreen.supervisor.main import build_parser as simclient

    files = ("/etc/infoscreen/infoscreen.env: the client's configuration (root 0600, read by systemd).\n"
             "/var/lib/infoscreen: identity, command store, outbox.")
    return [
        Program("infoscreen-simclient", 8, "the infoscreen client's supervisor", simclient(),
                [("FILES", files), ("SEE ALSO", "infoscreen-configure(8), infoscreenctl(1), infoscreen-helper(8)")]),
        Program("infoscreen-notify-failure", 8, "publish the retained service_failed alert of a failed unit", notify(),
                [("SEE ALSO", "infoscreen-simclient(8)")]),
        Program("infoscreenctl", 1, "send commands to infoscreens, watch them, clear alerts, provision the broker",
                ctl(), [("SEE ALSO", "infoscreen-simclient(8)")]),
        Program("infoscreen-configure", 8, "configure this screen's client, check it, enable and start it",
                None, [("SYNOPSIS", _script_usage()), ("DESCRIPTION", _script_help()),
                       ("SEE ALSO", "infoscreen-simclient(8), infoscreenctl(1)")]),
        Program("infoscreen-helper", 8, "the root helper that reboots or powers off the screen", None, [
            ("SYNOPSIS", "infoscreen-helper [--version]"),
            ("DESCRIPTION",
             "Started by systemd for each connection on its socket (infoscreen-helper.socket), as root. It "
             "executes one of two fixed actions, reboot or power-off, for a peer of the allowed users or groups, "
             "only for a command signed with the device's command key, each command once, within a reboot-loop "
             "breaker of a few actions per hour. It takes no arguments but --version: its settings are its "
             "environment, from /etc/infoscreen/helper.env, never the client's file."),
            ("FILES", "/etc/infoscreen/helper.env: the helper's settings (root 0600).\n"
                      "/etc/infoscreen/command.key: the device's command key (root 0600).\n"
                      "/var/lib/infoscreen-helper: the breaker and the replay store."),
            ("SEE ALSO", "infoscreen-simclient(8)"),
        ]),
    ]


CONFIGURE = Path(__file__).resolve().parents[1] / "scripts" / "configure-device"


def _script_header() -> list[str]:
    lines = []
    for line in CONFIGURE.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return lines


def _script_usage() -> str:
    return next(x.strip() for x in _script_header() if x.strip().startswith("infoscreen-configure"))


def _script_help() -> str:
    """The script's own header after its synopsis: what it does, its options, its exit status."""
    lines = _script_header()
    start = next(i for i, x in enumerate(lines) if x.strip().startswith("infoscreen-configure")) + 1
    return "\n".join(lines[start:]).strip("\n")


# -- man pages ---------------------------------------------------------------------------------
def roff(text: str) -> str:
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        out.append("\\&" + line if line[:1] in (".", "'") else line)
    return "\n".join(out)


def _option_lines(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for a in parser._actions:  # noqa: SLF001 - argparse has no public walk of its actions
        if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:  # noqa: SLF001
            continue
        if a.option_strings:
            meta = "" if a.nargs == 0 else " " + (a.metavar or a.dest.upper())
            head = ", ".join(f"\\fB{roff(o)}\\fR{roff(meta)}" for o in a.option_strings)
        else:
            head = f"\\fI{roff(a.metavar or a.dest)}\\fR"
        lines += [".TP", head, roff((a.help or "").replace("%(default)s", str(a.default)))]
    return lines


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(path, parser) for every subcommand, depth first."""
    for a in parser._actions:  # noqa: SLF001
        if isinstance(a, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in a.choices.items():
                yield prefix + (name,), sub
                yield from subcommands(sub, prefix + (name,))


def man_page(p: Program) -> str:
    out = [f'.TH {p.name.upper()} {p.section} "" "infoscreen-client {__version__}"',
           ".SH NAME", f"{roff(p.name)} \\- {roff(p.summary)}"]
    extra = dict(p.extra)
    if p.parser is not None:
        usage = p.parser.format_usage().removeprefix("usage: ").strip()
        out += [".SH SYNOPSIS", ".nf", roff(usage), ".fi", ".SH DESCRIPTION", roff(p.parser.description or ""),
                ".SH OPTIONS", *_option_lines(p.parser)]
        subs = list(subcommands(p.parser))
        if subs:
            out.append(".SH COMMANDS")
            for path, sub in subs:
                out += [".SS " + roff(" ".join(path)), ".nf", roff(sub.format_usage().removeprefix("usage: ").strip()),
                        ".fi", roff(sub.description or ""), *_option_lines(sub)]
        if p.parser.epilog:
            out += [".SH NOTES", roff(p.parser.epilog)]
    for heading in ("SYNOPSIS", "DESCRIPTION"):
        if heading in extra:
            text = extra.pop(heading)
            laid_out = any(line.startswith("  ") for line in text.splitlines())  # a script's header: keep it
            out += [f".SH {heading}", *([".nf", roff(text), ".fi"] if laid_out else [roff(text)])]
    for heading, text in extra.items():
        out += [f".SH {heading}"] + [x for line in text.splitlines() for x in (roff(line), ".br")][:-1]
    return "\n".join(out) + "\n"


# -- bash completion ---------------------------------------------------------------------------
def _words(parser: argparse.ArgumentParser) -> list[str]:
    words = [o for a in parser._actions for o in a.option_strings]  # noqa: SLF001
    for a in parser._actions:  # noqa: SLF001
        if isinstance(a, argparse._SubParsersAction):  # noqa: SLF001
            words += list(a.choices)
        elif not a.option_strings and a.choices:
            words += [str(c) for c in a.choices]
    return words


def completion(p: Program) -> str:
    """A bash function: the words after the subcommands typed so far (options of that level,
    its subcommands, its positional choices)."""
    assert p.parser is not None
    table = {"": _words(p.parser)}
    table.update({" ".join(path): _words(sub) for path, sub in subcommands(p.parser)})
    fn = "_" + p.name.replace("-", "_")
    cases = "\n".join(f'    "{k}") words="{" ".join(v)}" ;;' for k, v in sorted(table.items()))
    return f"""# bash completion for {p.name}, generated from its argument parser (packaging/cli_docs.py)
{fn}() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} path="" i next words
  for ((i = 1; i < COMP_CWORD; i++)); do
    next="${{path:+$path }}${{COMP_WORDS[i]}}"
    case "$next" in
{chr(10).join(f'      "{k}") path="$next" ;;' for k in sorted(table) if k)}
    esac
  done
  case "$path" in
{cases}
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F {fn} {p.name}
"""


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("man", "completion"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for p in programs():
        if argv[0] == "man":
            (out / f"{p.name}.{p.section}").write_text(man_page(p))
        elif p.parser is not None:
            (out / p.name).write_text(completion(p))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
