"""The ``qcow2snap`` command line (top layer).

Each command parses its arguments, calls one library function and renders
the result with :mod:`qcow2snap.describe`.  Errors are funnelled through
:class:`_Group`: every :class:`~qcow2snap.errors.Qcow2Error` and ``OSError``
becomes one line on stderr and the exit status of its class (``--debug``
shows the traceback instead).

This module holds the group, the options commands share, and ``info`` and
``list``; the other commands are declared in :mod:`qcow2snap.commands`,
which the group imports when one of them is used (:data:`_LAZY_COMMANDS`;
start-up time: docs/performance.md, "Start-up, second pass").
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import click

from . import __version__, describe
from .crypto import DEFAULT_KDF_ITERATION_LIMIT
from .errors import ImageInUseWarning, Qcow2Error
from .image import Qcow2Image
from .image import open as open_image
from .lazy_group import LazyGroup
from .model import Snapshot

F = TypeVar("F", bound=Callable[..., Any])


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C does, so that every
    cleanup runs (a half-written output's temporary file is removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated(signum)

EXIT_USAGE = 2
EXIT_OS_ERROR = 1


def _print_json(obj: Any) -> None:
    """Print ``json.dumps(obj, indent=4, ensure_ascii=False)``."""
    _echo_parts(describe.json_parts(obj))


def _print_json_list(items: Iterable[Any]) -> None:
    """``_print_json(list(items))``, each item encoded as soon as it is made
    (a 65,536-snapshot listing need not hold 65,536 objects)."""
    _echo_parts(describe.json_list_parts(items))


def _echo_parts(parts: Iterable[str]) -> None:
    """``click.echo`` of the joined parts, written once all are made (as the
    whole text would be: an error on the way prints nothing), joined in
    pieces of ~64 KiB meanwhile."""
    pieces: list[str] = []
    batch: list[str] = []
    size = 0
    for part in parts:
        batch.append(part)
        size += len(part)
        if size >= 1 << 16:
            pieces.append("".join(batch))
            batch.clear()
            size = 0
    pieces.append("".join(batch))
    for piece in pieces[:-1]:
        click.echo(piece, nl=False)
    click.echo(pieces[-1])


def _one_line(message: str) -> str:
    """An error or warning as one terminal-safe line (messages may quote
    names from the image)."""
    return describe.escape_controls(" ".join(str(message).split("\n")))


def _echo_text(text: str) -> None:
    """Text output for people: names from the image may hold terminal
    control sequences, which are shown escaped (JSON output is exact)."""
    click.echo(describe.escape_controls(text))


class _Group(LazyGroup):
    """Maps library errors to one stderr line and a stable exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        with warnings.catch_warnings():
            warnings.simplefilter("always", ImageInUseWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except Qcow2Error as exc:
                if debug:
                    _print_traceback()
                click.echo(f"qcow2snap: error: {_one_line(str(exc))}", err=True)
                ctx.exit(exc.exit_code)
            except ValueError as exc:
                if debug:
                    _print_traceback()
                click.echo(f"qcow2snap: error: {_one_line(str(exc))}", err=True)
                ctx.exit(EXIT_USAGE)
            except BrokenPipeError:
                raise  # stdout's reader left: click ends quietly (exit 1)
            except OSError as exc:
                if debug:
                    _print_traceback()
                name = f": {exc.filename}" if exc.filename else ""
                click.echo(f"qcow2snap: error: {_one_line(f'{exc.strerror or exc}{name}')}",
                           err=True)
                ctx.exit(EXIT_OS_ERROR)
            except KeyboardInterrupt:
                click.echo("qcow2snap: interrupted", err=True)
                ctx.exit(130)
            except _Terminated as exc:
                click.echo(f"qcow2snap: terminated by {signal.Signals(exc.signum).name}",
                           err=True)
                ctx.exit(128 + exc.signum)


def _print_traceback() -> None:
    """--debug: the traceback of the exception being handled."""
    import traceback  # only --debug shows one (start-up: docs/performance.md)
    traceback.print_exc()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    click.echo(f"qcow2snap: warning: {_one_line(str(message))}", err=True)


#: the commands :mod:`qcow2snap.commands` declares, loaded when one is used,
#: with the first paragraph of each one's help for ``qcow2snap --help``
#: (tests/test_cli.py compares them with the commands)
_LAZY_COMMANDS = {name: ("qcow2snap.commands", short_help) for name, short_help in {
    "check": "Check IMAGE's metadata like `qemu-img check`, and repair it.",
    "compact": "Rewrite IMAGE without its free, leaked and punched space, keeping every "
               "internal snapshot (and its VM state) and the active layer.",
    "create": "Create a disk-only snapshot NAME in each IMAGE (like `qemu-img snapshot -c`).",
    "delete": "Delete SNAPSHOT from each IMAGE and reclaim its space.",
    "diff": "Show the guest ranges where the disks of A and B in IMAGE differ.",
    "export-chain": "Turn IMAGE's internal snapshots into an external backing chain in "
                    "DIRECTORY.",
    "extract": "Write the disk of SNAPSHOT in IMAGE to OUTPUT.",
    "hash": "Print digests of the disks and VM states of SNAPSHOTs in IMAGE.",
    "import-chain": "Turn TOP's external backing chain into one image with internal snapshots.",
    "map": "Show where the guest disk of SNAPSHOT in IMAGE lives, like `qemu-img map`.",
    "mount": "Mount every snapshot of IMAGE (a VM's disks: several IMAGEs) read-only.",
    "recover": "Find snapshots lost from IMAGE's snapshot table.",
    "rename": "Rename SNAPSHOT to NEW_NAME in each IMAGE (the ID stays).",
    "revert": "Revert each IMAGE's disk to SNAPSHOT (like `qemu-img snapshot -a`).",
    "serve": "Export the disk of SNAPSHOT in IMAGE read-only over NBD (nbdkit).",
    "trim": "Give IMAGE's free clusters back to the file system, in place.",
    "usage": "Show where the space of each IMAGE goes (read-only).",
    "vmstate": "Work with the VM state saved by `savevm` in a snapshot.",
}.items()}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             lazy_commands=_LAZY_COMMANDS)
@click.version_option(__version__, prog_name="qcow2snap")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect and edit internal snapshots of stopped qcow2 images.

    Reading commands never modify the image. SNAPSHOT arguments match a
    snapshot ID or name; use --by-id / --by-name when that is ambiguous.
    """
    if _tune_heap and ctx.invoked_subcommand not in _METADATA_ONLY_COMMANDS:
        from .copier import prefer_heap_reuse
        prefer_heap_reuse()  # this process is ours: tune the allocator for bulk copies


#: set by :func:`main` (the process is ours): commands that read data then
#: tune the allocator through :func:`~qcow2snap.copier.prefer_heap_reuse`
_tune_heap = False
#: commands that read metadata only: they make no bulk buffers, so they do
#: not load the copier (threads, mmap) and ctypes for it (start-up time)
_METADATA_ONLY_COMMANDS = frozenset({"info", "list", "check", "create", "delete", "revert",
                                     "rename", "map", "usage"})


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Apply a group of click options (listed in the order they show)."""
    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


