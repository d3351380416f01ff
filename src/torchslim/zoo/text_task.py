"""A bundled text classification task on real English, and a MiniLM classifier for it (offline).

Task ``text_topics``: which *topic* a sentence of Python standard-library documentation is
about. The sentences are the first paragraphs of the docstrings of each module's own classes,
functions and methods (the zoo's MiniLM sentence extraction and prose filter, zoo/minilm.py), and
the label is the topic of the module they come from: the five topics of the repository's
transfer-learning example (examples/transfer_minilm.py: network, files, data, math,
concurrency), each with more modules, plus three more (logging/debugging, code
introspection, e-mail), so that every class has >= 100 sentences and the test split is a
few hundred. Labelling by topic rather than by single module keeps the task learnable from the
text (two modules of one topic share vocabulary), yet not trivial: many sentences are generic
("Return the number of items.") and a sentence found under two topics is dropped as ambiguous.
It is real text on every machine with this Python and nothing is downloaded; the split is
stratified (60/20/20 by default, ``sklearn.model_selection.train_test_split``, ``seed``).

Inputs are dicts of ``input_ids``, ``attention_mask`` and ``token_type_ids`` (the bundled
WordPiece tokenizer), each batch right-padded to its own longest sentence (``pad_batch``): what a
Hugging Face ``BertForSequenceClassification`` takes and what dynamic/hf_bert.py's early exits
expect. Batches group sentences of similar length (``LengthBatches``), so little goes to padding.

Model ``minilm_classifier``: ``BertForSequenceClassification`` whose ``bert`` carries the
bundled pretrained all-MiniLM-L6-v2 weights (pooler included), with a fresh, seeded classifier.

``packed_task`` / ``PackedClassifier``: the same data with one tensor per batch (ids, mask,
types stacked on the last dim, as ``BertExitModel.pack``), for stages that need tensor inputs
(``torchslim.cascade``). PackedClassifier drops trailing columns that are padding in every row
before the model runs: a row subset (the inputs a cascade sends on) then runs at its own length.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.errors import check
from ..core.task import Task
from . import MODELS, TASKS

# topic -> modules (asyncio, concurrent.futures: the submodules that define their classes and
# functions, whose docstrings the package itself does not own); imported only to read docstrings
TOPICS: dict[str, tuple[str, ...]] = {
    "network": ("socket", "socketserver", "ssl", "selectors", "http.client", "http.server", "http.cookies",
                "urllib.request", "urllib.parse", "smtplib", "ftplib", "imaplib", "poplib", "xmlrpc.client"),
    "files": ("os", "pathlib", "shutil", "tempfile", "glob", "fnmatch", "filecmp", "fileinput", "zipfile",
              "tarfile", "gzip", "bz2", "lzma", "zipimport"),
    "data": ("json", "csv", "pickle", "shelve", "plistlib", "configparser", "xml.dom.minidom",
             "xml.etree.ElementTree", "sqlite3", "codecs", "base64", "quopri", "struct"),
    "math": ("decimal", "fractions", "statistics", "random", "numbers", "math", "cmath"),
    "concurrency": ("threading", "queue", "subprocess", "sched", "signal", "asyncio.events", "asyncio.base_events",
                    "asyncio.tasks", "asyncio.locks", "asyncio.queues", "asyncio.streams", "concurrent.futures._base",
                    "multiprocessing.pool", "multiprocessing.managers", "multiprocessing.connection"),
    "debugging": ("logging", "logging.handlers", "traceback", "pdb", "tracemalloc", "pstats", "timeit",
                  "trace", "warnings", "faulthandler", "cProfile"),
    "introspection": ("inspect", "typing", "ast", "dis", "types", "abc", "dataclasses", "enum"),
    "email": ("mailbox", "email.message", "email.utils", "email.header", "email.parser", "mimetypes"),
}


def _module_sentences(name: str) -> set[str]:
    """Docstring leads of one module that pass the zoo's prose filter (empty if not importable)."""
    from .minilm import _docstring_owners, _is_prose

    try:
        module = importlib.import_module(name)
    except ImportError:  # a module missing on this build is skipped
        return set()
    found = set()
    for obj in _docstring_owners(module):
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str):
            lead = " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())
            if _is_prose(lead):
                found.add(lead)
    return found


