"""The early-exit network: segments of a backbone, a head after each cut, a threshold rule.

In eval mode ``forward`` really skips: after each segment its head scores the rows still alive,
those that pass the policy are written to the output and dropped, and the next segment runs on
the survivors only (gathered with boolean indexing, so later blocks see fewer rows; at batch 1 an
exited sample runs nothing more). In train mode it runs everything and returns every head's
logits stacked, (exits + 1, batch, classes), for the joint or distilled loss.

Thresholds and the policy are buffers, so ``state_dict`` carries them; the forward is written in
the TorchScript subset (no break inside the unrolled ModuleList loop: a ``finished`` flag
instead), so ``torch.jit.script`` keeps the control flow (see export.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .policy import exit_mask, exit_one


class ExitHead(nn.Module):
    """Pool a block's output to one vector per row, then a small classifier.

    kind "channels": 1-D / 2-D conv maps are average-pooled to ``bins`` (bins x bins) positions
    and flattened (keeping coarse position, which a global mean loses at early blocks), deeper
    maps averaged, a 2-D input used as is; "tokens": mean over the token dim 1 (batch_first).
    (Hugging Face BERT exits pool their own way first: ``hf_bert.BertExitHead``.)"""

    def __init__(self, kind: str, in_features: int, num_classes: int, hidden: int = 0, bins: int = 1):
        super().__init__()
        self.tokens = kind == "tokens"
        self.bins = bins
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden or in_features, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            h = h.mean(dim=1)
        elif h.dim() == 3:
            if h.shape[2] % self.bins == 0:  # the same mean as adaptive pooling, about 2x faster on CPU
                h = h.reshape(h.shape[0], h.shape[1], self.bins, h.shape[2] // self.bins).mean(dim=3).flatten(1)
            else:
                h = torch.nn.functional.adaptive_avg_pool1d(h, self.bins).flatten(1)
        elif h.dim() == 4:
            h = torch.nn.functional.adaptive_avg_pool2d(h, self.bins).flatten(1)
        elif h.dim() > 4:
            h = h.flatten(2).mean(dim=2)
        if self.training or torch.jit.is_scripting():
            return self.classifier(h)
        # eager eval: the same layers called functionally; at batch 1 the Sequential's four
        # module calls cost as much as the two matmuls (measured 17 vs 11 us, 256-64-10 head)
        for layer in self.classifier:
            if isinstance(layer, nn.Linear):
                h = torch.nn.functional.linear(h, layer.weight, layer.bias)
            else:
                h = torch.relu(h)
        return h


class ExitStage(nn.Module):
    """One backbone segment and the exit head after it."""

    def __init__(self, segment: nn.Module, head: nn.Module):
        super().__init__()
        self.segment, self.head = segment, head

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.segment(h)
        return h, self.head(h)


class EarlyExitModel(nn.Module):
    """stages[0..E-1] (segment + head), then the final segment (the rest of the backbone).

    Buffers: ``thresholds`` (E,), ``policy`` (0 maxprob, 1 entropy, 2 patience; see policy.py).
    ``freeze_backbone``: in train mode the segments stay in eval mode (BatchNorm statistics and
    dropout of the frozen backbone untouched) while the heads train."""

    freeze_backbone: bool

    def __init__(self, segments: list[nn.Module], heads: list[nn.Module], policy: int, thresholds: list[float],
                 cut_names: list[str] | None = None):
        super().__init__()
        self.stages = nn.ModuleList([ExitStage(s, h) for s, h in zip(segments[:-1], heads)])
        self.final = segments[-1]
        self.register_buffer("policy", torch.tensor(policy, dtype=torch.long))
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float64))
        self.cut_names = list(cut_names or [])
        self.freeze_backbone = False

    @torch.jit.unused
    def prepare(self, inputs: torch.Tensor) -> torch.Tensor:
        """A batch's inputs as the first segment takes them (BertExitModel packs a dict)."""
        return inputs

    @torch.jit.unused
    def segment_list(self) -> list[nn.Module]:
        return [s.segment for s in self.stages] + [self.final]

    @torch.jit.unused
    def head_list(self) -> list[nn.Module]:
        return [s.head for s in self.stages]

    @torch.jit.unused
    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for seg in self.segment_list() for p in seg.parameters()]

    def train(self, mode: bool = True) -> EarlyExitModel:
        super().train(mode)
        if self.freeze_backbone:
            for seg in self.segment_list():
                seg.eval()
        return self

    def all_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's logits and the final logits, stacked: (E + 1, batch, classes)."""
        outs: list[torch.Tensor] = []
        h = x
        for stage in self.stages:
            h = stage.segment(h)
            outs.append(stage.head(h))
        outs.append(self.final(h))
        return torch.stack(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.all_logits(x)
        return self.forward_with_exits(x)[0]

    @torch.jit.export
    def forward_with_exits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, exit index per row; len(stages) = ran to the end)."""
        if torch.jit.is_scripting():
            policy = int(self.policy.item())
            # float32-exact thresholds: exit_mask compares float32 scores with them in float32
            thresholds: list[float] = self.thresholds.float().tolist()
        else:
            policy, thresholds = self._rule()
        if x.shape[0] == 1 and policy != 2:
            return self._forward_one(x, policy, thresholds)
        n = x.shape[0]
        where = torch.full((n,), len(self.stages), dtype=torch.long, device=x.device)
        prev = torch.full((n,), -1, dtype=torch.long, device=x.device)
        streak = torch.zeros(n, dtype=torch.long, device=x.device)
        # out and rows are made at the first exit: while no row has left, nothing is copied
        # or regrouped, so a batch that runs to the end costs the segments, heads and tests only
        out = torch.empty(0)
        rows = torch.empty(0, dtype=torch.long)
        regrouped = False
        h = x
        finished = False
        i = 0
        for stage in self.stages:
            if not finished:
                h = stage.segment(h)
                logits = stage.head(h)
                done, prev, streak = exit_mask(logits, policy, thresholds[i], prev, streak)
                hit = done.nonzero().squeeze(1)
                if hit.numel() > 0:
                    if not regrouped:
                        out = torch.zeros((n, logits.shape[-1]), dtype=logits.dtype, device=logits.device)
                        rows = torch.arange(n, device=x.device)
                        regrouped = True
                    # one nonzero per side, then index_select: cheaper than repeated boolean masks
                    dest = rows.index_select(0, hit)
                    out.index_copy_(0, dest, logits.index_select(0, hit).to(out.dtype))
                    where.index_fill_(0, dest, i)
                    keep = (~done).nonzero().squeeze(1)
                    if keep.numel() > 0:
                        rows, h = rows.index_select(0, keep), h.index_select(0, keep)
                        if policy == 2:
                            prev, streak = prev.index_select(0, keep), streak.index_select(0, keep)
                    else:
                        finished = True
            i += 1  # noqa: SIM113 - TorchScript unrolls ModuleList loops; enumerate + flag is clumsier
        if finished:
            return out, where
        h = self.final(h)
        if not regrouped:
            return h, where
        out.index_copy_(0, rows, h.to(out.dtype))
        return out, where

    @torch.jit.unused
    def _rule(self) -> tuple[int, list[float]]:
        """(policy, float32-exact thresholds) as Python values, read from the buffers again only
        when one changed (version counter or storage): .item() + .tolist() on every call cost
        ~5 us, about 1% of this CNN's batch-1 latency."""
        policy, thresholds = self._buffers["policy"], self._buffers["thresholds"]
        try:
            versions = (policy._version, thresholds._version)
        except RuntimeError:  # inference tensors keep no version counter: read every time
            return int(policy.item()), thresholds.float().tolist()
        c = self.__dict__.get("_rule_cache")
        # the cache keeps the buffer tensors themselves, so "is" cannot match a new buffer that
        # reused a freed one's address; an in-place write (fill_, load_state_dict) bumps _version
        if c is None or c[0] is not policy or c[1] is not thresholds or c[2] != versions:
            c = (policy, thresholds, versions, int(policy.item()), thresholds.float().tolist())
            self.__dict__["_rule_cache"] = c
        return c[3], c[4]

    def _forward_one(self, x: torch.Tensor, policy: int, thresholds: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch 1 (maxprob / entropy): the same rule without the regrouping bookkeeping, the
        test read as one Python bool (policy.exit_one)."""
        h = x
        out = torch.empty(0)
        at = len(self.stages)
        i = 0
        for stage in self.stages:
            if at == len(self.stages):
                h = stage.segment(h)
                logits = stage.head(h)
                if exit_one(logits, policy, thresholds[i]):
                    out, at = logits, i
            i += 1  # noqa: SIM113 - see forward_with_exits
        if at == len(self.stages):
            out = self.final(h)
        return out, torch.full((1,), at, dtype=torch.long, device=x.device)