ALLOW_DIR_ENVVAR = "QCOW2SNAP_ALLOW_DIR"
PASSPHRASE_ENVVAR = "QCOW2SNAP_PASSPHRASE"
_PASSPHRASE_KEY = "qcow2snap.passphrase"
#: the largest passphrase file read (QEMU's secrets are small too)
MAX_PASSPHRASE_FILE_BYTES = 1 << 20


def _passphrase_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--passphrase-file: its bytes, as they are (a trailing newline is part
    of the passphrase, as with QEMU's ``--object secret,file=``)."""
    if value is not None:
        with open(value, "rb") as f:
            data = f.read(MAX_PASSPHRASE_FILE_BYTES + 1)
        if len(data) > MAX_PASSPHRASE_FILE_BYTES:
            raise click.BadParameter(f"larger than {MAX_PASSPHRASE_FILE_BYTES} bytes",
                                     ctx=ctx, param=param)
        ctx.meta[_PASSPHRASE_KEY] = data


def _passphrase() -> bytes | None:
    """The passphrase of this command: --passphrase-file, else $QCOW2SNAP_PASSPHRASE."""
    ctx = click.get_current_context(silent=True)
    data = ctx.meta.get(_PASSPHRASE_KEY) if ctx is not None else None
    if data is None:
        data = os.environb.get(PASSPHRASE_ENVVAR.encode())
    return data


_KDF_LIMIT_KEY = "qcow2snap.kdf_iteration_limit"


def _kdf_limit_option(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    if value is not None:
        ctx.meta[_KDF_LIMIT_KEY] = value


def _kdf_iteration_limit() -> int:
    """--kdf-iteration-limit of this command, else the library's default."""
    ctx = click.get_current_context(silent=True)
    value = ctx.meta.get(_KDF_LIMIT_KEY) if ctx is not None else None
    return DEFAULT_KDF_ITERATION_LIMIT if value is None else int(value)

#: How a reading command finds the image's companion files.
image_options = _options(
    click.option("--backing-file", "backing_file", type=click.Path(dir_okay=False),
                 help="Path of the backing file (overrides the one named in the image)."),
    click.option("--no-backing", is_flag=True,
                 help="Read unallocated clusters as zeros instead of from the backing file."),
    click.option("--data-file", type=click.Path(dir_okay=False),
                 help="Path of the external data file (overrides the one named in the image)."),
    click.option("--allow-dir", "allow_dirs", multiple=True, metavar="DIR",
                 type=click.Path(file_okay=False), envvar=ALLOW_DIR_ENVVAR,
                 help="Also follow backing and data files that the image names in DIR "
                      "(repeatable; or a list in $" + ALLOW_DIR_ENVVAR + ", separated by ':'). "
                      "By default only files in the image's own directory are followed."),
    click.option("--passphrase-file", type=click.Path(dir_okay=False), metavar="FILE",
                 expose_value=False, callback=_passphrase_file,
                 help="Read the passphrase of an encrypted image (LUKS or legacy AES) from "
                      "FILE, byte for byte (a trailing newline is part of it); or give it "
                      "in $" + PASSPHRASE_ENVVAR
                      + ". Needs qcow2snap[luks]."),
    click.option("--kdf-iteration-limit", type=click.IntRange(min=1), metavar="N",
                 expose_value=False, callback=_kdf_limit_option,
                 help="Try no LUKS key slot that asks for more than N PBKDF2 iterations "
                      f"(default {DEFAULT_KDF_ITERATION_LIMIT:,}: a hostile image could ask "
                      "for hours of work)."),
)

#: How SNAPSHOT is matched.
snapshot_selection = _options(
    click.option("--by-id", is_flag=True, help="SNAPSHOT is an ID (never a name)."),
    click.option("--by-name", is_flag=True, help="SNAPSHOT is a name (never an ID)."),
)

_progress_option = click.option(
    "--progress/--no-progress", default=None,
    help="Show a progress bar (default: when stderr is a terminal).")

#: What every edit command takes besides its arguments.
edit_options = _options(
    click.option("--dry-run", is_flag=True,
                 help="Show the planned changes (clusters to allocate and free, bytes "
                      "reclaimed, header fields) and write nothing."),
    click.option("--json", "as_json", is_flag=True, help="Print the results as JSON."),
)


def _by(by_id: bool, by_name: bool) -> Literal["id", "name"] | None:
    """--by-id / --by-name as the library's ``by=``: the one place they are
    read."""
    if by_id and by_name:
        raise click.UsageError("--by-id and --by-name exclude each other")
    return "id" if by_id else "name" if by_name else None


def _snapshot(image: Qcow2Image, ref: str, by_id: bool, by_name: bool, *,
              active: bool = False) -> Snapshot | None:
    """SNAPSHOT resolved in ``image``; with ``active``, '-' (unless --by-id or
    --by-name says it is a reference) means the active layer (None)."""
    by = _by(by_id, by_name)
    if active and ref == "-" and by is None:
        return None
    return image.find_snapshot(ref, by=by)


@contextmanager
def _open(path: str, backing_file: str | None = None, no_backing: bool = False,
          data_file: str | None = None, allow_dirs: tuple[str, ...] = ()
          ) -> Iterator[Qcow2Image]:
    backing: str | bool | None = False if no_backing else backing_file
    with open_image(path, backing_file=backing, data_file=data_file,
                    allow_dirs=allow_dirs, passphrase=_passphrase(),
                    kdf_iteration_limit=_kdf_iteration_limit()) as image:
        yield image


def _layer_label(snapshot: Snapshot | None) -> str:
    return "active layer" if snapshot is None else f"snapshot {snapshot.id} ({snapshot.name})"


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (qemu-img info's keys and more).")
@image_options
def info(image: str, as_json: bool, backing_file: str | None, no_backing: bool,
         data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Show an image's header, features, snapshots and backing chain (each
    link resolved, and which are not followed, and why)."""
    from .ops import inspection  # info and list only: not on other commands' start-up
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        facts = inspection.image_facts(img, image)
        if as_json:
            _print_json(describe.image_info_json(facts))
        else:
            _echo_text(describe.info_text(facts))


@cli.command(name="list")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(images: tuple[str, ...], as_json: bool) -> None:
    """List the snapshots of one image, or compare those of a VM's disks.

    With one IMAGE: a table like `qemu-img snapshot -l` (plus DISK_SIZE);
    --json prints an array of snapshot objects. With several IMAGES: the
    snapshots present on all of them, and which are missing where.
    """
    from .ops import inspection
    if len(images) == 1:
        with open_image(images[0]) as img:
            if as_json:
                _print_json_list(describe.snapshot_json(f)
                                 for f in inspection.snapshot_facts(img))
            elif img.snapshots:
                _echo_text(describe.snapshot_list_text(list(inspection.snapshot_facts(img))))
        return
    listed = []
    for path in images:
        with open_image(path) as img:
            listed.append((path, list(inspection.snapshot_facts(img))))
    comparison = inspection.compare_snapshots(listed)
    if as_json:
        _print_json(describe.comparison_json(comparison))
    else:
        _echo_text(describe.comparison_text(comparison))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    global _tune_heap
    _tune_heap = True  # the command, once known, tunes the allocator (see cli())
    for signum in (signal.SIGTERM, signal.SIGHUP):  # clean up as Ctrl-C does
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays so
            signal.signal(signum, _terminate)
    cli.main(args=argv, prog_name="qcow2snap")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
