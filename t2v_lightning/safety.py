"""Checks that keep hostile or careless input from running code or failing late.

* :func:`check_checkpoint_path`: every checkpoint given to ``t2v fit / validate / embed`` is a
  local file read with ``torch.load(weights_only=True)`` before Lightning sees it; URLs (which
  Lightning would load with ``weights_only=False``) are refused.
* :func:`check_seed`: seeds that torch's generators cannot take.
* :func:`interrupted`: Lightning turns Ctrl-C into ``SystemExit(1)``; this recognises it so
  that it can become a ``KeyboardInterrupt`` again.
* :func:`restrict_config_reading`: configs and option values name classes (``class_path``)
  only inside :data:`ALLOWED_IMPORTS`, refused *before* anything is imported, and YAML alias
  expansion is bounded (:data:`MAX_YAML_NODES`).
* :func:`check_image_pixels`: the documented pixel limit (:data:`MAX_IMAGE_PIXELS`) every image
  loader checks before decoding.
* :func:`contained_path`: a path read from a dataset's index file stays inside the data folder.
* :func:`terminal_text`, :func:`csv_cell`, :func:`plot_label`: text that came from an artifact
  or a dataset, escaped before it reaches a terminal, a spreadsheet or a matplotlib label.
"""

from __future__ import annotations

import contextlib
import operator
import os
import posixpath
import re
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeGuard

