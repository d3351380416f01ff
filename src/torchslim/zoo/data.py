"""Bundled tasks built from data generated or shipped on this machine (nothing is downloaded).

- ``digits``: scikit-learn's real 8x8 handwritten digits (1,797 images), fixed stratified split
  60/20/20 (seed 0), pixels scaled to [0, 1].
- ``mnist1d``: MNIST-1D generated locally with ``mnist1d.data.make_dataset`` (never its
  downloader); ``num_samples`` is configurable; its own train/test split, 10% of train held out
  for validation.
- ``npz`` / ``csv``: a user's local arrays (features + integer labels).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..core.errors import TaskError
from ..core.task import Task


def loaders_from_arrays(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], batch_size: int, seed: int
) -> dict[str, DataLoader]:
    """Tensor loaders; train is shuffled with its own seeded generator (reproducible resume)."""
    out = {}
    for name, (x, y) in splits.items():
        ds = TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))
        if name == "train":
            gen = torch.Generator().manual_seed(seed)
            out[name] = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen)
        else:
            out[name] = DataLoader(ds, batch_size=max(batch_size, 256), shuffle=False)
    return out


def _stratified_split(x: np.ndarray, y: np.ndarray, seed: int, val: float, test: float):
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test, stratify=y, random_state=seed)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x_tr, y_tr, test_size=val / (1 - test), stratify=y_tr, random_state=seed
    )
    return {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": (x_te, y_te)}


def digits(batch_size: int = 64, seed: int = 0) -> Task:
    """sklearn digits, stratified 60/20/20 split fixed by ``seed`` (default 0)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    splits = _stratified_split(x, data.target, seed=0, val=0.2, test=0.2)
    loaders = loaders_from_arrays(splits, batch_size, seed)
    return Task(name="digits", num_classes=10, input_shape=(64,), **loaders)


def mnist1d(num_samples: int = 10000, batch_size: int = 128, seed: int = 0) -> Task:
    """MNIST-1D generated offline (``num_samples`` before the 80/20 train/test split)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = 42  # the dataset itself is fixed; ``seed`` only drives shuffling
    data = make_dataset(args)
    x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    n_val = len(x) // 10
    splits = {
        "train": (x[idx[n_val:]], y[idx[n_val:]]),
        "val": (x[idx[:n_val]], y[idx[:n_val]]),
        "test": (np.asarray(data["x_test"], np.float32), np.asarray(data["y_test"], np.int64)),
    }
    loaders = loaders_from_arrays(splits, batch_size, seed)
    return Task(name="mnist1d", num_classes=10, input_shape=(x.shape[1],), **loaders)


def from_arrays(
    name: str, x: np.ndarray, y: np.ndarray, batch_size: int = 64, seed: int = 0
) -> Task:
    """A classification task from feature and label arrays (stratified 60/20/20 split).
    Arrays that cannot make one (not numeric, lengths differ, too few samples per class) are a
    one-line TaskError naming the problem."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim != 1:
        raise TaskError(f"{name}: features must be an array of samples and labels a 1-D array "
                        f"(got shapes {x.shape} and {y.shape})")
    if len(x) != len(y):
        raise TaskError(f"{name}: {len(x)} feature rows but {len(y)} labels")
    if x.dtype.kind not in "biuf":
        raise TaskError(f"{name}: features must be numeric, got dtype {x.dtype}")
    if y.dtype.kind not in "biu" and not (y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        raise TaskError(f"{name}: labels must be integers, got dtype {y.dtype}")
    x = x.astype(np.float32).reshape(len(x), -1)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < 5:
        raise TaskError(f"{name}: need at least 2 classes with 5 samples each for a stratified "
                        f"train/val/test split (got {len(y)} samples, smallest class {int(counts.min()) if len(counts) else 0})")
    y = np.searchsorted(classes, y).astype(np.int64)
    splits = _stratified_split(x, y, seed=seed, val=0.2, test=0.2)
    loaders = loaders_from_arrays(splits, batch_size, seed)
    return Task(name=name, num_classes=len(classes), input_shape=(x.shape[1],), **loaders)


def npz(path: str, x_key: str = "x", y_key: str = "y", batch_size: int = 64, seed: int = 0) -> Task:
    """A user's ``.npz`` with feature array ``x_key`` and label array ``y_key``."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"npz task: file {str(p)!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as f:
            missing = [k for k in (x_key, y_key) if k not in f]
            if missing:
                raise TaskError(f"npz task {str(p)!r}: no array named {missing[0]!r} (has {sorted(f.files)})")
            x, y = f[x_key], f[y_key]
    except TaskError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:  # a damaged file
        raise TaskError(f"npz task {str(p)!r}: not a readable .npz of numeric arrays ({type(exc).__name__}: "
                        f"{str(exc).strip()[:120]})") from None
    if not isinstance(x, np.ndarray):
        raise TaskError(f"npz task {str(p)!r}: {x_key!r} is not an array")
    return from_arrays(p.stem, x, y, batch_size, seed)


def csv(path: str, label_column: int = -1, batch_size: int = 64, seed: int = 0) -> Task:
    """A user's numeric CSV with a header row; one column holds integer labels."""
    import warnings

    if not os.path.isfile(path):
        raise TaskError(f"csv task: file {path!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; we raise instead
            arr = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise TaskError(f"csv task {path!r}: not a numeric CSV with a header row ({first})") from None
    if arr.size == 0 or arr.shape[1] < 2:
        raise TaskError(f"csv task {path!r}: needs a header row and data rows with features and a label column")
    if not -arr.shape[1] <= label_column < arr.shape[1]:
        raise TaskError(f"csv task {path!r}: label_column {label_column} is out of range for {arr.shape[1]} columns")
    y = arr[:, label_column]
    x = np.delete(arr, label_column % arr.shape[1], axis=1)
    return from_arrays(Path(path).stem, x, y, batch_size, seed)