@functools.lru_cache(maxsize=1)
def texts_and_labels() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Every sentence with its topic index (position in TOPICS); sentences found under two topics
    are dropped. Order: by topic, then by SHA-256 of the text (fixed for a given Python)."""
    per_topic = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mods in TOPICS.values():
            per_topic.append(set().union(*(_module_sentences(m) for m in mods)))
    seen: dict[str, int] = {}
    for found in per_topic:
        for s in found:
            seen[s] = seen.get(s, 0) + 1
    texts: list[str] = []
    labels: list[int] = []
    for label, found in enumerate(per_topic):
        keep = sorted((s for s in found if seen[s] == 1), key=lambda s: hashlib.sha256(s.encode()).hexdigest())
        texts += keep
        labels += [label] * len(keep)
    return tuple(texts), tuple(labels)


def split_indices(labels: list[int] | tuple[int, ...], val_fraction: float, test_fraction: float,
                  seed: int) -> tuple[list[int], list[int], list[int]]:
    """Stratified (train, val, test) indices into labels; deterministic given seed."""
    from sklearn.model_selection import train_test_split

    idx = list(range(len(labels)))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=list(labels), random_state=seed)
    val_share = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=[labels[i] for i in rest], random_state=seed)
    return train, val, test


class _Tokenized(Dataset):
    """Token-id lists (unpadded) and labels; ``pad_batch`` pads each batch to its longest row."""

    def __init__(self, ids: list[list[int]], labels: list[int]):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], self.labels[i]


def pad_batch(items: list[tuple[list[int], int]], pad_id: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Right-pad token-id lists to the longest in the batch: BERT's dict inputs and the labels."""
    n = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for r, (ids, _) in enumerate(items):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[r, : len(ids)] = 1
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}, labels


class LengthBatches(Sampler):
    """Batches of rows of similar length, so little compute goes to padding.

    Eval (``generator=None``): rows sorted by length, batched, starting with the batch that holds
    the median length (so ``Task.example_inputs`` sees a typical batch, as the minilm task does).
    Train: each epoch the rows are permuted with ``generator`` (fit reseeds it from
    ``TrainConfig.seed``), sorted by length within pools of 8 batches, and the batches shuffled.
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator | None = None):
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        n, bs = len(self.lengths), self.batch_size
        if self.generator is None:
            order = sorted(range(n), key=lambda i: (self.lengths[i], i))
            batches = [order[i : i + bs] for i in range(0, n, bs)]
            m = (n // 2) // bs
            yield from batches[m:] + batches[:m]
            return
        perm = torch.randperm(n, generator=self.generator).tolist()
        batches = []
        for start in range(0, n, 8 * bs):
            pool = sorted(perm[start : start + 8 * bs], key=lambda i: self.lengths[i])
            batches += [pool[i : i + bs] for i in range(0, len(pool), bs)]
        for j in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[j]


def make_loader(ids: list[list[int]], labels: list[int], batch_size: int, shuffle_seed: int | None = None,
                pad_id: int = 0) -> DataLoader:
    """A loader of padded dict batches over token-id lists (LengthBatches; shuffled when seeded)."""
    gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    sampler = LengthBatches([len(x) for x in ids], batch_size, gen)
    return DataLoader(_Tokenized(ids, labels), batch_sampler=sampler, generator=gen,
                      collate_fn=functools.partial(pad_batch, pad_id=pad_id))


def text_topics(max_length: int = 64, batch_size: int = 32, seed: int = 0, val_fraction: float = 0.2,
                test_fraction: float = 0.2) -> Task:
    """The stdlib-docstring topic task (module doc): 8 classes, stratified splits, train shuffled
    with ``seed``; batches of similar-length sentences (``LengthBatches``) padded to their longest
    (at most ``max_length`` tokens). ``task.<split>.dataset`` keeps the split's rows in split order."""
    check(8 <= max_length <= 512, "text_topics.max_length", f"must be in [8, 512] (BERT positions), got {max_length!r}")
    check(1 <= batch_size <= 65_536, "text_topics.batch_size", f"must be in [1, 65536], got {batch_size!r}")
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        check(isinstance(v, float) and 0.05 <= v <= 0.45, f"text_topics.{name}", f"must be a float in [0.05, 0.45], got {v!r}")
    from .minilm import load_tokenizer

    texts, labels = texts_and_labels()
    train, val, test = split_indices(labels, val_fraction, test_fraction, seed)
    tok = load_tokenizer()
    ids = tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad = int(tok.pad_token_id or 0)

    def loader(rows: list[int], shuffle: bool) -> DataLoader:
        return make_loader([ids[i] for i in rows], [labels[i] for i in rows], batch_size, seed if shuffle else None, pad)

    return Task(name="text-topics", train=loader(train, True), val=loader(val, False), test=loader(test, False),
                num_classes=len(TOPICS))


