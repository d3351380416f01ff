"""Transfer learning, then compression: MiniLM -> topic classifier -> low-rank FFNs -> distill.

The new task is built offline from installed text: the first sentences of Python standard-
library docstrings, labelled by the topic of the module they come from (network, files, data,
math, concurrency). Steps:

1. pretrained all-MiniLM-L6-v2 (bundled) + a new Linear head;
2. frozen encoder, head only (a few epochs), then everything unfrozen at a small LR;
3. compress: every FFN Linear of the encoder factorized by SVD to half its MACs (lowrank);
4. recover with distillation from the uncompressed fine-tuned model (distill).

    HF_HUB_OFFLINE=1 python examples/transfer_minilm.py            # ~2 min on 2 idle cores
    HF_HUB_OFFLINE=1 python examples/transfer_minilm.py --smoke    # seconds (tests use it)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import inspect
import json
import re
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchslim.distillation import DistillConfig
from torchslim.lowrank import LowRankConfig
from torchslim.core.measure import count_macs, state_dict_bytes
from torchslim.core.stage import apply_stage
from torchslim.core.task import Task
from torchslim.core.train import TrainConfig, fit
from torchslim.zoo.minilm import EMBED_DIM, load_minilm, load_tokenizer

TOPICS = {
    "network": "socket http.client http.server urllib.request smtplib ftplib imaplib poplib ssl",
    "files": "os pathlib shutil tempfile glob zipfile tarfile filecmp fileinput",
    "data": "json csv pickle plistlib configparser xml.dom.minidom xml.etree.ElementTree sqlite3",
    "math": "decimal fractions statistics random numbers math cmath",
    "concurrency": "threading asyncio concurrent.futures queue subprocess selectors sched signal",
}


def docstring_leads(module_name: str) -> set[str]:
    """First paragraphs of a module's own docstrings that read as English sentences."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    owners = [module] + [o for o in vars(module).values()
                         if (inspect.isclass(o) or inspect.isroutine(o)) and getattr(o, "__module__", None) == module_name]
    owners += [m for o in owners if inspect.isclass(o) for m in vars(o).values() if inspect.isroutine(m)]
    found = set()
    for obj in owners:
        doc = getattr(obj, "__doc__", None)
        lead = " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split()) if isinstance(doc, str) and doc.strip() else ""
        if 20 <= len(lead) <= 300 and lead[0].isupper() and lead.endswith(".") and not re.search(r">>>|::|->", lead):
            found.add(lead)
    return found


def topic_sentences(per_topic: int) -> tuple[list[str], list[int]]:
    """Up to per_topic docstring leads per topic, in a fixed (hash) order."""
    texts, labels = [], []
    for label, mods in enumerate(TOPICS.values()):
        found = set().union(*(docstring_leads(m) for m in mods.split()))
        chosen = sorted(found, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:per_topic]
        texts += chosen
        labels += [label] * len(chosen)
    return texts, labels


class _Encoded(Dataset):
    def __init__(self, enc: dict[str, torch.Tensor], labels: torch.Tensor):
        self.enc, self.labels = enc, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: v[i] for k, v in self.enc.items()}, self.labels[i]


def topic_task(per_topic: int = 100, max_length: int = 32, batch_size: int = 32, seed: int = 0) -> Task:
    """A 5-class Task of tokenized sentences, stratified 60/20/20."""
    from sklearn.model_selection import train_test_split

    texts, labels = topic_sentences(per_topic)
    idx = list(range(len(texts)))
    tr, te = train_test_split(idx, test_size=0.2, stratify=labels, random_state=seed)
    tr, va = train_test_split(tr, test_size=0.25, stratify=[labels[i] for i in tr], random_state=seed)
    tok = load_tokenizer()

    def loader(ids: list[int], shuffle: bool) -> DataLoader:
        enc = tok([texts[i] for i in ids], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        ds = _Encoded(enc, torch.tensor([labels[i] for i in ids]))
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)

    return Task(name="stdlib-topics", train=loader(tr, True), val=loader(va, False), test=loader(te, False),
                num_classes=len(TOPICS))


class Classifier(nn.Module):
    """Pretrained sentence encoder (mean-pooled, normalized) + a new Linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(EMBED_DIM, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # normalized embeddings are small; scale so the head's logits can grow at a usual LR
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids) * 10.0)


def ffn_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(("intermediate.dense", "output.dense"))
            and ".attention." not in n]


def row(name: str, model: nn.Module, task: Task) -> dict[str, Any]:
    inputs = task.example_inputs(1)
    return {"step": name, "accuracy": round(task.evaluate(model), 4), "macs": count_macs(model, inputs),
            "bytes": state_dict_bytes(model)}


def main(smoke: bool = False) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    task = topic_task(per_topic=8 if smoke else 100, max_length=16 if smoke else 32)
    steps = {"max_steps": 1} if smoke else {}
    model = Classifier(load_minilm().train(), task.num_classes)
    rows = []
    # 1. frozen encoder: only the head learns (fit optimizes parameters that require grad)
    model.encoder.requires_grad_(False)
    fit(model, task, TrainConfig(epochs=1 if smoke else 4, lr=1e-2, **steps))
    rows.append(row("head only (frozen encoder)", model, task))
    # 2. unfreeze everything, small LR
    model.encoder.requires_grad_(True)
    fit(model, task, TrainConfig(epochs=1 if smoke else 2, lr=3e-5, optimizer="AdamW",
                                optimizer_kwargs={"foreach": True}, **steps))
    rows.append(row("fine-tuned (unfrozen)", model, task))
    teacher = copy.deepcopy(model).eval()
    # 3. compress: the FFN Linears to half their MACs by truncated SVD
    res = apply_stage(model, LowRankConfig(params_keep=0.5, layers=ffn_layers(model)), task)
    rows.append(row("low-rank FFNs (no training)", res.model, task))
    # 4. recover by distillation from the uncompressed fine-tuned model
    cfg = DistillConfig(teacher=teacher, temperature=2.0, alpha=0.7,
                        finetune=TrainConfig(epochs=1 if smoke else 2, lr=5e-5, optimizer="AdamW", **steps))
    res = apply_stage(res.model, cfg, task)
    rows.append(row("low-rank + distilled", res.model, task))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny data and budgets (seconds)")
    args = ap.parse_args()
    for r in main(args.smoke):
        print(json.dumps(r))
