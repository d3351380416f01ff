"""On-disk formats: safe weights IO, sparse storage, ONNX export, the compact archive."""

from .archive import ArchiveError, inspect_archive, load_archive, save_archive
from .sparse import load_sparse, save_sparse
from .weights import load_weights, read_state_dict, save_weights

__all__ = ["ArchiveError", "inspect_archive", "load_archive", "save_archive", "load_sparse", "load_weights", "read_state_dict", "save_sparse", "save_weights"]
