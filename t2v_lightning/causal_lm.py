"""A ``transformers`` causal language model and its tokenizer as a Task2Vec probe.

:func:`lm_probe` is what ``get_probe("lm:<directory or hub id>")`` calls; the embedding of a
language-model task is computed in :mod:`t2v_lightning.lm`. This module imports nothing of the
package, so that :mod:`t2v_lightning.probe` can build the probe without an import cycle.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["CausalLMProbe", "is_language_model", "lm_probe", "position_ids_from_mask"]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among its sequence's real tokens (0 at padded positions).

    Left, right or no padding give a real token the same position, so the model sees the same
    positions (``position_ids`` passed to it) and labels are drawn with the same keys.
    """
    mask = attention_mask.to(torch.int64)
    return (mask.cumsum(-1) - 1).clamp_(min=0) * mask


class CausalLMProbe(nn.Module):
    """A ``transformers`` causal language model and its tokenizer, used as a Task2Vec probe.

    Args:
        model: an ``AutoModelForCausalLM`` model (GPT-2, Llama, ...).
        tokenizer: its tokenizer (``None`` when the model came without one).
        source: where it was loaded from (a hub id or a directory).

    ``forward(input_ids, attention_mask)`` returns the model's own next-token logits (positions
    from the mask). The embedding covers :attr:`body` (the model without its LM head).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, source: str = "") -> None:
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self.source = source
        self.model.eval()

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer."""
        if self._tokenizer is None:
            raise ValueError(
                f"the language model {self.source!r} came without a tokenizer (none found in its "
                "directory); save one there with tokenizer.save_pretrained"
            )
        return self._tokenizer

    @property
    def body(self) -> nn.Module:
        """The model without its LM head (``model.transformer`` for GPT-2, ``model.model`` for Llama)."""
        body: nn.Module = getattr(self.model, "base_model")  # noqa: B009 (typed as Tensor | Module)
        return body

    @property
    def body_prefix(self) -> str:
        """Qualified name of :attr:`body` inside :attr:`model`, with a trailing dot."""
        prefix = str(getattr(self.model, "base_model_prefix", ""))
        return f"{prefix}." if prefix and hasattr(self.model, prefix) else ""

    @property
    def lm_head(self) -> nn.Linear:
        """The LM head (possibly tied to the token table; only copies of it are ever fitted)."""
        head = getattr(self.model, "get_output_embeddings")()  # noqa: B009
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"the LM head of {self.source!r} is a {type(head).__name__}, not an nn.Linear"
            )
        return head

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head: the number of tokens a position can take."""
        return int(self.lm_head.weight.shape[0])

    def get_classifier(self) -> nn.Module:
        """The LM head (timm's interface, used by :func:`~t2v_lightning.find_head`)."""
        return self.lm_head

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after the last norm), positions counted over real tokens."""
        output = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return output.last_hidden_state  # type: ignore[no-any-return]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits of the model's own head (B × T × V)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits: torch.Tensor = self.lm_head(self.hidden_states(input_ids, attention_mask))
        return logits


def is_language_model(probe: nn.Module) -> bool:
    """Whether ``probe`` is a causal-LM probe (from ``get_probe("lm:...")``)."""
    return isinstance(probe, CausalLMProbe)


def lm_probe(source: str) -> CausalLMProbe:
    """Load a causal language model and its tokenizer (``get_probe("lm:<source>")``).

    Args:
        source: a local ``save_pretrained`` directory (read offline), or a hub id (downloaded
            when online, else read from the cache).

    Returns:
        The probe in eval mode, float32.

    Raises:
        ValueError: transformers missing, or no causal language model at ``source``.
    """
    if not isinstance(source, str) or not source:
        raise ValueError("the language model after 'lm:' must be a directory or a hub id")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError(
            "language-model probes need transformers: pip install 't2v-lightning[lm]'"
        ) from err
    local = os.path.isdir(source)
    if not local and (os.sep in source.rstrip("/").split("/", 1)[-1] or source.startswith(".")):
        raise ValueError(f"lm:{source}: no such directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        where = "directory" if local else "hub id (offline: only cached models load)"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"lm:{source}: cannot load a causal language model from this {where}: {first}"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return CausalLMProbe(model, tokenizer, source)
