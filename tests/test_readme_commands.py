"""The README's short commands run as written: every line of a fenced block marked
```` ```sh runnable ```` is passed to the `cpm2` entry point (`cli.main`, what the console script
calls) from the repository root, and must exit 0 and print something."""
import contextlib
import io
import pathlib
import shlex

import pytest

from cpm2_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def runnable_commands(markdown: str) -> list[str]:
    """The commands of the ```sh runnable blocks: `\\`-continued lines joined, comments dropped."""
    commands, block = [], None
    for line in markdown.splitlines():
        stripped = line.strip()
        if block is None:
            if stripped.startswith("```") and stripped[3:].split() == ["sh", "runnable"]:
                block = []
            continue
        if stripped.startswith("```"):
            joined = "\n".join(block).replace("\\\n", " ")
            commands += [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]
            block = None
        else:
            block.append(line)
    return commands


COMMANDS = runnable_commands((REPO / "README.md").read_text(encoding="utf-8"))


def test_the_readme_marks_runnable_commands():
    assert len(COMMANDS) >= 3 and any("doctor" in c for c in COMMANDS)
    assert all(c.startswith("cpm2 ") for c in COMMANDS), "runnable blocks hold `cpm2 ...` commands only"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = shlex.split(command, comments=True)[1:]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = cli.main(argv)
        except SystemExit as done:  # --help exits through argparse
            status = done.code
    assert status in (0, None), f"`{command}` exited {status}"
    assert out.getvalue().strip(), f"`{command}` printed nothing"
