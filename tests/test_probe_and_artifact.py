"""Probes (loading, head discovery, safe weights) and the embedding artifact on disk."""

from __future__ import annotations

import hashlib
import pickle
import struct

import pytest
import torch
from torch import nn

from t2v_lightning import TaskEmbedding, get_probe
from t2v_lightning.embedding import (
    EmbeddingFileError,
    IncompatibleEmbeddingsError,
    check_comparable,
)
from t2v_lightning.probe import ProbeError, find_head, probe_fingerprint


def test_torchvision_probe_with_new_head() -> None:
    probe = get_probe("resnet18", num_classes=7)
    assert find_head(probe) == "fc" and probe.fc.out_features == 7 and not probe.training


def test_timm_probe_and_its_classifier() -> None:
    pytest.importorskip("timm")
    probe = get_probe("timm:resnet10t", num_classes=3)
    assert find_head(probe) == "fc" and probe.fc.out_features == 3
    lite = get_probe("timm:tf_efficientnet_lite0")
    assert find_head(lite) == "classifier"


def test_head_discovery_order() -> None:
    assert find_head(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))) == "2"
    vgg_like = nn.Sequential()
    vgg_like.add_module("features", nn.Conv2d(3, 3, 1))
    vgg_like.add_module("classifier", nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    assert find_head(vgg_like) == "classifier.1"
    with pytest.raises(ProbeError, match="cannot find the classifier head"):
        find_head(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_unknown_probe_names_are_refused() -> None:
    with pytest.raises(ProbeError, match="unknown probe 'resnet19'"):
        get_probe("resnet19")
    with pytest.raises(ProbeError, match="unknown timm model"):
        get_probe("timm:definitely_not_a_model")


def test_probe_fingerprint_is_the_documented_sha256_of_names_shapes_dtypes_and_bytes() -> None:
    # Artifacts and Fisher-pass checkpoints store this value: it must not drift with the code.
    probe = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    probe[1].register_buffer("empty", torch.zeros(0))
    probe[1].register_buffer("brain_floats", torch.randn(3).to(torch.bfloat16))
    digest = hashlib.sha256()
    for name, tensor in probe.state_dict().items():
        if name.startswith("2."):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        value = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        digest.update(value.contiguous().numpy().tobytes())
    assert probe_fingerprint(probe, exclude="2") == digest.hexdigest()[:32]
    assert probe_fingerprint(probe) != probe_fingerprint(probe, exclude="2")


def test_local_weights_load_by_name_and_by_order(tmp_path) -> None:
    source = get_probe("resnet18", num_classes=5)
    torch.save(source.state_dict(), tmp_path / "named.pt")
    loaded = get_probe("resnet18", weights=tmp_path / "named.pt")
    assert loaded.fc.out_features == 5
    assert probe_fingerprint(loaded) == probe_fingerprint(source)
    exported = [v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")]
    renamed = {f"backbone_{i}": v for i, v in enumerate(exported)}
    torch.save(renamed, tmp_path / "renamed.pt")
    by_order = get_probe("resnet18", num_classes=5, weights=tmp_path / "renamed.pt")
    assert probe_fingerprint(by_order) == probe_fingerprint(source)
    wrong = dict(renamed)
    key = next(iter(wrong))
    wrong[key] = torch.zeros(1)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ProbeError, match="backbone_0"):
        get_probe("resnet18", num_classes=5, weights=tmp_path / "wrong.pt")


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/t2v_pickle_ran", "w"))


def test_weights_that_need_unpickling_code_are_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weight": _Payload()}, path)
    with pytest.raises(ProbeError, match="safely"):
        get_probe("resnet18", weights=path)
    with pytest.raises(ProbeError, match="does not exist"):
        get_probe("resnet18", weights=tmp_path / "missing.pt")


def make_embedding(n: int = 6, seed: int = 0, fingerprint: str = "abc") -> TaskEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return TaskEmbedding(
        torch.rand(n, generator=generator) + 0.1,
        torch.ones(n),
        {"conv": (0, 4), "bn": (4, n)},
        {"probe": "p", "probe_fingerprint": fingerprint, "task_name": f"t{seed}"},
    )


def test_round_trip_and_atomic_write(tmp_path) -> None:
    embedding = make_embedding()
    path = embedding.save(tmp_path / "a.safetensors")
    loaded = TaskEmbedding.load(path)
    assert torch.equal(loaded.hessian, embedding.hessian) and torch.equal(
        loaded.scale, embedding.scale
    )
    assert loaded.layers == embedding.layers and loaded.meta == embedding.meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    with pytest.raises(FileExistsError):
        embedding.save(path, overwrite=False)


def test_loading_refuses_files_that_are_not_artifacts_and_never_unpickles(tmp_path) -> None:
    marker = tmp_path / "ran"
    pickled = tmp_path / "pickle.safetensors"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pickled.write_bytes(pickle.dumps(Evil()))
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(bytes(range(256)) * 4)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    for path in (pickled, random_bytes, other, huge):
        with pytest.raises(EmbeddingFileError):
            TaskEmbedding.load(path)
    with pytest.raises(FileNotFoundError):
        TaskEmbedding.load(tmp_path / "missing.safetensors")
    assert not marker.exists()


def test_newer_format_version_is_refused(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = make_embedding().save(tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    metadata["format_version"] = "99"
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata=metadata)
    with pytest.raises(EmbeddingFileError, match="version"):
        TaskEmbedding.load(tmp_path / "newer.safetensors")


def test_embeddings_from_different_probes_are_not_comparable() -> None:
    with pytest.raises(IncompatibleEmbeddingsError):
        check_comparable(make_embedding(fingerprint="abc"), make_embedding(fingerprint="xyz"))
    with pytest.raises(IncompatibleEmbeddingsError):
        check_comparable(make_embedding(n=6), make_embedding(n=7))
    check_comparable(make_embedding(seed=0), make_embedding(seed=1))


def test_get_probe_picks_its_loader_from_the_prefix_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from t2v_lightning import probe as probe_module

    assert set(probe_module.PROBE_LOADERS) >= {"text:", "timm:"}
    built: list[tuple[str, bool]] = []

    def toy(name: str, pretrained: bool) -> nn.Module:
        built.append((name, pretrained))
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))

    monkeypatch.setitem(probe_module.PROBE_LOADERS, "toy:", toy)
    model = probe_module.get_probe("toy:small", num_classes=3)
    assert built == [("small", False)]
    assert model[1].out_features == 3 and not model.training
    assert probe_module.probe_name(model) == "toy:small"
