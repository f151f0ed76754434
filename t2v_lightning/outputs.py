"""Writing output files safely: a hidden temporary beside the destination, then one rename.

Every file t2v-lightning writes (embedding artifacts, distance matrices as CSV, figures) goes
through :func:`write_atomically`:

* the destination is checked first (:func:`check_output_path`): an existing path that is not a
  regular file (a folder, a device such as ``/dev/full``, a FIFO) is refused, and so is a name
  too long for its temporary file to exist;
* the content is written to ``.<name>.t2v-<host>-<pid>-<token>.tmp`` in the destination folder,
  flushed to disk, and then published in one step: ``os.replace`` when replacing is allowed,
  else a hard link that fails when the destination already exists (a file that appeared while
  the content was being computed is never replaced), so a reader never sees a partial file;
* temporaries of writers of this host that no longer run are removed after a successful write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "OutputExistsError",
    "check_new_outputs",
    "check_output_path",
    "create_temporary",
    "fsync_path",
    "publish",
    "remove_stale_temporaries",
    "write_atomically",
]

_TEMPORARY = re.compile(r"^(?P<host>.*)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
# "-<pid>-<8 hex digits>.tmp" after the host: a pid has at most 7 digits on Linux (pid_max 2**22).
_TEMPORARY_TAIL = len("-4194304-01234567.tmp")


class OutputExistsError(FileExistsError):
    """The destination exists (or appeared while the output was being computed)."""


def host_name() -> str:
    """This machine's name, reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", socket.gethostname()) or "host"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.t2v-{host_name()}-{os.getpid()}-"


