"""The documentation stays true.

* Every ```python block of docs/library.md runs, on its own, against the
  fixtures (``IMAGE``, ``VM_IMAGE``, ``AMBIGUOUS_IMAGE``) with a writable
  ``tmp_path``.
* docs/cli.md covers every command and option of the CLI, and its exit
  status table agrees with the ``exit_code`` of the exception classes.
* Every ``$ qcow2snap ...`` line in docs/cli.md's console examples runs in a
  directory holding the fixtures it names; a shown error line must be the
  real one, otherwise the command must succeed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pkgutil
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
from conftest import FIXTURES_BY_NAME, ROOT, fixture_path
from helpers import invoke

import qcow2snap.ops
from qcow2snap import errors
from qcow2snap.cli import cli
from qcow2snap.ops.extract import OutputExistsError

DOCS = ROOT / "docs"
LIBRARY_MD = DOCS / "library.md"
CLI_MD = DOCS / "cli.md"

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


def code_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(line number, source) of every fenced block of ``language``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2))
            for m in FENCE.finditer(text) if m.group(1) == language]


LIBRARY_BLOCKS = code_blocks(LIBRARY_MD, "python") if LIBRARY_MD.exists() else []


def test_library_md_has_examples() -> None:
    assert len(LIBRARY_BLOCKS) >= 10


@pytest.mark.parametrize(("line", "source"), LIBRARY_BLOCKS,
                         ids=[f"library.md:{line}" for line, _ in LIBRARY_BLOCKS])
def test_library_example_runs(fixture_dir: Path, tmp_path: Path, line: int,
                              source: str) -> None:
    # each block gets its own copies: an example must not be able to change
    # (or hold locks on) the session's shared fixtures
    images = tmp_path / "images"
    images.mkdir()
    names = {"IMAGE": "v3-basic", "VM_IMAGE": "savevm", "AMBIGUOUS_IMAGE": "ambiguous"}
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for variable, name in names.items():
        source_path = fixture_path(fixture_dir, name)
        copy = images / source_path.name
        shutil.copyfile(source_path, copy)
        namespace[variable] = os.fspath(copy)
    work = tmp_path / "work"
    work.mkdir()
    namespace["tmp_path"] = work
    code = compile(source, f"{LIBRARY_MD}:{line}", "exec")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, namespace)


# ---------------------------------------------------------------------------
# docs/cli.md
# ---------------------------------------------------------------------------

def commands(group: click.Group = cli, prefix: tuple[str, ...] = ()
             ) -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = []
    if group is cli:
        cli.load_all()  # the commands the group imports on first use too
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            out.append(((*prefix, name), command))
            out += commands(command, (*prefix, name))
        else:
            out.append(((*prefix, name), command))
    return out


def test_cli_md_documents_every_command_and_option() -> None:
    text = CLI_MD.read_text()
    for path, command in [((), cli), *commands()]:
        if path:
            assert re.search(rf"^#+ .*`qcow2snap {' '.join(path)}", text, re.MULTILINE), path
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts + param.secondary_opts:
                    if opt in ("-h", "--help"):
                        continue
                    assert f"`{opt}" in text or f"{opt}`" in text or f"/{opt}" in text, \
                        (path, opt)


def error_classes() -> list[type[errors.Qcow2Error]]:
    """Qcow2Error and every subclass defined in qcow2snap (ops modules
    imported first so that their own error classes are found)."""
    for module in pkgutil.iter_modules(qcow2snap.ops.__path__, "qcow2snap.ops."):
        importlib.import_module(module.name)
    found: list[type[errors.Qcow2Error]] = []
    todo: list[type[errors.Qcow2Error]] = [errors.Qcow2Error]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("qcow2snap") and cls not in found:
            found.append(cls)
            todo += cls.__subclasses__()
    return found


def test_cli_md_exit_codes_match_the_error_classes() -> None:
    text = CLI_MD.read_text()
    classes = error_classes()
    assert OutputExistsError in classes
    for cls in classes:
        rows = [line for line in text.splitlines()
                if line.startswith("|") and f"`{cls.__name__}`" in line]
        assert rows, f"{cls.__name__} missing from the exit status table"
        codes = {int(c) for row in rows for c in re.findall(r"^\|\s*(\d+)\s*\|", row)}
        assert codes == {cls.exit_code}, (cls.__name__, codes)


# Console examples: the fixtures they use, by file name
EXAMPLE_FIXTURES = ["v3-basic", "ambiguous", "savevm", "resized-shrink", "backing-chain"]


def console_blocks() -> list[tuple[int, list[tuple[str, list[str]]]]]:
    """Per console block: its line and (command, shown output lines)."""
    out = []
    for line, source in code_blocks(CLI_MD, "console") if CLI_MD.exists() else []:
        steps: list[tuple[str, list[str]]] = []
        for text in source.splitlines():
            if text.startswith("$ "):
                steps.append((text[2:], []))
            elif steps:
                steps[-1][1].append(text)
        if any(cmd.startswith("qcow2snap ") for cmd, _ in steps):
            out.append((line, steps))
    return out


CONSOLE_BLOCKS = console_blocks()


def test_cli_md_has_console_examples() -> None:
    assert len(CONSOLE_BLOCKS) >= 5


@pytest.mark.parametrize(("line", "steps"), CONSOLE_BLOCKS,
                         ids=[f"cli.md:{line}" for line, _ in CONSOLE_BLOCKS])
def test_cli_example_runs(fixture_dir: Path, tmp_path: Path, line: int,
                          steps: list[tuple[str, list[str]]],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in EXAMPLE_FIXTURES:
        entry = FIXTURES_BY_NAME[name]
        for file in [entry["file"], *entry["companions"]]:
            shutil.copyfile(fixture_dir / file[:-3], tmp_path / file[:-3])
    monkeypatch.chdir(tmp_path)
    for command, shown in steps:
        argv = shlex.split(command)
        if argv[0] != "qcow2snap":
            continue
        result = invoke(*argv[1:])
        shown_errors = [s for s in shown if s.startswith("qcow2snap: error: ")]
        if shown_errors:
            assert result.exit_code not in (0, 2), (command, result.stderr)
            actual = result.stderr.splitlines()
            assert actual[-1:] == shown_errors, command
            if "--debug" in argv:
                assert actual[0] == "Traceback (most recent call last):"
            else:
                assert len(actual) == 1, command
            continue
        assert result.exit_code == 0, (command, result.stderr)
        # the output lines shown in the guide appear as shown, except what
        # changes from machine to machine or when the fixtures are rebuilt
        actual = [DATE.sub("<date>", line) for line in result.stdout.splitlines()]
        for shown_line in shown:
            if VOLATILE.search(shown_line) or shown_line.strip() in ("", "..."):
                continue
            assert DATE.sub("<date>", shown_line) in actual, (command, shown_line)


DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
VOLATILE = re.compile(r"\"date|vm-clock|actual-size|^disk size:|bytes-written"
                      r"|/path/to/")
