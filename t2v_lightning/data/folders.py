"""Image folders as tasks: torchvision's ``ImageFolder`` layout, and folders of such folders.

A task folder holds one subfolder per class, each with that class's images::

    DIR/                 (or DIR/train/ when DIR has a ``train`` subfolder: that one is used)
      cat/  001.jpg 002.png ...
      dog/  a.jpeg ...

Classes are the subfolders' names, sorted, with labels ``0 .. C - 1`` in that order (as
torchvision's ``ImageFolder``); images are the files with an image extension
(:data:`IMAGE_EXTENSIONS`, any case) found under each class folder, sorted, subfolders included.
Other files (``README.txt``, ``.DS_Store``, ``Thumbs.db``, ...) are *skipped*: their number is
logged and recorded in the task's metadata (``skipped_files``, with the first few names in
``skipped_examples``). A file with an image extension that cannot be read as an image is an
error naming it (:class:`~t2v_lightning.data.task.DataSourceError`), raised when it is first
read, before anything is written.

Every image, here and in the Hugging Face reader, is opened by :func:`open_image`, the one
place where a limit on what may be decoded belongs. Images get the ImageNet evaluation
preprocessing (resize ``round(s * 256 / 224)``, center crop ``s``, ImageNet mean/std; ``s`` is
``input_size``, 224 by default).

A folder of task folders is a sweep: :func:`task_folders` lists the task folders matching glob
patterns (``*``, ``birds_*``), each then read as above; ``t2v embed --data.name imagefolder
--data.root TASKS_DIR --datasets '*'`` writes one artifact per task folder.
"""

from __future__ import annotations

import glob
import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2v_lightning.data.task import DatasetNotFoundError, DataSourceError, LabelledDataset
from t2v_lightning.safety import MAX_IMAGE_PIXELS, check_image_pixels

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderScan",
    "ImageSourceDataset",
    "open_image",
    "scan_image_folder",
    "task_folders",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)
"""File extensions read as images (torchvision's ``IMG_EXTENSIONS``, compared in lower case)."""

_SKIPPED_EXAMPLES = 5


