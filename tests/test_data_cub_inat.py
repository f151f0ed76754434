"""CUB-200-2011, iNaturalist 2018 and the 232-task meta-task, on small fake trees in the real
on-disk formats (text files, COCO-style JSON, tiny JPEGs)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2v_lightning.data import cub_inat
from t2v_lightning.data.cub_inat import (
    NUM_CUB_FAMILY_TASKS,
    NUM_CUB_ORDER_TASKS,
    cub_tasks,
    inat_tasks,
    load_cub_taxonomy,
)
from t2v_lightning.data.registry import describe_task, get_task, num_tasks
from t2v_lightning.data.task import DatasetNotFoundError, get_targets

# ---------------------------------------------------------------------------------------------
# The CUB taxonomy table and the CUB task list (package data only)


def test_taxonomy_covers_all_200_cub_classes() -> None:
    table = load_cub_taxonomy()
    assert [c.class_id for c in table] == list(range(1, 201))
    assert len({c.class_name for c in table}) == 200
    for c in table:
        assert c.class_name.startswith(f"{c.class_id:03d}."), c
        assert c.order.endswith("iformes"), c
        assert c.family.endswith("idae"), c
    assert table[0].class_name == "001.Black_footed_Albatross"
    assert table[-1].class_name == "200.Common_Yellowthroat"
    assert (table[0].order, table[0].family) == ("Procellariiformes", "Diomedeidae")
    # every family sits in exactly one order
    order_of: dict[str, set[str]] = {}
    for c in table:
        order_of.setdefault(c.family, set()).add(c.order)
    assert all(len(orders) == 1 for orders in order_of.values())
    assert Counter(c.order for c in table)["Passeriformes"] == 133


def test_cub_task_split_is_10_orders_and_15_passeriformes_groups() -> None:
    tasks = cub_tasks()
    assert len(tasks) == NUM_CUB_ORDER_TASKS + NUM_CUB_FAMILY_TASKS == 25
    orders, families = tasks[:10], tasks[10:]
    assert all(t.level == "order" and t.group != "Passeriformes" for t in orders)
    assert all(t.level == "family" and t.taxonomy["order"] == "Passeriformes" for t in families)
    assert all(len(t.class_ids) >= 2 for t in tasks)
    used = [i for t in tasks for i in t.class_ids]
    assert len(used) == len(set(used))  # no species in two tasks
    by_id = {c.class_id: c for c in load_cub_taxonomy()}
    for t in orders:
        assert {by_id[i].order for i in t.class_ids} == {t.group}
    for t in families:
        assert {by_id[i].family for i in t.class_ids} == {t.group}
    assert [t.name for t in tasks] == [
        "CUB Charadriiformes",
        "CUB Piciformes",
        "CUB Coraciiformes",
        "CUB Cuculiformes",
        "CUB Anseriformes",
        "CUB Apodiformes",
        "CUB Podicipediformes",
        "CUB Procellariiformes",
        "CUB Suliformes",
        "CUB Caprimulgiformes",
        "CUB Parulidae 1/2",
        "CUB Parulidae 2/2",
        "CUB Passerellidae 1/2",
        "CUB Passerellidae 2/2",
        "CUB Icteridae",
        "CUB Tyrannidae",
        "CUB Cardinalidae",
        "CUB Corvidae",
        "CUB Troglodytidae",
        "CUB Vireonidae",
        "CUB Fringillidae",
        "CUB Hirundinidae",
        "CUB Mimidae",
        "CUB Bombycillidae",
        "CUB Laniidae",
    ]
    assert [len(t.class_ids) for t in tasks[10:14]] == [15, 15, 12, 11]


def test_cub_description_needs_no_data() -> None:
    info = describe_task("cub_inat2018", "/nonexistent", 9)
    assert info.name == "CUB Caprimulgiformes" and info.num_classes == 3
    assert info.metadata["taxonomy"] == {
        "kingdom": "Animalia",
        "phylum": "Chordata",
        "class": "Aves",
        "order": "Caprimulgiformes",
    }
    assert info.metadata["class_names"] == ["Chuck will Widow", "Nighthawk", "Whip poor Will"]
    assert num_tasks("cub", "/nonexistent") == 25


# ---------------------------------------------------------------------------------------------
# A fake CUB tree


def tiny_jpeg(path: Path, color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (12, 10), color)
    (image.convert("L") if mode == "L" else image).save(path, "JPEG")


CUB_CLASSES = {22: 3, 92: 2, 105: 2, 185: 2, 186: 2}  # class id -> images (Caprimulgiformes,
# Bombycillidae)


def write_cub(root: Path) -> Path:
    """A CUB_200_2011 folder with a few images of a few classes; returns the folder."""
    cub = root / "CUB_200_2011"
    table = load_cub_taxonomy()
    (cub / "images").mkdir(parents=True)
    (cub / "classes.txt").write_text("".join(f"{c.class_id} {c.class_name}\n" for c in table))
    images, labels, split = [], [], []
    image_id = 0
    for class_id, count in CUB_CLASSES.items():
        name = table[class_id - 1].class_name
        for k in range(count):
            image_id += 1
            rel = f"{name}/{name.split('.', 1)[1]}_{k:04d}.jpg"
            tiny_jpeg(cub / "images" / rel, (class_id, 10 * k, 0), mode="L" if k == 1 else "RGB")
            images.append(f"{image_id} {rel}\n")
            labels.append(f"{image_id} {class_id}\n")
            split.append(f"{image_id} {1 if k != 1 else 0}\n")  # the second image is a test image
    (cub / "images.txt").write_text("".join(images))
    (cub / "image_class_labels.txt").write_text("".join(labels))
    (cub / "train_test_split.txt").write_text("".join(split))
    return cub


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    write_cub(tmp_path)
    return tmp_path


def test_cub_order_task_remaps_labels_and_splits(cub_root: Path) -> None:
    task = get_task("cub_inat2018", str(cub_root), task_id=9)  # Caprimulgiformes: 22, 92, 105
    assert task.name == "CUB Caprimulgiformes" and task.num_classes == 3
    assert get_targets(task.dataset) == [0, 0, 1, 2]  # class 22 has two training images
    test = get_task("cub_inat2018", str(cub_root), task_id=9, train=False)
    assert get_targets(test.dataset) == [0, 1, 2]
    assert test.metadata["split"] == "test"
    assert task.metadata["taxonomy"]["order"] == "Caprimulgiformes"
    assert task.metadata["source_classes"] == [22, 92, 105]
    json.dumps(task.metadata)  # JSON-serialisable
    image, label = task.dataset[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == 0
    gray, _ = test.dataset[0]  # a grayscale JPEG becomes three channels
    assert gray.shape == (3, 224, 224)
    small = get_task("cub_inat2018", str(cub_root), task_id=9, input_size=32, normalize="none")
    assert small.dataset[0][0].shape == (3, 32, 32)
    assert float(small.dataset[0][0].min()) >= 0.0 and float(small.dataset[0][0].max()) <= 1.0


def test_cub_family_task_and_reference_layout(tmp_path: Path) -> None:
    write_cub(tmp_path / "cub")  # the reference's ROOT/cub/CUB_200_2011
    task = get_task("cub", str(tmp_path), task_id=23)  # Bombycillidae: 185, 186
    assert task.name == "CUB Bombycillidae" and task.num_classes == 2
    assert task.metadata["taxonomy"]["family"] == "Bombycillidae"
    assert get_targets(task.dataset) == [0, 1]


def test_cub_errors(cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(ValueError, match=r"0 <= task_id <= 231"):
        get_task("cub_inat2018", str(cub_root), task_id=232)
    with pytest.raises(ValueError, match=r"0 <= task_id <= 231"):
        get_task("cub_inat2018", str(cub_root), task_id=-1)
    missing_root = cub_root / "does-not-exist"
    with pytest.raises(DatasetNotFoundError, match=r"download_cub.sh") as info:
        get_task("cub_inat2018", str(missing_root), task_id=0)
    assert str(missing_root) in str(info.value)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DatasetNotFoundError, match="CUB_200_2011"):
        get_task("cub", str(empty), task_id=0)
    (cub_root / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"train_test_split.txt.*download_cub.sh"):
        get_task("cub", str(cub_root), task_id=0)


def test_cub_rejects_another_class_list(tmp_path: Path) -> None:
    cub = write_cub(tmp_path)
    (cub / "classes.txt").write_text("1 001.Some_Other_Bird\n")
    with pytest.raises(ValueError, match=r"classes.txt"):
        get_task("cub", str(tmp_path), task_id=9)


# ---------------------------------------------------------------------------------------------
# A fake iNat 2018 tree

# (id, species, kingdom, phylum, class, order)
CATEGORIES = [
    (0, "Turdus migratorius", "Animalia", "Chordata", "Aves", "Passeriformes"),
    (1, "Cardinalis cardinalis", "Animalia", "Chordata", "Aves", "Passeriformes"),
    (2, "Anas platyrhynchos", "Animalia", "Chordata", "Aves", "Anseriformes"),
    (3, "Branta canadensis", "Animalia", "Chordata", "Aves", "Anseriformes"),
    (4, "Danaus plexippus", "Animalia", "Arthropoda", "Insecta", "Lepidoptera"),
    (5, "Vanessa cardui", "Animalia", "Arthropoda", "Insecta", "Lepidoptera"),
    (6, "Papilio glaucus", "Animalia", "Arthropoda", "Insecta", "Lepidoptera"),
    (7, "Quercus alba", "Plantae", "Tracheophyta", "Magnoliopsida", "Fagales"),  # one species
]
TRAIN_IMAGES = {0: 2, 1: 1, 2: 2, 3: 1, 4: 1, 5: 1, 6: 1, 7: 5}  # Passeriformes and Anseriformes
# tie at 3 images (broken by name), Lepidoptera 3 too, Fagales has 5 but one species only
VAL_IMAGES = {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}


def write_inat(root: Path, images: bool = True) -> Path:
    inat = root / "inat2018"
    inat.mkdir(parents=True)
    cats = [
        {
            "id": i,
            "name": n,
            "kingdom": k,
            "phylum": p,
            "class": c,
            "order": o,
            "family": f"{o}-family",
            "genus": n.split()[0],
            "supercategory": c,
        }
        for i, n, k, p, c, o in CATEGORIES
    ]
    (inat / "categories.json").write_text(json.dumps(cats))
    image_id = 1000
    for split, counts in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        coco: dict[str, list[dict[str, object]]] = {
            "images": [],
            "annotations": [],
            "categories": [{"id": c["id"], "name": "x"} for c in cats],
        }
        for cat_id, count in counts.items():
            for k in range(count):
                image_id += 1
                super_cat = cats[cat_id]["class"]
                rel = f"train_val2018/{super_cat}/{cat_id}/{split}_{k}.jpg"
                if images:
                    tiny_jpeg(inat / rel, (cat_id * 20, k, 0))
                coco["images"].append({"id": image_id, "file_name": rel, "width": 12, "height": 10})
                coco["annotations"].append(
                    {"id": image_id + 5, "image_id": image_id, "category_id": cat_id}
                )
        coco["annotations"].reverse()  # joined by image id, not by position
        (inat / f"{split}2018.json").write_text(json.dumps(coco))
    return inat


@pytest.fixture
def inat_root(tmp_path: Path) -> Path:
    write_inat(tmp_path)
    return tmp_path


def test_inat_orders_ranked_by_training_images_then_name(inat_root: Path) -> None:
    tasks = inat_tasks(inat_root)
    assert [t.name for t in tasks] == [
        "iNat Anseriformes",
        "iNat Lepidoptera",
        "iNat Passeriformes",
    ]
    assert [t.num_train_images for t in tasks] == [3, 3, 3]
    assert tasks[2].class_names == ("Cardinalis cardinalis", "Turdus migratorius")
    assert tasks[2].category_ids == (1, 0)
    assert (inat_root / "inat2018" / "t2v_lightning_tasks.json").is_file()


def test_inat_task_of_the_meta_task(inat_root: Path) -> None:
    task = get_task("cub_inat2018", str(inat_root), task_id=27)  # third iNat task
    assert task.name == "iNat Passeriformes" and task.num_classes == 2
    assert sorted(get_targets(task.dataset)) == [0, 1, 1]  # Turdus (label 1) has 2 images
    assert task.metadata["taxonomy"] == {
        "kingdom": "Animalia",
        "phylum": "Chordata",
        "class": "Aves",
        "order": "Passeriformes",
    }
    assert task.metadata["class_names"] == ["Cardinalis cardinalis", "Turdus migratorius"]
    image, _ = task.dataset[0]
    assert image.shape == (3, 224, 224)
    val = get_task("cub_inat2018", str(inat_root), task_id=26, train=False)
    assert val.name == "iNat Lepidoptera" and sorted(get_targets(val.dataset)) == [0, 1, 2]
    assert num_tasks("cub_inat2018", str(inat_root)) == 28
    assert num_tasks("inat2018", str(inat_root)) == 3
    assert get_task("inat2018", str(inat_root), task_id=0).name == "iNat Anseriformes"


def test_inat_task_id_beyond_the_data_is_a_clear_error(inat_root: Path) -> None:
    with pytest.raises(ValueError, match=r"only 3 order tasks.*25\.\.27"):
        get_task("cub_inat2018", str(inat_root), task_id=28)
    with pytest.raises(ValueError, match=r"only 3 order tasks"):
        get_task("inat2018", str(inat_root), task_id=3)


def test_inat_task_list_cache_is_rebuilt_when_the_data_changes(inat_root: Path) -> None:
    first = inat_tasks(inat_root)
    cache = inat_root / "inat2018" / "t2v_lightning_tasks.json"
    saved = json.loads(cache.read_text())
    saved["tasks"] = saved["tasks"][:1]
    cache.write_text(json.dumps(saved))
    cub_inat._inat_tasks_cached.cache_clear()
    assert len(inat_tasks(inat_root)) == 1  # a valid cache is used as is
    (inat_root / "inat2018" / "categories.json").write_text(
        (inat_root / "inat2018" / "categories.json").read_text() + " "
    )
    cub_inat._inat_tasks_cached.cache_clear()
    assert inat_tasks(inat_root) == first  # stale cache: recomputed


def test_inat_missing_files(tmp_path: Path) -> None:
    inat = write_inat(tmp_path, images=False)
    (inat / "categories.json").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"categories.json.*download_inat2018.sh"):
        get_task("cub_inat2018", str(tmp_path), task_id=25)
    with pytest.raises(DatasetNotFoundError, match=r"download_inat2018.sh"):
        num_tasks("cub_inat2018", str(tmp_path / "nowhere"))


def test_inat_obfuscated_categories_are_rejected(tmp_path: Path) -> None:
    inat = write_inat(tmp_path, images=False)
    (inat / "categories.json").write_text(json.dumps([{"id": 0, "name": "1234"}]))
    with pytest.raises(ValueError, match="lacks"):
        inat_tasks(tmp_path)
