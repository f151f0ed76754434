"""CUB-200-2011 and iNaturalist 2018 readers, and the CUB + iNat meta-task of 232 tasks.

On-disk layouts (what ``scripts/download_cub.sh ROOT`` and ``scripts/download_inat2018.sh ROOT``
produce; the reference's ``ROOT/cub/CUB_200_2011`` is accepted too):

* CUB: ``ROOT/CUB_200_2011/`` with ``images.txt`` (``<image id> <relative path>``),
  ``image_class_labels.txt`` (``<image id> <class id 1..200>``), ``train_test_split.txt``
  (``<image id> <1 train | 0 test>``), ``classes.txt`` (``<class id> <class name>``) and
  ``images/``.
* iNat 2018: ``ROOT/inat2018/`` with ``train2018.json`` and ``val2018.json`` (COCO style:
  ``images`` with ``id`` and ``file_name`` relative to that folder, ``annotations`` with
  ``image_id`` and ``category_id``), ``categories.json`` (the un-obfuscated categories: ``id``,
  ``name`` and the taxonomy ``kingdom``, ``phylum``, ``class``, ``order``, ``family``,
  ``genus``) and the extracted ``train_val2018/`` images.

The meta-task ``cub_inat2018`` (SPEC section 6) has 232 task ids, each the classification of
species within one group, labels ``0 .. C - 1`` in the order given below:

* ``0 .. 9``: CUB species within one bird order other than Passeriformes. CUB ships no
  taxonomy, so the package holds one (``cub_taxonomy.csv``: order and family of the 200
  classes, IOC World Bird List names). Rule: orders with at least two CUB species, ranked by
  number of species (descending), then name; the first ten. With the shipped table: Charadriiformes,
  Piciformes, Coraciiformes, Cuculiformes, Anseriformes, Apodiformes, Podicipediformes,
  Procellariiformes, Suliformes, Caprimulgiformes (Pelecaniformes, 2 species, and
  Gaviiformes, 1, are left out).
* ``10 .. 24``: CUB species within one Passeriformes family. Rule: families with at least two
  CUB species; only 13 exist in the table, so, to keep the published count of 15, the group with
  the most species is split in two halves by class id (first half one larger) until there are
  15 groups: Parulidae (30 species) and Passerellidae (23) become two tasks each. Ranked by the
  family's number of species (descending), then family name, then part.
* ``25 .. 231``: iNaturalist species within one order. Rule: orders (one
  kingdom/phylum/class/order lineage) with at least two species in ``categories.json``,
  ranked by number of training images (descending), then order name; the first 207. The
  reference ranks the same way but keeps a fixed hand-filtered list of 207 whose filter it does
  not document; ours is the rule above. Within an iNat task, species are sorted by name.

The datasets ``cub`` (task ids 0..24) and ``inat2018`` (all ranked iNat orders) serve each half
alone. Images get the ImageNet evaluation preprocessing (resize 256, center crop 224, ImageNet
mean/std; with ``input_size`` s: resize round(s * 256 / 224), crop s), for the training split
too: no augmentation, so that features computed once stay valid.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2v_lightning.data.task import (
    DatasetEntry,
    DatasetNotFoundError,
    LabelledDataset,
    Normalize,
    Task,
    TaskInfo,
    check_input_size,
    check_normalize,
    facts_entry,
)
from t2v_lightning.safety import contained_path, open_image

log = logging.getLogger(__name__)

CUB_TAXONOMY_FILE = "cub_taxonomy.csv"
NUM_CUB_CLASSES = 200
NUM_CUB_ORDER_TASKS = 10
NUM_CUB_FAMILY_TASKS = 15
NUM_CUB_TASKS = NUM_CUB_ORDER_TASKS + NUM_CUB_FAMILY_TASKS
NUM_INAT_TASKS = 207
NUM_CUB_INAT_TASKS = NUM_CUB_TASKS + NUM_INAT_TASKS
PASSERIFORMES = "Passeriformes"
BIRD_LINEAGE = {"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves"}
TAXONOMY_LEVELS = ("kingdom", "phylum", "class", "order", "family", "genus")

CUB_HINT = "Run scripts/download_cub.sh ROOT to download and lay out CUB-200-2011."
INAT_HINT = "Run scripts/download_inat2018.sh ROOT to download iNaturalist 2018 (~319 GB)."
_INAT_CACHE_FILE = "t2v_lightning_tasks.json"
_INAT_CACHE_VERSION = 1


# --- transforms ------------------------------------------------------------------------------


def imagenet_eval_transform(
    input_size: int | None = None, normalize: Normalize = "imagenet"
) -> Callable[[Any], torch.Tensor]:
    """Resize 256, center crop 224, to tensor, ImageNet mean/std (SPEC section 6).

    Args:
        input_size: crop size; the resize keeps the 256/224 ratio. ``None`` means 224.
        normalize: ``"imagenet"`` or ``"none"``.
    """
    from torchvision import transforms

    check_input_size(input_size)
    check_normalize(normalize)
    crop = 224 if input_size is None else input_size
    steps: list[Any] = [
        transforms.Resize(int(round(crop * 256 / 224))),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
    ]
    if normalize == "imagenet":
        from t2v_lightning.data.task import IMAGENET_MEAN, IMAGENET_STD

        steps.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return transforms.Compose(steps)


class ImageFileDataset(LabelledDataset):
    """Images read from files (converted to RGB), with int labels.

    Args:
        paths: image files.
        targets: one label per file.
        transform: applied to the PIL image.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int],
        transform: Callable[[Any], torch.Tensor],
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} image paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self._targets = [int(t) for t in targets]
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:

        rgb = open_image(self.paths[index])  # refused beyond MAX_IMAGE_PIXELS, before decoding
        return self.transform(rgb), self._targets[index]