__all__ = [
    "ALLOWED_IMPORTS",
    "MAX_IMAGE_PIXELS",
    "MAX_YAML_NODES",
    "check_checkpoint_path",
    "check_image_pixels",
    "check_yaml_size",
    "contained_path",
    "csv_cell",
    "plot_label",
    "restrict_config_reading",
    "terminal_text",
    "check_seed",
    "interrupted",
    "open_image",
    "is_int",
    "keyboard_interrupts_kept",
    "trainer_options_checked",
]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Names Lightning resolves itself ("registry" downloads from Lightning's model registry).
_LIGHTNING_NAMES = ("last", "best", "hpc", "registry")
# torch.Generator.manual_seed accepts [-2**63, 2**64 - 1].
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_checkpoint_path(
    path: str | os.PathLike[str], what: str = "--ckpt_path"
) -> dict[str, Any]:
    """Read a Lightning checkpoint safely, or refuse it in one line.

    Args:
        path: a local checkpoint file.
        what: how to name the argument in messages.

    Returns:
        The checkpoint, read with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: a URL or another non-local location (``http://``, ``file://``, ``s3://``,
            Lightning's ``registry``), a file that needs unpickling Python objects ("cannot be
            read safely"), a file that is not a PyTorch file, or one that is not a Lightning
            checkpoint (a plain state dict).
        FileNotFoundError: the file does not exist.
    """
    from t2v_lightning.probe import load_tensors_safely

    text = os.fspath(path)
    if _URL.match(text):
        raise ValueError(
            f"{what} {text!r} is a URL: checkpoints are read from local files only, with "
            "torch.load(weights_only=True); download it and pass the local file"
        )
    file = Path(text)
    if not file.exists():
        if text.split(":")[0] in _LIGHTNING_NAMES:
            raise ValueError(
                f"{what} {text!r}: give the path of a checkpoint file (Lightning's 'last', "
                "'best', 'hpc' and 'registry' names are not accepted: every checkpoint is checked "
                "before it is read)"
            )
        raise FileNotFoundError(f"{what} {text!r} does not exist")
    if not file.is_file():
        raise ValueError(f"{what} {text!r} is not a regular file")
    checkpoint = load_tensors_safely(file, "checkpoint")
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        kind = (
            "a plain state dict"
            if isinstance(checkpoint, Mapping)
            and checkpoint
            and all(isinstance(key, str) and "." in key for key in checkpoint)
            else f"a {type(checkpoint).__name__}"
        )
        raise ValueError(
            f"{what} {text!r} is not a Lightning checkpoint (it holds {kind}, no 'state_dict'); "
            "pass a checkpoint written by 't2v fit'"
        )
    return dict(checkpoint)


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a Python ``int`` (``True`` and ``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed: Any, name: str = "seed") -> None:
    """Raise a ValueError naming ``name`` unless ``seed`` is an integer torch can seed with."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise ValueError(f"{name} must be an integer, got {seed!r}")
    seed = operator.index(seed)
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise ValueError(
            f"{name}={seed} is out of range: seeds are 64-bit integers ({low} .. {high})"
        )


def interrupted(exit_: SystemExit) -> bool:
    """Whether ``exit_`` is the ``SystemExit(1)`` Lightning raises after catching Ctrl-C."""
    return exit_.code == 1 and isinstance(exit_.__context__, KeyboardInterrupt)


@contextmanager
def keyboard_interrupts_kept() -> Iterator[None]:
    """Turn Lightning's ``SystemExit(1)`` after Ctrl-C back into ``KeyboardInterrupt``.

    Lightning catches ``KeyboardInterrupt`` during ``fit``, ignores SIGINT from then on and
    calls ``sys.exit(1)``; a caller of the library would see its program exit with status 1.
    Here the SIGINT handler is restored and ``KeyboardInterrupt`` raised instead.
    """
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as exit_:
        if not interrupted(exit_):
            raise
        raise KeyboardInterrupt from None
    finally:
        if handler is not None and signal.getsignal(signal.SIGINT) != handler:
            # (ValueError outside the main thread, where the handler cannot have changed)
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, handler)


@contextmanager
def trainer_options_checked() -> Iterator[None]:
    """Report Lightning's refusal of Trainer options (``--trainer.*``) as a ValueError.

    Lightning checks ``devices``, ``accelerator``, ``max_epochs``... when the Trainer is built
    and raises ``MisconfigurationException`` or ``TypeError``; both are the user's options, so
    they become one line naming them instead of a traceback.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (MisconfigurationException, TypeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"invalid --trainer options: {message}") from err


# ------------------------------------------------------------------------------ configs
# The only modules a config or an option value may name as a ``class_path`` (or any other
# import path): the package's own classes, Lightning's callbacks, loggers, profilers,
# strategies, accelerators and plugins (under either package name), and torch's optimizers and
# learning-rate schedulers. Anything else is refused by jsonargparse *before* it is imported, so
# a config cannot run the code of a module it names (``this``, an ``evil.py`` in the working
# folder).
ALLOWED_IMPORTS: tuple[str, ...] = (
    "t2v_lightning",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.profilers",
    "lightning.pytorch.strategies",
    "lightning.pytorch.accelerators",
    "lightning.pytorch.plugins",
    "lightning.fabric.plugins",
    "pytorch_lightning.callbacks",
    "pytorch_lightning.loggers",
    "pytorch_lightning.profilers",
    "pytorch_lightning.strategies",
    "pytorch_lightning.accelerators",
    "pytorch_lightning.plugins",
    "torch.optim",
)
# The most nodes a YAML document (a config file or an option value) may hold once its aliases
# are expanded. Real configs hold a few hundred; a "billion laughs" document of a few hundred
# bytes expands to billions.
MAX_YAML_NODES = 100_000


class _YamlTooLarge(Exception):
    pass


def _expanded_nodes(root: Any, limit: int) -> int:
    """How many nodes the composed YAML ``root`` holds once its aliases are expanded.

    Shared (aliased) nodes are counted once per reference, but measured only once: the count
    costs the size of the document as written, not of its expansion.

    Raises:
        _YamlTooLarge: the count passes ``limit``.
        ValueError: an alias refers to a node that contains it (a recursive document).
    """
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ValueError("the YAML document refers to itself through an alias")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                raise _YamlTooLarge
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


def check_yaml_size(text: str, limit: int = MAX_YAML_NODES) -> None:
    """Raise a ValueError when the YAML ``text`` expands to more than ``limit`` nodes.

    Text that is not YAML is left to the YAML reader to report.
    """
    import yaml

    if "*" not in text and "<<" not in text:
        return  # no alias: the document is no larger than its text
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return
    if root is None:
        return
    try:
        _expanded_nodes(root, limit)
    except _YamlTooLarge:
        raise ValueError(
            f"a YAML config or option value expands to more than {limit:,} values through its "
            "aliases (&anchor / *alias); refused before it is expanded"
        ) from None
    except RecursionError:
        raise ValueError("a YAML config or option value is nested too deeply") from None


def restrict_config_reading() -> None:
    """Make jsonargparse (LightningCLI's parser) read configs and values safely, process-wide.

    * Import paths (``class_path: ...``) outside :data:`ALLOWED_IMPORTS` are refused before the
      module they name is imported (jsonargparse's import path policy: deny ``*``, allow ours).
    * Every YAML document (a ``--config`` file, a value such as ``--trainer.callbacks '[...]'``)
      is measured before it is read: more than :data:`MAX_YAML_NODES` nodes after alias
      expansion is refused (:func:`check_yaml_size`).

    Called by the ``t2v`` command line before it parses anything; calling it again does nothing.
    """
    from jsonargparse import get_loader, set_loader, set_parsing_settings

    loader = get_loader("yaml")
    if not getattr(loader, "_t2v_bounded", False):
        import yaml

        def bounded_yaml_load(stream: str) -> Any:
            if isinstance(stream, str):
                check_yaml_size(stream)
            return loader(stream)

        bounded_yaml_load._t2v_bounded = True  # type: ignore[attr-defined]
        set_loader("yaml", bounded_yaml_load, exceptions=(yaml.YAMLError,))
    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=list(ALLOWED_IMPORTS))