def _name_max(folder: Path) -> int:
    """The longest file name the folder's file system accepts (255 where it cannot be asked)."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return int(os.pathconf(existing, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_output_path(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Refuse a destination that cannot be written safely, before any work is done.

    Args:
        path: the destination file.
        what: how to name it in messages (an option name, e.g. ``--output``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``path`` exists and is not a regular file (a folder, a device, a FIFO, a
            socket), is a symbolic link to nothing, or its name (or its temporary's) is too
            long for the file system.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"{what} {str(path)!r} is not a file name")
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        info = None  # a missing or unusable folder is reported where it would be created
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be examined: {err.strerror}") from err
    if info is None and os.path.islink(path):
        # os.link / O_EXCL would fail on it only after the work, and os.replace would replace
        # the link, not write where it points
        raise ValueError(
            f"{what} {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
            "exist; remove the link or give another name"
        )
    if info is not None and not stat.S_ISREG(info.st_mode):
        kind = _kind(info.st_mode)
        raise ValueError(
            f"{what} {str(path)!r} is {kind}, not a regular file; give the name of a file to write"
        )
    limit = _name_max(path.parent)
    longest = len(f".{path.name}.t2v-{host_name()}") + _TEMPORARY_TAIL
    if longest > limit:
        room = limit - (longest - len(path.name))
        raise ValueError(
            f"{what} {str(path)!r}: the file name is {len(path.name)} characters long; at most "
            f"{max(room, 0)} fit here (the file system allows {limit}, and the file is first "
            f"written under a temporary name {longest - len(path.name)} characters longer)"
        )
    return path


def check_new_outputs(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    inputs: Sequence[str | os.PathLike[str]],
    overwrite: bool,
    refused_suffix: str | None = None,
) -> None:
    """Refuse outputs that would destroy an input or an existing file, before any work.

    Args:
        outputs: option name (``--csv``) to destination; ``None`` entries are not written.
        inputs: the files the command reads.
        overwrite: whether existing destinations may be replaced.
        refused_suffix: an extension no output may have (``.safetensors``: a command whose
            inputs are artifacts, given ``--csv dd/*.safetensors``, forgot the CSV's name).

    Raises:
        ValueError: an output is one of the inputs (even with ``overwrite``), has the refused
            extension, names the same file as another output, or is not a regular file.
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    sources = {os.path.realpath(path) for path in inputs}
    seen: dict[str, str] = {}
    for option, given in outputs.items():
        if not given:
            continue
        path = check_output_path(given, option)
        real = os.path.realpath(path)
        if real in sources:
            raise ValueError(
                f"{option} {str(path)!r} is one of the input files; writing it would destroy "
                "that input (did you forget the output's name?)"
            )
        if refused_suffix is not None and path.suffix == refused_suffix:
            raise ValueError(
                f"{option} {str(path)!r} has the extension of the inputs ({refused_suffix}); give "
                "the output a name of its own (did you forget it before the inputs?)"
            )
        if real in seen:
            raise ValueError(f"{option} and {seen[real]} name the same file {str(path)!r}")
        seen[real] = option
        if not overwrite and os.path.lexists(path):
            raise _exists(path, option, appeared=False)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def create_temporary(path: Path) -> str:
    """Create an empty temporary file beside ``path``, named after it, this host and process.

    Created with mode ``0o666`` minus the umask, like any file the user writes (``mkstemp``
    gives ``0o600``: the output would be unreadable to the user's group).
    """
    prefix = _temporary_prefix(path)
    for _ in range(100):
        name = os.path.join(path.parent, f"{prefix}{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return name
    raise FileExistsError(f"cannot create a temporary file beside {path}")  # pragma: no cover


def fsync_path(name: str | os.PathLike[str], directory: bool = False) -> None:
    """Flush a file (or, best effort, a folder entry) to disk so that a crash keeps it whole."""
    try:
        fd = os.open(name, os.O_RDONLY if directory else os.O_RDWR)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems cannot fsync a folder
            raise
    finally:
        os.close(fd)


def publish(temporary: str, path: Path, overwrite: bool, what: str = "output") -> None:
    """Move the finished ``temporary`` to ``path`` in one step.

    With ``overwrite`` the destination is replaced (``os.replace``). Without it the temporary is
    hard-linked to the destination, which fails when the destination exists, even when it
    appeared a moment ago (another run writing the same file): nothing is ever replaced. On
    file systems without hard links, the destination is reserved with an exclusive create
    before the rename.

    Raises:
        OutputExistsError: ``overwrite`` is False and ``path`` exists.
    """
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise _exists(path, what) from None
    except OSError as err:
        if err.errno not in (
            errno.EPERM,
            errno.ENOTSUP,
            errno.EOPNOTSUPP,
            errno.EMLINK,
            errno.ENOSYS,
            errno.EACCES,
        ):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise _exists(path, what) from None
        os.close(fd)
        os.replace(temporary, path)
        return
    os.unlink(temporary)


def _exists(path: Path, what: str, appeared: bool = True) -> OutputExistsError:
    if not appeared:
        return OutputExistsError(
            f"{what} {str(path)!r} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    return OutputExistsError(
        f"{what} {str(path)!r} already exists: it appeared while this one was being made "
        "(another run writing the same file?) and was not replaced; pass --overwrite "
        "(overwrite=True) to replace it"
    )


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporary files of ``path`` left by writers of this host that no longer run."""
    prefix = f".{path.name}.t2v-"
    host, me = host_name(), os.getpid()
    try:
        candidates = [entry for entry in os.scandir(path.parent) if entry.name.startswith(prefix)]
    except OSError:
        return
    for entry in candidates:
        match = _TEMPORARY.match(entry.name[len(prefix) :])
        if match is None or match.group("host") != host or int(match.group("pid")) == me:
            continue
        try:
            os.kill(int(match.group("pid")), 0)
            continue  # its writer still runs (perhaps writing this very path): leave it
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


def write_atomically(
    path: str | os.PathLike[str],
    write: Callable[[str], None],
    overwrite: bool = False,
    what: str = "output",
) -> Path:
    """Write a file through a temporary beside it: ``write(temporary_name)``, fsync, publish.

    Args:
        path: the destination.
        write: fills the (existing, empty) file it is given.
        overwrite: replace an existing destination; without it an existing destination (also
            one that appears while ``write`` runs) is left as it is and an error raised.
        what: how to name the destination in messages (an option name, e.g. ``--csv``).

    Returns:
        The destination path.

    Raises:
        OutputExistsError: the destination exists and ``overwrite`` is False.
        ValueError: see :func:`check_output_path`.
        OSError: the folder is missing or not writable, or the disk is full; the message names
            the destination, and nothing is left at it.
    """
    path = check_output_path(path, what)
    if not overwrite and os.path.lexists(path):
        raise _exists(path, what, appeared=False)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write {path}: folder {folder} is not writable")
    temporary = create_temporary(path)
    try:
        mode = os.stat(temporary).st_mode & 0o777
        try:
            write(temporary)
            os.chmod(temporary, mode)
            fsync_path(temporary)
        except OSError as err:
            if err.errno is None:
                raise
            raise type(err)(err.errno, f"cannot write {path}: {err.strerror}") from err
        publish(temporary, path, overwrite, what)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_path(folder, directory=True)
    remove_stale_temporaries(path)
    return path