# --- CUB taxonomy and tasks -----------------------------------------------------------------


@dataclass(frozen=True)
class CubClass:
    """One CUB-200-2011 class with its order and family.

    Args:
        class_id: CUB's class id, 1..200.
        class_name: CUB's name, e.g. ``"001.Black_footed_Albatross"``.
        order: bird order.
        family: bird family.
    """

    class_id: int
    class_name: str
    order: str
    family: str

    @property
    def common_name(self) -> str:
        """Readable species name, e.g. ``"Black footed Albatross"``."""
        return self.class_name.split(".", 1)[-1].replace("_", " ")


@functools.lru_cache(maxsize=1)
def load_cub_taxonomy() -> tuple[CubClass, ...]:
    """The order and family of the 200 CUB classes, from the package's ``cub_taxonomy.csv``."""
    text = resources.files("t2v_lightning.data").joinpath(CUB_TAXONOMY_FILE).read_text("utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    classes = tuple(
        CubClass(int(r["class_id"]), r["class_name"], r["order"], r["family"]) for r in rows
    )
    ids = [c.class_id for c in classes]
    if ids != list(range(1, NUM_CUB_CLASSES + 1)):
        raise ValueError(f"{CUB_TAXONOMY_FILE} must list class ids 1..200 in order")
    return classes


@dataclass(frozen=True)
class CubTaskSpec:
    """One CUB task: the species of one order (or one part of a Passeriformes family).

    Args:
        name: task name, e.g. ``"CUB Charadriiformes"`` or ``"CUB Parulidae 1/2"``.
        level: ``"order"`` or ``"family"``.
        group: the order or family.
        class_ids: CUB class ids in task-label order.
        taxonomy: ``kingdom``, ``phylum``, ``class``, ``order`` (and ``family``).
        part: ``(k, n)`` when a family was split into ``n`` tasks, else ``None``.
    """

    name: str
    level: str
    group: str
    class_ids: tuple[int, ...]
    taxonomy: dict[str, str]
    part: tuple[int, int] | None = None