def minilm_classifier(num_classes: int = len(TOPICS), dropout: float = 0.1, seed: int = 0) -> nn.Module:
    """BertForSequenceClassification: the bundled pretrained MiniLM as ``bert`` (same config, its
    pooler kept), a fresh classifier (normal(0, 0.02) from ``seed``, zero bias), fp32, train mode."""
    check(isinstance(num_classes, int) and 2 <= num_classes <= 100_000, "minilm_classifier.num_classes",
          f"must be an integer in [2, 100000], got {num_classes!r}")
    check(isinstance(dropout, float) and 0.0 <= dropout < 1.0, "minilm_classifier.dropout", f"must be in [0, 1), got {dropout!r}")
    from ..core.compat import import_torchvision
    from .minilm import model_dir

    import_torchvision()  # transformers imports it when installed; see compat.py
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized": it is, on purpose
    try:
        model = BertForSequenceClassification.from_pretrained(
            str(model_dir()), local_files_only=True, num_labels=num_classes,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    finally:
        hf_logging.set_verbosity(verbosity)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
        model.classifier.bias.zero_()
    return model.float().train()


# ---------------------------------------------------------------------------- packed form
def pack(inputs: dict[str, Tensor]) -> Tensor:
    """(batch, tokens, 3): ids, mask, token types (the layout of BertExitModel.pack)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    types = inputs.get("token_type_ids", torch.zeros_like(ids))
    return torch.stack([ids, mask.to(ids.dtype), types.to(ids.dtype)], dim=-1)


class PackedClassifier(nn.Module):
    """A BERT classifier called with one packed tensor; returns logits. Trailing columns that are
    padding in every row are dropped first (the same result: padded keys are masked out)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        mask = x[..., 1]
        if x.shape[1] > 1 and not bool(mask[:, -1].any()):
            x = x[:, : int(mask.any(0).nonzero().max()) + 1]
        return self.model(input_ids=x[..., 0], attention_mask=x[..., 1], token_type_ids=x[..., 2]).logits


def packed_task(task: Task) -> Task:
    """The same splits and batches with packed tensor inputs (for torchslim.cascade)."""
    import dataclasses

    class _Packed:
        def __init__(self, loader: DataLoader | None):
            self.loader = loader

        def __iter__(self) -> Any:
            return ((pack(x), y) for x, y in self.loader)

        def __len__(self) -> int:
            return len(self.loader)

    wrap = lambda dl: None if dl is None else _Packed(dl)
    return dataclasses.replace(task, name=task.name + "-packed", train=wrap(task.train), val=wrap(task.val),
                               test=wrap(task.test))


TASKS["text_topics"] = text_topics
MODELS["minilm_classifier"] = minilm_classifier
