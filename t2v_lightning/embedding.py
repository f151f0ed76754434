"""The task embedding artifact: tensors in safetensors, everything else in its JSON header.

A :class:`TaskEmbedding` is the triple of SPEC section 2.8 plus the layout of the vector:

* ``hessian``: one value per filter / unit / channel of every embedded layer (1-D, float32);
* ``scale``: the prior scale of each entry (ones for Monte Carlo, ``exp(-loglambda2)`` of the
  layer for the variational method);
* ``layers``: ordered ``{qualified module name: (start, stop)}`` slices of ``hessian``;
* ``meta``: JSON-serialisable facts about how it was made (probe, probe fingerprint, method,
  estimator, samples, seed, batch size, package versions, ...).

Files are safetensors: a little-endian u64 header length, a JSON header, raw tensor bytes. Nothing
is ever unpickled. Writes go to a temporary name in the destination folder, are flushed to disk
and renamed into place, so a reader never sees a partial artifact: a process killed while writing
leaves the previous file (or none) at the destination, plus at most a hidden
``.<name>.t2v-<host>-<pid>-<token>.tmp`` file that is never read and that the next successful
save of the same destination removes once its writer is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from t2v_lightning.choices import ESTIMATOR_FACTS

FORMAT_NAME = "t2v-lightning-embedding"
# 2: the header holds a SHA-256 ``checksum`` of the layers, meta and tensors, and a file of
# version 2 or later without one is corrupt. Version 1 files (no checksum) are still read.
FORMAT_VERSION = 2
# A header this large cannot belong to an embedding (ours are a few kilobytes to a megabyte).
_MAX_HEADER_BYTES = 64 * 1024 * 1024
_TENSOR_NAMES = ("hessian", "scale")
# The header keys of a version-1 artifact (version 2 added "checksum").
_VERSION_1_KEYS = frozenset({"format", "format_version", "layers", "meta"})


class EmbeddingFileError(ValueError):
    """A file that is not a readable t2v-lightning embedding artifact."""


class IncompatibleEmbeddingsError(ValueError):
    """Two embeddings that were made with different probes or layer layouts."""


@dataclass
class TaskEmbedding:
    """A Task2Vec embedding: filter-wise Fisher values of a probe network on one task.

    Args:
        hessian: 1-D tensor, one (positive) Fisher value per filter of each embedded layer.
        scale: 1-D tensor of the same length: the prior scale of each entry.
        layers: ordered mapping from qualified module name to the ``(start, stop)`` slice of
            ``hessian`` that holds its filters. The slices tile ``[0, len(hessian))`` in order.
        meta: JSON-serialisable description of how the embedding was made.

    Example:
        >>> import torch
        >>> emb = TaskEmbedding(torch.ones(3), torch.ones(3), {"fc": (0, 3)}, {"method": "demo"})
        >>> emb.layer("fc").shape
        torch.Size([3])
    """

    hessian: torch.Tensor
    scale: torch.Tensor
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hessian = torch.as_tensor(self.hessian).detach().to("cpu", torch.float32).contiguous()
        self.scale = torch.as_tensor(self.scale).detach().to("cpu", torch.float32).contiguous()
        self.layers = {str(k): (int(v[0]), int(v[1])) for k, v in self.layers.items()}
        self.meta = dict(self.meta)
        self._validate()

    def _validate(self) -> None:
        if self.hessian.ndim != 1:
            raise ValueError(f"hessian must be 1-D, got shape {tuple(self.hessian.shape)}")
        if self.scale.shape != self.hessian.shape:
            raise ValueError(
                f"scale has shape {tuple(self.scale.shape)} but hessian has "
                f"{tuple(self.hessian.shape)}; they must match"
            )
        if self.layers:
            position = 0
            for name, (start, stop) in self.layers.items():
                if start != position or stop < start:
                    raise ValueError(
                        f"layers must tile the hessian in order; layer {name!r} has slice "
                        f"({start}, {stop}) but the previous layer ended at {position}"
                    )
                position = stop
            if position != self.hessian.numel():
                raise ValueError(
                    f"layers cover {position} entries but hessian has {self.hessian.numel()}"
                )
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as err:
            raise ValueError(f"meta must be JSON-serialisable: {err}") from err

    def __len__(self) -> int:
        return int(self.hessian.numel())

    def layer(self, name: str) -> torch.Tensor:
        """The slice of ``hessian`` that belongs to the module ``name``.

        Args:
            name: a module's qualified name, a key of :attr:`layers` (e.g. ``"layer2.0.conv1"``).
        """
        if name not in self.layers:
            raise KeyError(f"no layer {name!r} in this embedding; it has {list(self.layers)}")
        start, stop = self.layers[name]
        return self.hessian[start:stop]

    @property
    def name(self) -> str:
        """The task name recorded in ``meta`` (empty when none)."""
        return str(self.meta.get("task_name", ""))

    def _check_finite(self) -> None:
        """Refuse NaN / inf values, naming the first entry and its layer."""
        for label, values in (("hessian", self.hessian), ("scale", self.scale)):
            bad = (~torch.isfinite(values)).nonzero().flatten()
            if bad.numel():
                first = int(bad[0])
                where = next(
                    (
                        f" (layer {name!r})"
                        for name, (start, stop) in self.layers.items()
                        if start <= first < stop
                    ),
                    "",
                )
                raise ValueError(
                    f"the embedding's {label} holds {bad.numel()} non-finite values (first at "
                    f"index {first}{where}); a Task2Vec embedding must be finite, so it is not "
                    "written"
                )

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the artifact atomically (temporary file in the same folder, fsync, rename).

        The bytes depend only on the embedding: header keys are sorted, so the same embedding
        written by two processes gives the same file.

        Args:
            path: destination file (``.safetensors`` is conventional).
            overwrite: replace an existing file. When False (the default), an existing file
                is never replaced, also not one that appears while this one is written (another
                process writing the same path): ``FileExistsError``.

        Returns:
            The destination path.

        Raises:
            ValueError: the embedding is empty, ``hessian`` or ``scale`` holds NaN or infinite
                values (named), or ``path`` exists and is not a regular file (a folder, a
                device, a FIFO, a symbolic link to nothing).
            FileExistsError: the file exists and ``overwrite`` is False.
            FileNotFoundError, PermissionError: the folder is missing or not writable.
            OSError: the disk is full (the message names the file; nothing is left at it).
        """
        from t2v_lightning.outputs import write_atomically

        path = Path(path)
        if len(self) == 0:
            raise ValueError(
                f"the embedding has no entries (no embedded layer); nothing to compare, so {path} "
                "is not written"
            )
        self._check_finite()
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "layers": json.dumps([[k, list(v)] for k, v in self.layers.items()]),
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        header["checksum"] = _checksum(header["layers"], header["meta"], self.hessian, self.scale)
        tensors = {"hessian": self.hessian, "scale": self.scale}
        return write_atomically(
            path,
            lambda name: _write_safetensors(tensors, name, metadata=header),
            overwrite,
            what="embedding file",
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TaskEmbedding:
        """Read an artifact written by :meth:`save`; never unpickles anything.

        Args:
            path: the ``.safetensors`` artifact.

        Raises:
            FileNotFoundError: the file does not exist.
            EmbeddingFileError: the file is not a valid t2v-lightning artifact (wrong format,
                truncated, corrupt header, newer format version, bad tensors, contents that do
                not match the checksum recorded when it was written).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"embedding file {path} does not exist")
        if not path.is_file():
            raise EmbeddingFileError(f"{path} is not a regular file (a folder or a device?)")
        header, data_start = _read_header(path)
        meta_block = header.get("__metadata__")
        if not isinstance(meta_block, dict) or meta_block.get("format") != FORMAT_NAME:
            raise EmbeddingFileError(
                f"{path} is a safetensors file but not a t2v-lightning embedding "
                f"(no '{FORMAT_NAME}' format tag)"
            )
        try:
            version = int(meta_block.get("format_version", "0"))
        except (ValueError, TypeError) as err:
            raise EmbeddingFileError(f"{path}: unreadable format_version") from err
        if version > FORMAT_VERSION:
            raise EmbeddingFileError(
                f"{path} was written by a newer t2v-lightning (format version {version}; this "
                f"one reads up to {FORMAT_VERSION}); upgrade t2v-lightning to read it"
            )
        if version < 1:
            raise EmbeddingFileError(f"{path}: invalid format_version {version}")
        extra = sorted(set(meta_block) - _VERSION_1_KEYS)
        if version == 1 and extra:
            # Version 1 headers hold exactly these keys; a checksum (or a renamed one) means a
            # later version whose format_version was edited to turn the checksum off.
            raise EmbeddingFileError(
                f"{path} is corrupt: it says format version 1 but carries fields of a later "
                f"version ({', '.join(map(repr, extra))}); the file was damaged or edited by "
                "hand; embed the task again"
            )
        tensors = _read_tensors(path, header, data_start)
        recorded = meta_block.get("checksum")
        if recorded is None and version >= 2:
            raise EmbeddingFileError(f"{path}: corrupt embedding header (no checksum)")
        if recorded is not None:
            try:
                actual = _checksum(
                    meta_block.get("layers", "[]"),
                    meta_block.get("meta", "{}"),
                    tensors["hessian"],
                    tensors["scale"],
                )
            except (TypeError, AttributeError) as err:
                raise EmbeddingFileError(f"{path}: corrupt embedding header") from err
            if actual != recorded:
                raise EmbeddingFileError(
                    f"{path} is corrupt: its contents do not match the checksum recorded when it "
                    "was written (the file was damaged or edited by hand); embed the task again"
                )
        try:
            layers_list = json.loads(meta_block.get("layers", "[]"))
            layers = {str(name): (int(span[0]), int(span[1])) for name, span in layers_list}
            meta = json.loads(meta_block.get("meta", "{}"))
            if not isinstance(meta, dict):
                raise TypeError("meta is not an object")
            embedding = cls(tensors["hessian"], tensors["scale"], layers, meta)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as err:
            raise EmbeddingFileError(f"{path}: corrupt embedding: {err}") from err
        if len(embedding) == 0:
            raise EmbeddingFileError(
                f"{path} holds an empty embedding (no entries); embed the task again"
            )
        return embedding


def artifact_damage(path: str | os.PathLike[str]) -> str | None:
    """Why the artifact at ``path`` cannot be read (``None`` when it loads, checksum included).

    A sweep that skips the tasks already written checks each existing file with this first: an
    empty or truncated artifact (a full disk, a copy cut short) is embedded again, not counted
    as done.
    """
    try:
        TaskEmbedding.load(path)
    except (EmbeddingFileError, OSError) as err:
        return str(err)
    return None


_DTYPES = {
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise EmbeddingFileError(f"{path} is too short to be a safetensors embedding")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER_BYTES or header_len > size - 8:
            raise EmbeddingFileError(
                f"{path} is not a t2v-lightning embedding (header length {header_len} does not "
                f"fit a file of {size} bytes)"
            )
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise EmbeddingFileError(f"{path} is not a t2v-lightning embedding (bad header)") from err
    if not isinstance(header, dict):
        raise EmbeddingFileError(f"{path} is not a t2v-lightning embedding (bad header)")
    return header, 8 + header_len


def _checksum(layers: str, meta: str, hessian: torch.Tensor, scale: torch.Tensor) -> str:
    """SHA-256 of the layers and meta JSON and of the float32 little-endian tensor bytes."""
    digest = hashlib.sha256()
    for text in (layers, meta):
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    for tensor in (hessian, scale):
        digest.update(
            tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
        )
    return "sha256:" + digest.hexdigest()


def _write_safetensors(
    tensors: Mapping[str, torch.Tensor], filename: str, metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file whose bytes depend only on its contents.

    The safetensors library writes the metadata keys in a different order in every process;
    here every JSON object has sorted keys and compact separators. Layout (the safetensors
    format): little-endian u64 header length, the JSON header padded with spaces to a multiple
    of 8 bytes, then each tensor's little-endian bytes in the order of their names.
    """
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        blob = tensor.numpy().astype("<f4").tobytes()
        entries[name] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    header = raw.encode("utf-8")
    header += b" " * (-len(header) % 8)
    with open(filename, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for blob in blobs:
            handle.write(blob)


def _read_tensors(
    path: Path, header: Mapping[str, Any], data_start: int
) -> dict[str, torch.Tensor]:
    size = path.stat().st_size
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as handle:
        for name in _TENSOR_NAMES:
            entry = header.get(name)
            if not isinstance(entry, dict):
                raise EmbeddingFileError(f"{path}: tensor {name!r} is missing")
            try:
                dtype, itemsize = _DTYPES[str(entry["dtype"])]
                shape = [int(s) for s in entry["shape"]]
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, ValueError, TypeError) as err:
                raise EmbeddingFileError(f"{path}: tensor {name!r} has a corrupt entry") from err
            if len(shape) != 1 or shape[0] < 0:
                raise EmbeddingFileError(f"{path}: tensor {name!r} must be 1-D, got {shape}")
            if (
                not 0 <= begin <= end
                or data_start + end > size
                or end - begin != shape[0] * itemsize
            ):
                raise EmbeddingFileError(
                    f"{path}: tensor {name!r} does not fit the file (truncated or corrupt)"
                )
            handle.seek(data_start + begin)
            buffer = bytearray(handle.read(end - begin))
            out[name] = (
                torch.frombuffer(buffer, dtype=dtype).clone()
                if buffer
                else torch.empty(0, dtype=dtype)
            )
    return out


def _describe(embedding: TaskEmbedding, name: str) -> str:
    if embedding.name:
        return f"{name} ({embedding.name!r})"
    probe = embedding.meta.get("probe")
    return f"{name} (probe {probe!r})" if probe is not None else name


def _layout_difference(a: TaskEmbedding, b: TaskEmbedding, names: tuple[str, str]) -> str:
    """Where two layer layouts first differ, in words (empty when neither records layers)."""
    if not a.layers or not b.layers:
        return ""
    layers_a, layers_b = list(a.layers.items()), list(b.layers.items())
    for position, (entry_a, entry_b) in enumerate(zip(layers_a, layers_b)):
        if entry_a != entry_b:
            return (
                f"; layer #{position} is {entry_a[0]!r} {entry_a[1]} in {names[0]} but "
                f"{entry_b[0]!r} {entry_b[1]} in {names[1]}"
            )
    longer, name = (layers_a, names[0]) if len(layers_a) > len(layers_b) else (layers_b, names[1])
    extra = longer[min(len(layers_a), len(layers_b))]
    return f"; {name} has more layers, starting with {extra[0]!r} {extra[1]}"


class EmbeddingScaleWarning(UserWarning):
    """Two embeddings compared were made at different scales (see :func:`scale_of`)."""


# Methods whose embeddings hold something else than the Fisher, whatever their estimator.
_METHOD_SCALES = {"variational": "variational (inverse weight-noise variances)"}


def scale_of(embedding: TaskEmbedding) -> str | None:
    """What an embedding's values estimate, from its meta; ``None`` when the meta does not say.

    ``per_sample`` and ``exact`` estimate the Fisher F; ``batch`` estimates F divided by its
    batch size; the variational method stores inverse variances, another quantity altogether.
    """
    meta = embedding.meta
    if str(meta.get("method")) in _METHOD_SCALES:
        return _METHOD_SCALES[str(meta.get("method"))]
    facts = ESTIMATOR_FACTS.get(str(meta.get("estimator")))
    if facts is None:
        return None
    if facts.per_batch:
        size = meta.get("batch_size")
        return f"F / {size} (batch estimator)" if size else "F / batch size (batch estimator)"
    return "F (per-example estimator)"


def _scale_difference(a: TaskEmbedding, b: TaskEmbedding) -> tuple[str, str] | None:
    """The two scales (:func:`scale_of`) when both are known and differ, else ``None``."""
    scale_a, scale_b = scale_of(a), scale_of(b)
    if scale_a is None or scale_b is None or scale_a == scale_b:
        return None
    return scale_a, scale_b


def check_comparable(
    a: TaskEmbedding,
    b: TaskEmbedding,
    names: tuple[str, str] = ("a", "b"),
    warn_scale: bool = True,
    assume_comparable: bool = False,
) -> bool:
    """Raise :class:`IncompatibleEmbeddingsError` unless ``a`` and ``b`` can be compared.

    Embeddings are comparable when they come from the same probe weights (equal
    ``meta["probe_fingerprint"]``) and share the same layer layout (equal ``layers``). An
    embedding that records no fingerprint or no layer table (made by hand, or an artifact
    edited or written by other software) cannot be checked: it is refused unless
    ``assume_comparable`` says the caller knows both were made with the same probe and layers
    (then only the lengths must agree).
    The message names both embeddings (``names`` and their task names) and says what differs.
    With ``warn_scale``, an :class:`EmbeddingScaleWarning` says when their values estimate
    different quantities (:func:`scale_of`): comparable, but most distances then mix the tasks'
    difference with the estimators'.

    Returns:
        Whether that warning was given.
    """
    label_a, label_b = _describe(a, names[0]), _describe(b, names[1])
    if not assume_comparable:
        for embedding, label in ((a, label_a), (b, label_b)):
            missing = [
                what
                for what, absent in (
                    ("probe fingerprint", embedding.meta.get("probe_fingerprint") is None),
                    ("layer table", not embedding.layers),
                )
                if absent
            ]
            if missing:
                raise IncompatibleEmbeddingsError(
                    f"embedding {label} records no {' and no '.join(missing)}, so nothing says "
                    "it was made with the same probe and layers as the others; compare it only "
                    "if you know it was (assume_comparable=True; t2v distance / select: "
                    "--assume_comparable)"
                )
    fa, fb = a.meta.get("probe_fingerprint"), b.meta.get("probe_fingerprint")
    if fa is not None and fb is not None and fa != fb:
        probes = ""
        pa, pb = a.meta.get("probe"), b.meta.get("probe")
        if pa is not None and pb is not None:
            probes = f", probes {pa!r} and {pb!r}" if pa != pb else f", both probe {pa!r}"
        raise IncompatibleEmbeddingsError(
            f"embeddings {label_a} and {label_b} were made with different probe weights "
            f"(fingerprints {fa} and {fb}{probes}); only embeddings of the same probe can be "
            f"compared"
        )
    if len(a) != len(b) or (a.layers and b.layers and a.layers != b.layers):
        raise IncompatibleEmbeddingsError(
            f"embeddings {label_a} and {label_b} have different layer layouts "
            f"({len(a)} entries in {len(a.layers)} layers vs {len(b)} entries in "
            f"{len(b.layers)} layers{_layout_difference(a, b, names)}); embed both with the "
            f"same probe and skip_layers"
        )
    difference = _scale_difference(a, b) if warn_scale else None
    if difference is not None:
        warnings.warn(
            f"embeddings {label_a} and {label_b} estimate different quantities: "
            f"{difference[0]} and {difference[1]}. The cosine, entropy, kl, asymmetric_kl and "
            "jsd distances depend on the scale (the cosine's ε = 1e-8 is absolute), so their "
            "values mix the tasks' difference with the estimators'; embed every task the same "
            "way (normalized_cosine and correlation are scale-free)",
            EmbeddingScaleWarning,
            stacklevel=3,
        )
    return difference is not None