def open_image(source: str | os.PathLike[str] | bytes, name: str | None = None) -> Any:
    """Read one image and return it as an RGB ``PIL.Image`` (decoded, file closed).

    Every image of the image folders and of Hugging Face image columns goes through here. Its
    size is read from the header first and checked against the pixel limit
    (:func:`~t2v_lightning.safety.check_image_pixels`) before anything is decoded.

    Args:
        source: a file path, or the encoded bytes of an image.
        name: how to name the image in errors (default: the path).

    Raises:
        DataSourceError: the file or bytes are not an image that PIL can read, or the image has
            more pixels than :data:`~t2v_lightning.safety.MAX_IMAGE_PIXELS`; the message names
            the image.
    """
    from PIL import Image

    label = (
        name
        if name is not None
        else ("image bytes" if isinstance(source, bytes) else os.fspath(source))
    )
    handle: Any = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        image = Image.open(handle)
    except FileNotFoundError as err:
        raise DataSourceError(f"image {label} does not exist") from err
    except Image.DecompressionBombError as err:
        raise DataSourceError(
            f"image {label} is larger than the limit of {MAX_IMAGE_PIXELS:,} pixels "
            f"(t2v_lightning.safety.MAX_IMAGE_PIXELS): {err}"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise DataSourceError(f"{label} is not an image that can be read ({_reason(err)})") from err
    with image:
        try:
            check_image_pixels(image.size, label)
        except ValueError as err:
            raise DataSourceError(str(err)) from None
        try:
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:  # truncated or damaged data
            raise DataSourceError(
                f"{label} is not an image that can be read ({_reason(err)})"
            ) from err


def _reason(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


class ImageSourceDataset(LabelledDataset):
    """Images read through :func:`open_image` when indexed, with int labels.

    Args:
        sources: one file path or encoded image (``bytes``) per example.
        targets: one label per example.
        transform: turns the RGB PIL image into a tensor.
        names: how to name each example in errors (default: its path, or ``example i``).
    """

    def __init__(
        self,
        sources: Sequence[str | bytes],
        targets: Sequence[int],
        transform: Callable[[Any], torch.Tensor],
        names: Sequence[str] | None = None,
    ) -> None:
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} images but {len(targets)} labels")
        self.sources = list(sources)
        self._targets = [int(t) for t in targets]
        self.transform = transform
        self.names = list(names) if names is not None else None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        source = self.sources[index]
        name = (
            self.names[index]
            if self.names is not None
            else (source if isinstance(source, str) else f"example {index}")
        )
        return self.transform(open_image(source, name=name)), self._targets[index]


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan_image_folder` found.

    Args:
        folder: the folder the classes were read from (``DIR`` or ``DIR/train``).
        class_names: the class folders' names, sorted; label ``i`` is ``class_names[i]``.
        paths: every image file, class by class.
        targets: the label of every image.
        skipped: files without an image extension, relative to ``folder``.
    """

    folder: Path
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    targets: tuple[int, ...]
    skipped: tuple[str, ...]

    def metadata(self) -> dict[str, Any]:
        """JSON facts for the task's metadata: folder, classes, counts, skipped files."""
        per_class = Counter(self.targets)
        counts = [per_class[label] for label in range(len(self.class_names))]
        return {
            "folder": str(self.folder),
            "class_names": list(self.class_names),
            "class_counts": counts,
            "num_images": len(self.paths),
            "skipped_files": len(self.skipped),
            "skipped_examples": list(self.skipped[:_SKIPPED_EXAMPLES]),
        }


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def scan_image_folder(root: str | os.PathLike[str], train: bool = True) -> FolderScan:
    """List the classes and images of an image folder (nothing is decoded).

    Args:
        root: the task folder; ``root/train`` is used when it exists (and, with
            ``train=False``, ``root/val`` or else ``root/test``).
        train: the training split, or the held-out one (``val`` / ``test`` subfolder).

    Raises:
        DatasetNotFoundError: ``root`` (or the held-out split's folder) does not exist.
        DataSourceError: ``root`` is not a folder, holds no class folders, a class folder
            holds no image, or there is a single class (Task2Vec needs two).
    """
    base = Path(root)
    if not base.exists():
        raise DatasetNotFoundError(f"image folder {base} does not exist")
    if not base.is_dir():
        raise DataSourceError(f"image folder {base} is a file, not a folder")
    folder = base
    if train:
        if (base / "train").is_dir():
            folder = base / "train"
    else:
        held_out = [base / name for name in ("val", "test") if (base / name).is_dir()]
        if not held_out:
            raise DatasetNotFoundError(
                f"image folder {base} has no val/ or test/ subfolder for a held-out split"
            )
        folder = held_out[0]
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    class_dirs = [e for e in entries if e.is_dir() and not _is_hidden(e.name)]
    if not class_dirs:
        files = [e.name for e in entries if e.is_file() and not _is_hidden(e.name)]
        what = (
            f"no class folders, only files ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})"
            if files
            else "nothing"
        )
        raise DataSourceError(
            f"image folder {folder} holds {what}: put each class's images in a subfolder "
            "named after the class (DIR/cat/1.jpg, DIR/dog/2.jpg)"
        )
    paths: list[str] = []
    targets: list[int] = []
    skipped: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        found = 0
        for current, dirs, files in os.walk(class_dir.path, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
            for file in sorted(files):
                path = os.path.join(current, file)
                if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS and not _is_hidden(file):
                    paths.append(path)
                    targets.append(label)
                    found += 1
                else:
                    skipped.append(os.path.relpath(path, folder))
        if not found:
            raise DataSourceError(
                f"class folder {class_dir.path} holds no images (extensions read: "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
    if len(class_dirs) < 2:
        raise DataSourceError(
            f"image folder {folder} has a single class ({class_dirs[0].name}): Task2Vec needs "
            "at least two classes (one subfolder per class)"
        )
    if skipped:
        log.warning(
            "%s: skipped %d file(s) without an image extension (%s%s)",
            folder,
            len(skipped),
            ", ".join(skipped[:_SKIPPED_EXAMPLES]),
            ", ..." if len(skipped) > _SKIPPED_EXAMPLES else "",
        )
    return FolderScan(
        folder=folder,
        class_names=tuple(e.name for e in class_dirs),
        paths=tuple(paths),
        targets=tuple(targets),
        skipped=tuple(skipped),
    )


def task_folders(root: str | os.PathLike[str], patterns: Sequence[str]) -> list[Path]:
    """The task folders of a folder of task folders that match glob patterns.

    Args:
        root: the folder holding one folder per task.
        patterns: glob patterns of task folder names (``*``, ``birds_*``), or paths.

    Returns:
        The matching folders, pattern by pattern, each sorted by name, without repeats.

    Raises:
        DatasetNotFoundError: ``root`` does not exist.
        DataSourceError: a pattern matches no folder (the message lists the folders there).
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetNotFoundError(f"folder of task folders {base} does not exist")
    found: dict[str, Path] = {}
    for pattern in patterns:
        matches = sorted(
            Path(match)
            for match in glob.glob(os.path.join(glob.escape(str(base)), pattern))
            if os.path.isdir(match) and not _is_hidden(os.path.basename(match))
        )
        if not matches:
            there = sorted(p.name for p in base.iterdir() if p.is_dir() and not _is_hidden(p.name))
            shown = ", ".join(there[:10]) + (", ..." if len(there) > 10 else "")
            raise DataSourceError(
                f"--datasets {pattern!r} matches no task folder in {base} (folders there: "
                f"{shown or 'none'})"
            )
        for match in matches:
            found.setdefault(os.path.realpath(match), match)
    return list(found.values())