def _split_largest(groups: list[list[Any]], target: int) -> list[list[Any]]:
    """Split the group with most members in two (first half larger) until ``target`` groups.

    Each group is ``[key, part_index, members]``; splitting keeps the key and records parts.
    """
    groups = [list(g) for g in groups]
    while len(groups) < target:
        i = max(range(len(groups)), key=lambda j: (len(groups[j][2]), -j))
        key, _, members = groups[i]
        if len(members) < 4:
            break  # halves would have fewer than two classes
        half = (len(members) + 1) // 2
        groups[i : i + 1] = [[key, 0, members[:half]], [key, 1, members[half:]]]
    return groups


@functools.lru_cache(maxsize=1)
def cub_tasks() -> tuple[CubTaskSpec, ...]:
    """The 25 CUB tasks of the meta-task, in task-id order (see the module docstring)."""
    classes = load_cub_taxonomy()
    by_order: dict[str, list[int]] = defaultdict(list)
    by_family: dict[str, list[int]] = defaultdict(list)
    for c in classes:
        if c.order == PASSERIFORMES:
            by_family[c.family].append(c.class_id)
        else:
            by_order[c.order].append(c.class_id)

    orders = sorted(
        (o for o, ids in by_order.items() if len(ids) >= 2), key=lambda o: (-len(by_order[o]), o)
    )[:NUM_CUB_ORDER_TASKS]
    specs = [
        CubTaskSpec(f"CUB {o}", "order", o, tuple(by_order[o]), {**BIRD_LINEAGE, "order": o})
        for o in orders
    ]

    families = sorted(
        (f for f, ids in by_family.items() if len(ids) >= 2), key=lambda f: (-len(by_family[f]), f)
    )
    groups = _split_largest([[f, 0, by_family[f]] for f in families], NUM_CUB_FAMILY_TASKS)
    parts = Counter(g[0] for g in groups)
    part_index: dict[str, int] = defaultdict(int)
    ordered = sorted(groups, key=lambda g: (-len(by_family[g[0]]), g[0], g[2][0]))
    for family, _, members in ordered[:NUM_CUB_FAMILY_TASKS]:
        part = None
        name = f"CUB {family}"
        if parts[family] > 1:
            part_index[family] += 1
            part = (part_index[family], parts[family])
            name = f"CUB {family} {part[0]}/{part[1]}"
        specs.append(
            CubTaskSpec(
                name,
                "family",
                family,
                tuple(members),
                {**BIRD_LINEAGE, "order": PASSERIFORMES, "family": family},
                part,
            )
        )
    return tuple(specs)


# --- CUB reader -------------------------------------------------------------------------------


def find_cub_dir(root: str | Path) -> Path:
    """The ``CUB_200_2011`` folder under ``root`` (or ``root`` itself).

    Raises:
        DatasetNotFoundError: no candidate holds ``images.txt``; names the paths tried.
    """
    root = Path(root).expanduser()
    candidates = [root / "CUB_200_2011", root / "cub" / "CUB_200_2011", root]
    return _find_dir(root, candidates, "images.txt", "CUB-200-2011", CUB_HINT)


def _find_dir(root: Path, candidates: Sequence[Path], marker: str, title: str, hint: str) -> Path:
    """The first of ``candidates`` holding the file ``marker``; else an error naming them."""
    for c in candidates:
        if (c / marker).is_file():
            return c
    if not root.exists():
        raise DatasetNotFoundError(f"data root {root} does not exist. {hint}")
    tried = ", ".join(str(c / marker) for c in candidates)
    raise DatasetNotFoundError(f"{title} not found under {root} (looked for {tried}). {hint}")