# ------------------------------------------------------------------------------ images
# The most pixels an image may have (width × height): 50 megapixels, about 8660 × 5770, or
# 150 MB once decoded as RGB. Photos of CUB and iNaturalist are under 1 megapixel; a file with
# more is refused before it is decoded (a 97 KB PNG can declare 10000 × 10000 pixels: 300 MB
# decoded, 1.5 GB while it is resized).
MAX_IMAGE_PIXELS = 50_000_000


def check_image_pixels(
    size: tuple[int, int], source: str | os.PathLike[str], limit: int = MAX_IMAGE_PIXELS
) -> None:
    """Refuse an image larger than ``limit`` pixels, before it is decoded.

    Image loaders call this with the size read from the file's header (``PIL.Image.open`` reads
    only the header; ``image.size`` is then known and nothing is decoded yet).

    Args:
        size: ``(width, height)`` in pixels.
        source: the file, named in the message.
        limit: the most pixels accepted (default :data:`MAX_IMAGE_PIXELS`).

    Raises:
        ValueError: the image has more pixels than ``limit`` (or a negative size); the message
            names the file, its size and the limit.
    """
    width, height = (int(v) for v in size)
    if width < 0 or height < 0 or width * height > limit:
        raise ValueError(
            f"image {os.fspath(source)!r} is {width} x {height} pixels, more than the limit of "
            f"{limit:,} pixels (t2v_lightning.safety.MAX_IMAGE_PIXELS); refused before decoding "
            "it (shrink it, or leave the file out)"
        )


def open_image(path: str | os.PathLike[str], limit: int = MAX_IMAGE_PIXELS) -> Any:
    """Open an image file as RGB after checking its size against the pixel limit.

    Also turns Pillow's ``DecompressionBombError`` (raised while reading the header of an image
    far above Pillow's own limit) into the same ``ValueError``.

    Returns:
        The decoded ``PIL.Image.Image`` in RGB.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            check_image_pixels(image.size, path, limit)
            return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"image {os.fspath(path)!r} is larger than the limit of {limit:,} pixels "
            f"(t2v_lightning.safety.MAX_IMAGE_PIXELS): {err}"
        ) from None


# ------------------------------------------------------------------------------ index files


def contained_path(entry: str, index_file: str | os.PathLike[str], under: str = "") -> str:
    """``entry``, a path read from a dataset's index file, if it stays inside the data folder.

    The path is resolved lexically (``a/./b``, ``a/../b``): an absolute path, or one that climbs
    out of the folder the index's paths are relative to (``../../etc/passwd``), is refused, so
    a crafted index cannot make the dataset open files outside its root.

    Args:
        entry: the path as written in the index.
        index_file: the index (named in the message).
        under: what the entry is relative to, for the message (``images/``).

    Returns:
        The normalised relative path.

    Raises:
        ValueError: naming the index file and the entry.
    """
    normal = posixpath.normpath(entry)
    seen = posixpath.normpath(entry.replace("\\", "/"))  # as a Windows-made index may mean it
    if not entry or any(
        posixpath.isabs(p) or p == ".." or p.startswith("../") for p in (normal, seen)
    ):
        raise ValueError(
            f"{index_file}: the image path {entry!r} leads outside the data folder "
            f"({under or 'the index folder'}); paths in an index must be relative and stay "
            "inside it"
        )
    return normal


# ------------------------------------------------------------------------------ untrusted text
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def terminal_text(text: object) -> str:
    """``text`` with control characters (ANSI escapes, newlines, bidi overrides) made visible.

    Task names and other strings read from artifacts or datasets pass through this before they
    are printed: ``"\\x1b[2J"`` is shown as ``\\x1b[2J``, not obeyed by the terminal.
    """
    return _CONTROL.sub(
        lambda match: match.group().encode("unicode_escape").decode("ascii"), str(text)
    )


def csv_cell(text: object) -> str:
    """A text cell that a spreadsheet will not run as a formula (OWASP's rule).

    A cell beginning with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
    single quote; control characters are escaped as by :func:`terminal_text`.
    """
    value = str(text)
    if value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        value = "'" + value
    return terminal_text(value)


def plot_label(text: object) -> str:
    """``text`` for a matplotlib label: shown as written, never parsed as mathtext.

    Dollar signs are escaped (two ``$`` would start a formula, and a malformed one makes saving
    the figure fail); control characters are escaped as by :func:`terminal_text`.
    """
    return terminal_text(text).replace("$", r"\$")
