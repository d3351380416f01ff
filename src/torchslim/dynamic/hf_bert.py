"""Early exits on Hugging Face BERT classifiers (``BertForSequenceClassification`` and the like).

Such a model takes dict inputs (``input_ids``, ``attention_mask``, ``token_type_ids``) and its
forward is not traceable by torch.fx, so split.py cannot cut it. Here the cut is read from the
model's known structure instead: ``model.bert`` (embeddings, ``encoder.layer[i]``, pooler),
``model.dropout`` and ``model.classifier``; an exit can follow any ``bert.encoder.layer.N``
but the last. What crosses a cut is the hidden states *and* the attention mask; both travel
packed in one tensor, the mask as one extra channel, ``(batch, tokens, hidden + 1)``, so that
EarlyExitModel's regrouping (``index_select`` on dim 0) keeps each row's mask with its hidden
states and the exit loop stays the one of model.py. The first segment takes the inputs packed
the same way, ``(batch, tokens, 3)``: ids, mask, token types (``BertExitModel.pack``). A later
segment first drops the trailing columns that are padding in every row it got, so the rows
left after an exit run at their own longest length, not at the length of the batch they came in.

Each segment rebuilds the attention mask for its layers with transformers' own
``create_bidirectional_mask`` (what ``BertModel`` does), so a model that never exits computes
what the original computes. A head reads its layer's [CLS] token (as BERT's pooler does) and the
mean of the real tokens (``BertExitHead``: early [CLS] features can carry nothing).

Not covered: decoders / cross-attention, models whose classifier is not ``bert`` + ``dropout``
+ ``classifier``, TorchScript export (Hugging Face layers do not script; the stage says so).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from .model import EarlyExitModel, ExitHead


def is_bert_classifier(model: nn.Module) -> bool:
    bert = getattr(model, "bert", None)
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    return (isinstance(layers, nn.ModuleList) and hasattr(bert, "embeddings") and getattr(bert, "pooler", None) is not None
            and isinstance(getattr(model, "classifier", None), nn.Module))


class BertSegment(nn.Module):
    """Embeddings (first segment only), some encoder layers, and pooler + dropout + classifier
    (last segment only). Input and output packed as described in the module doc."""

    def __init__(self, config: Any, layers: list[nn.Module], embeddings: nn.Module | None = None,
                 tail: tuple[nn.Module, nn.Module, nn.Module] | None = None):
        super().__init__()
        self.config = config
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.pooler, self.dropout, self.classifier = tail if tail is not None else (None, None, None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        if self.embeddings is not None:
            ids, mask, types = h.unbind(-1)
            hidden = self.embeddings(input_ids=ids, token_type_ids=types)
        else:
            hidden, mask = h[..., :-1], h[..., -1].to(torch.long)
            if hidden.shape[1] > 1 and not bool(mask[:, -1].any()):
                # the rows left after an exit may all be shorter than the batch was padded to:
                # drop the columns that are padding in every row (masked keys, same result)
                cols = mask.any(0).nonzero()
                keep = int(cols[-1]) + 1 if cols.numel() else 1
                hidden, mask = hidden[:, :keep], mask[:, :keep]
            hidden = hidden.contiguous()  # one copy here, not one per Linear that reads the strided view
        ext = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in self.layers:
            hidden = layer(hidden, ext)
        if self.classifier is not None:
            return self.classifier(self.dropout(self.pooler(hidden)))
        return torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1)


class BertExitHead(nn.Module):
    """An exit head on a packed BERT state: the [CLS] features and the mean of the real tokens'
    features (the mask channel says which), concatenated, then ExitHead's classifier. [CLS] alone
    is not enough: in a mean-pooled sentence encoder (the bundled all-MiniLM-L6-v2, fine-tuned as
    a classifier) [CLS] after layers 0-2 is the same for every sentence (std 0.001 across rows)
    and a linear probe on it scores the majority class (16%), while one on the token mean scores
    76% after layer 0 (benchmarks/b10_minilm.py)."""

    def __init__(self, width: int, num_classes: int, hidden: int = 0):
        super().__init__()
        self.head = ExitHead("channels", 2 * width, num_classes, hidden)  # a 2-D input goes in as is

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x, m = h[..., :-1], h[..., -1:]
        mean = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return self.head(torch.cat([x[:, 0], mean], dim=-1))


class BertExitModel(EarlyExitModel):
    """EarlyExitModel called like the BERT classifier: ``model(input_ids, attention_mask, ...)``.
    ``forward_with_exits`` takes the same dict (or an already packed tensor)."""

    @staticmethod
    def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             token_type_ids: torch.Tensor | None = None, **unused: Any) -> torch.Tensor:
        if unused:
            raise TypeError(f"BertExitModel takes input_ids, attention_mask, token_type_ids; got also {sorted(unused)}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.to(input_ids.dtype)
        return torch.stack([input_ids, mask, types], dim=-1)

    def prepare(self, inputs: Any) -> torch.Tensor:
        return self.pack(**inputs) if isinstance(inputs, Mapping) else inputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,  # type: ignore[override]
                token_type_ids: torch.Tensor | None = None, **unused: Any) -> torch.Tensor:
        return super().forward(self.pack(input_ids, attention_mask, token_type_ids, **unused))

    def forward_with_exits(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return super().forward_with_exits(self.prepare(x))


def split_bert(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> tuple[list[BertSegment], list[str]]:
    """Segments of a BERT classifier cut after the selected ``bert.encoder.layer.N`` (fnmatch)."""
    bert = model.bert
    if getattr(bert.config, "is_decoder", False) or getattr(bert.config, "add_cross_attention", False):
        raise ConfigError("ExitConfig: early exits on BERT support encoders only (is_decoder / cross-attention is set)")
    layers = list(bert.encoder.layer)
    names = [f"bert.encoder.layer.{i}" for i in range(len(layers))]
    chosen = [i for i, n in enumerate(names[:-1]) if any(fnmatch.fnmatchcase(n, p) for p in include)
              and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not chosen:
        raise ConfigError(f"ExitConfig.layers: no BERT layer to put an exit after matches {list(include)} "
                          f"(minus exclude {list(exclude)}); blocks found: {names[:-1] or 'none'}")
    bounds = [0] + [i + 1 for i in chosen] + [len(layers)]
    segments = []
    for k in range(len(bounds) - 1):
        first, last = k == 0, k == len(bounds) - 2
        segments.append(BertSegment(bert.config, layers[bounds[k]:bounds[k + 1]], bert.embeddings if first else None,
                                    (bert.pooler, model.dropout, model.classifier) if last else None))
    return segments, [names[i] for i in chosen]


def build_bert(model: nn.Module, cfg: Any, example: Mapping[str, torch.Tensor]) -> BertExitModel:
    """An untrained, never-exiting BertExitModel around a copy of the BERT classifier."""
    import copy

    from ..core.utils import model_device, seed_everything, to_device
    from .policy import NEVER, POLICIES
    from .split import feature_shapes

    device = model_device(model)
    backbone = copy.deepcopy(model).eval()
    segments, cuts = split_bert(backbone, cfg.layers.include, cfg.layers.exclude)
    shapes = feature_shapes(segments, BertExitModel.pack(**to_device(dict(example), device)))
    if len(shapes[-1]) != 2:
        raise ConfigError(f"ExitConfig: the BERT classifier outputs shape {tuple(shapes[-1])}; early exits need (batch, classes) logits")
    seed_everything(cfg.seed)
    width, classes = int(shapes[0][-1]) - 1, int(shapes[-1][1])
    heads = [BertExitHead(width, classes, cfg.head_hidden) for _ in cuts]
    never = -NEVER if cfg.policy == "entropy" else NEVER
    ee = BertExitModel(segments, heads, POLICIES[cfg.policy], [never] * len(heads), cuts)
    return ee.to(device).train(model.training)