def _read_pairs(path: Path, hint: str) -> list[tuple[int, str]]:
    if not path.is_file():
        raise DatasetNotFoundError(f"missing file {path}. {hint}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            key, sep, value = line.partition(" ")
            if not sep or not key.isdigit():
                raise ValueError(f"{path}:{number}: expected '<id> <value>', got {line!r}")
            pairs.append((int(key), value.strip()))
    return pairs


@dataclass(frozen=True)
class _CubIndex:
    image_ids: tuple[int, ...]
    paths: tuple[str, ...]
    class_ids: tuple[int, ...]
    is_train: tuple[bool, ...]


@functools.lru_cache(maxsize=4)
def _cub_index(cub_dir: str, stamp: tuple[int, int]) -> _CubIndex:
    d = Path(cub_dir)
    if not (d / "images").is_dir():
        raise DatasetNotFoundError(f"missing folder {d / 'images'}. {CUB_HINT}")
    images = {
        key: contained_path(value, d / "images.txt", "images/")
        for key, value in _read_pairs(d / "images.txt", CUB_HINT)
    }
    labels = {k: int(v) for k, v in _read_pairs(d / "image_class_labels.txt", CUB_HINT)}
    split = {k: v == "1" for k, v in _read_pairs(d / "train_test_split.txt", CUB_HINT)}
    names = dict(_read_pairs(d / "classes.txt", CUB_HINT))
    for file, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        if set(table) != set(images):
            raise ValueError(f"{d / file} and {d / 'images.txt'} list different image ids")
    taxonomy = {c.class_id: c.class_name for c in load_cub_taxonomy()}
    for class_id, name in names.items():
        if taxonomy.get(class_id) != name:
            raise ValueError(
                f"{d / 'classes.txt'}: class {class_id} is {name!r}, expected "
                f"{taxonomy.get(class_id)!r} (is this CUB-200-2011?)"
            )
    bad = sorted({c for c in labels.values() if c not in taxonomy})
    if bad:
        raise ValueError(f"{d / 'image_class_labels.txt'}: unknown class ids {bad[:5]}")
    ids = tuple(sorted(images))
    return _CubIndex(
        ids,
        tuple(images[i] for i in ids),
        tuple(labels[i] for i in ids),
        tuple(split[i] for i in ids),
    )


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class CubDataset(ImageFileDataset):
    """CUB-200-2011 images of some classes, relabelled ``0 .. C - 1``.

    Args:
        root: data root (``root/CUB_200_2011`` or ``root/cub/CUB_200_2011``) or the CUB
            folder itself.
        train: training split (``train_test_split.txt`` flag 1) or test split.
        class_ids: CUB class ids (1..200) in task-label order; ``None`` for all 200.
        transform: applied to each PIL image (default: ImageNet evaluation preprocessing).

    Raises:
        DatasetNotFoundError: a file or folder is missing (names it and the download script).
    """

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        class_ids: Sequence[int] | None = None,
        transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.cub_dir = find_cub_dir(root)
        index = _cub_index(str(self.cub_dir), _stamp(self.cub_dir / "images.txt"))
        ids = list(class_ids) if class_ids is not None else list(range(1, NUM_CUB_CLASSES + 1))
        label_of = {c: i for i, c in enumerate(ids)}
        paths, targets = [], []
        for path, class_id, is_train in zip(index.paths, index.class_ids, index.is_train):
            if is_train == train and class_id in label_of:
                paths.append(self.cub_dir / "images" / path)
                targets.append(label_of[class_id])
        self.class_ids = ids
        super().__init__(
            paths, targets, transform if transform is not None else imagenet_eval_transform()
        )


# --- iNaturalist 2018 reader ------------------------------------------------------------------


def find_inat_dir(root: str | Path) -> Path:
    """The iNat 2018 folder under ``root`` (``root/inat2018``, ``root/iNat2018``, or ``root``).

    Raises:
        DatasetNotFoundError: no candidate holds ``train2018.json``; names the paths tried.
    """
    root = Path(root).expanduser()
    candidates = [root / "inat2018", root / "iNat2018", root]
    return _find_dir(root, candidates, "train2018.json", "iNaturalist 2018", INAT_HINT)


def _load_json(path: Path, hint: str) -> Any:
    if not path.is_file():
        raise DatasetNotFoundError(f"missing file {path}. {hint}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err


@dataclass(frozen=True)
class _InatIndex:
    file_names: tuple[str, ...]
    category_ids: np.ndarray  # one per image, aligned with file_names


@functools.lru_cache(maxsize=2)
def _inat_index(path: str, stamp: tuple[int, int]) -> _InatIndex:
    data = _load_json(Path(path), INAT_HINT)
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{path} has no {key!r} list (expected COCO-style iNat 2018)")
    file_of = {
        int(img["id"]): contained_path(str(img["file_name"]), Path(path)) for img in data["images"]
    }
    names, cats = [], []
    for ann in data["annotations"]:
        image_id = int(ann["image_id"])
        if image_id not in file_of:
            raise ValueError(f"{path}: annotation of unknown image id {image_id}")
        names.append(file_of[image_id])
        cats.append(int(ann["category_id"]))
    return _InatIndex(tuple(names), np.asarray(cats, dtype=np.int64))


def _inat_split_index(inat_dir: Path, train: bool) -> _InatIndex:
    path = inat_dir / ("train2018.json" if train else "val2018.json")
    if not path.is_file():
        raise DatasetNotFoundError(f"missing file {path}. {INAT_HINT}")
    return _inat_index(str(path), _stamp(path))


@dataclass(frozen=True)
class InatTaskSpec:
    """One iNat task: the species of one order.

    Args:
        name: task name, e.g. ``"iNat Passeriformes"``.
        taxonomy: ``kingdom``, ``phylum``, ``class``, ``order``.
        category_ids: iNat category ids in task-label order (species sorted by name).
        class_names: species names in task-label order.
        num_train_images: training images of the order (the ranking key).
    """

    name: str
    taxonomy: dict[str, str]
    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    num_train_images: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form (for the task-list cache)."""
        return {
            "name": self.name,
            "taxonomy": self.taxonomy,
            "category_ids": list(self.category_ids),
            "class_names": list(self.class_names),
            "num_train_images": self.num_train_images,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InatTaskSpec:
        """Inverse of :meth:`to_json`."""
        return cls(
            str(data["name"]),
            {str(k): str(v) for k, v in data["taxonomy"].items()},
            tuple(int(i) for i in data["category_ids"]),
            tuple(str(n) for n in data["class_names"]),
            int(data["num_train_images"]),
        )


def _rank_inat_orders(
    categories: list[dict[str, Any]], train_cats: np.ndarray, categories_path: Path
) -> list[InatTaskSpec]:
    lineage_keys = ("kingdom", "phylum", "class", "order")
    species: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    lineage_of: dict[int, tuple[str, ...]] = {}
    for number, cat in enumerate(categories):
        missing = [k for k in ("id", "name", *lineage_keys) if k not in cat]
        if missing:
            raise ValueError(
                f"{categories_path}: category #{number} lacks {missing} (the "
                f"un-obfuscated categories.json has them). {INAT_HINT}"
            )
        lineage = tuple(str(cat[k]) for k in lineage_keys)
        species[lineage].append((str(cat["name"]), int(cat["id"])))
        lineage_of[int(cat["id"])] = lineage
    unknown = sorted(set(np.unique(train_cats).tolist()) - set(lineage_of))
    if unknown:
        raise ValueError(
            f"train2018.json uses category ids {unknown[:5]} missing from {categories_path}"
        )
    counts: Counter[tuple[str, ...]] = Counter()
    ids, per_id = np.unique(train_cats, return_counts=True)
    for cat_id, n in zip(ids.tolist(), per_id.tolist()):
        counts[lineage_of[cat_id]] += n
    name_count = Counter(lineage[3] for lineage in species)
    ranked = sorted(
        (lin for lin, members in species.items() if len(members) >= 2),
        key=lambda lin: (-counts[lin], lin[3], lin),
    )
    tasks = []
    for lin in ranked:
        members = sorted(species[lin])
        name = lin[3] if name_count[lin[3]] == 1 else f"{lin[3]} ({lin[2]})"
        tasks.append(
            InatTaskSpec(
                f"iNat {name}",
                dict(zip(lineage_keys, lin)),
                tuple(i for _, i in members),
                tuple(n for n, _ in members),
                counts[lin],
            )
        )
    return tasks


@functools.lru_cache(maxsize=2)
def _inat_tasks_cached(
    inat_dir: str, stamps: tuple[tuple[int, int], ...]
) -> tuple[InatTaskSpec, ...]:
    d = Path(inat_dir)
    cache = d / _INAT_CACHE_FILE
    key = [list(s) for s in stamps]
    if cache.is_file():
        try:
            with open(cache, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("version") == _INAT_CACHE_VERSION and saved.get("sources") == key:
                return tuple(InatTaskSpec.from_json(t) for t in saved["tasks"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable iNat task cache %s", cache)
    categories = _load_json(d / "categories.json", INAT_HINT)
    if not isinstance(categories, list):
        raise ValueError(f"{d / 'categories.json'} must hold a list of categories")
    train = _inat_split_index(d, train=True)
    tasks = tuple(_rank_inat_orders(categories, train.category_ids, d / "categories.json"))
    try:
        tmp = cache.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "version": _INAT_CACHE_VERSION,
                    "sources": key,
                    "tasks": [t.to_json() for t in tasks],
                },
                f,
            )
        os.replace(tmp, cache)
    except OSError:
        log.info("could not write the iNat task cache %s (read-only data folder?)", cache)
    return tasks


def inat_tasks(root: str | Path) -> tuple[InatTaskSpec, ...]:
    """All iNat 2018 order tasks, ranked (see the module docstring); the first 207 are used.

    The list is computed from ``categories.json`` and ``train2018.json`` and cached in
    ``<inat dir>/t2v_lightning_tasks.json`` (rebuilt when either file changes).

    Raises:
        DatasetNotFoundError: a file is missing (names it and the download script).
    """
    d = find_inat_dir(root)
    stamps = []
    for name in ("categories.json", "train2018.json"):
        path = d / name
        if not path.is_file():
            raise DatasetNotFoundError(f"missing file {path}. {INAT_HINT}")
        stamps.append(_stamp(path))
    return _inat_tasks_cached(str(d), tuple(stamps))


class InatDataset(ImageFileDataset):
    """iNaturalist 2018 images of some species, relabelled ``0 .. C - 1``.

    Args:
        root: data root (``root/inat2018``) or the iNat folder itself.
        train: ``train2018.json`` or ``val2018.json``.
        category_ids: iNat category ids in task-label order.
        transform: applied to each PIL image (default: ImageNet evaluation preprocessing).
    """

    def __init__(
        self,
        root: str | Path,
        train: bool,
        category_ids: Sequence[int],
        transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.inat_dir = find_inat_dir(root)
        index = _inat_split_index(self.inat_dir, train)
        label_of = {int(c): i for i, c in enumerate(category_ids)}
        keep = np.flatnonzero(np.isin(index.category_ids, np.asarray(list(label_of))))
        paths = [self.inat_dir / index.file_names[i] for i in keep]
        targets = [label_of[int(index.category_ids[i])] for i in keep]
        self.category_ids = list(category_ids)
        super().__init__(
            paths, targets, transform if transform is not None else imagenet_eval_transform()
        )


# --- registry entries -------------------------------------------------------------------------


def _cub_info(dataset: str, task_id: int, spec: CubTaskSpec) -> TaskInfo:
    names = {c.class_id: c.common_name for c in load_cub_taxonomy()}
    meta: dict[str, Any] = {
        "dataset": dataset,
        "task_id": task_id,
        "source": "cub",
        "level": spec.level,
        "group": spec.group,
        "class_names": [names[i] for i in spec.class_ids],
        "source_classes": list(spec.class_ids),
        "taxonomy": dict(spec.taxonomy),
    }
    if spec.part is not None:
        meta["part"] = list(spec.part)
    return TaskInfo(spec.name, len(spec.class_ids), meta)


def _inat_info(dataset: str, task_id: int, spec: InatTaskSpec) -> TaskInfo:
    meta = {
        "dataset": dataset,
        "task_id": task_id,
        "source": "inat2018",
        "level": "order",
        "group": spec.taxonomy["order"],
        "class_names": list(spec.class_names),
        "source_classes": list(spec.category_ids),
        "taxonomy": dict(spec.taxonomy),
        "num_train_images": spec.num_train_images,
    }
    return TaskInfo(spec.name, len(spec.category_ids), meta)


def _inat_spec(root: str, index: int, limit: int | None, task_id: int) -> InatTaskSpec:
    tasks = inat_tasks(root)
    available = len(tasks) if limit is None else min(limit, len(tasks))
    if index >= available:
        offset = task_id - index
        raise ValueError(
            f"task_id={task_id} asks for iNat task {index}, but the iNat 2018 data under {root} "
            f"gives only {available} order tasks (orders with >= 2 species): valid iNat task ids "
            f"are {offset}..{offset + available - 1}"
        )
    return tasks[index]


def _finish(
    info: TaskInfo,
    dataset: ImageFileDataset,
    train: bool,
    input_size: int | None,
    normalize: Normalize,
) -> Task:
    meta = dict(info.metadata)
    meta.update(
        split="train" if train else "test",
        num_examples=len(dataset),
        input_size=224 if input_size is None else input_size,
        normalize=normalize,
    )
    return Task(dataset=dataset, num_classes=info.num_classes, name=info.name, metadata=meta)


def _describe_meta(
    dataset: str, root: str, task_id: int, inat_limit: int | None, inat_offset: int
) -> tuple[TaskInfo, CubTaskSpec | InatTaskSpec]:
    if task_id < inat_offset:
        spec_c = cub_tasks()[task_id]
        return _cub_info(dataset, task_id, spec_c), spec_c
    spec_i = _inat_spec(root, task_id - inat_offset, inat_limit, task_id)
    return _inat_info(dataset, task_id, spec_i), spec_i


@dataclass(frozen=True)
class _CubInatTask:
    """One task of ``dataset`` under ``root``: task ids below ``inat_offset`` are CUB's."""

    dataset: str
    root: str
    task_id: int
    inat_limit: int | None
    inat_offset: int

    def _meta(self) -> tuple[TaskInfo, CubTaskSpec | InatTaskSpec]:
        return _describe_meta(
            self.dataset, self.root, self.task_id, self.inat_limit, self.inat_offset
        )

    def info(self) -> TaskInfo:
        """The task's facts (reads iNat's annotations for an iNat task, no image)."""
        return self._meta()[0]

    def build(
        self, root: str, train: bool, input_size: int | None, download: bool, normalize: Normalize
    ) -> Task:
        """Load the task's images (nothing is downloaded: the scripts fetch them)."""
        if download:
            log.info(
                "%s cannot be downloaded from Python; using the files under %s", self.dataset, root
            )
        info, spec = self._meta()
        transform = imagenet_eval_transform(input_size, normalize)
        data: ImageFileDataset
        if isinstance(spec, CubTaskSpec):
            data = CubDataset(root, train, spec.class_ids, transform)
        else:
            data = InatDataset(root, train, spec.category_ids, transform)
        return _finish(info, data, train, input_size, normalize)


def _entry(
    dataset: str, max_tasks: int, inat_offset: int, inat_limit: int | None, summary: str
) -> DatasetEntry:
    def facts(root: str, task_id: int | None) -> _CubInatTask:
        return _CubInatTask(dataset, root, int(task_id or 0), inat_limit, inat_offset)

    def count(root: str) -> int:
        if inat_offset >= max_tasks > 0:
            return max_tasks
        n = len(inat_tasks(root))
        return inat_offset + (n if inat_limit is None else min(n, inat_limit))

    return facts_entry(facts, max_tasks=max_tasks, count_tasks=count, summary=summary)


def dataset_entries() -> dict[str, DatasetEntry]:
    """Registry entries: ``cub_inat2018`` (232 tasks), ``cub`` (25) and ``inat2018`` (all)."""
    return {
        "cub_inat2018": _entry(
            "cub_inat2018",
            NUM_CUB_INAT_TASKS,
            NUM_CUB_TASKS,
            NUM_INAT_TASKS,
            "CUB-200-2011 + iNaturalist 2018: 25 + 207 species tasks",
        ),
        "cub": _entry(
            "cub",
            NUM_CUB_TASKS,
            NUM_CUB_TASKS,
            0,
            "CUB-200-2011: 10 order + 15 Passeriformes family tasks",
        ),
        "inat2018": _entry(
            "inat2018", 0, 0, None, "iNaturalist 2018: species within one order, ranked by images"
        ),
    }
