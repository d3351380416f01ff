"""Hand-made gallery models: attention, recurrent, tied, custom-layer and odd-output modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_TRAIN, N_TEST, BATCH = 16, 16, 8
VOCAB, SEQ, CLASSES = 64, 8, 4


# ----------------------------------------------------------------------------- hand-made models
class SeqClassifier(nn.Module):
    """(B, T, D) -> mean over time -> classes; wraps an encoder returning (B, T, D)."""

    def __init__(self, body: nn.Module, d: int = 16, classes: int = CLASSES):
        super().__init__()
        self.body, self.head = body, nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.body(x).mean(1))


class MHABlock(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.norm(x + a).mean(1))


class RNNClassifier(nn.Module):
    def __init__(self, kind: str, d: int = 16, h: int = 24):
        super().__init__()
        self.rnn = getattr(nn, kind)(d, h, num_layers=1, batch_first=True)
        self.head = nn.Linear(h, CLASSES)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TiedLM(nn.Module):
    """Embedding tied to the output head (weight tying as in GPT-2 / AWD-LSTM)."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.emb(ids))))


class TiedParams(nn.Module):
    """Two Linears holding one Parameter (an autoencoder-style tie, same shape)."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


class UsedTwice(nn.Module):
    """One Linear module registered under two names and called twice."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.shared = nn.Linear(d, d)
        self.again = self.shared
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        x = torch.relu(self.shared(x))
        return self.head(torch.relu(self.again(x)) + x)


class MyLinear(nn.Module):
    """A custom layer with its own Parameters and a buffer, calling F.linear itself."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.gain = nn.Parameter(torch.ones(o))
        self.register_buffer("offset", torch.zeros(o))

    def forward(self, x):
        return F.linear(x, self.w) * self.gain + self.offset


class CustomLayers(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.mine = MyLinear(d, d)
        self.register_buffer("center", torch.zeros(d))
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.mine(torch.relu(self.fc(x - self.center)))))


class TupleOut(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, CLASSES)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.head(h), h


class DictOut(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, CLASSES)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return {"logits": self.head(h), "hidden": h}


class OneFeature(nn.Module):
    """A regressor-style MLP whose first layer is Linear(1, 64)."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(1, 64), nn.Linear(64, CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.inp(x)))


class _EdgeMLP(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


class DictIn(nn.Module):
    """Takes keyword inputs (a batch's inputs are a dict): model(**{"a": ..., "b": ...})."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.fa, self.fb = nn.Linear(d, 32), nn.Linear(d, 32)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, a, b):
        return self.head(torch.relu(self.fa(a) + self.fb(b)))
