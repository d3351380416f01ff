"""On-disk formats: safe weights IO, sparse storage, ONNX export, the compact archive."""

from ..core.errors import ExportError
from .archive import ArchiveError, inspect_archive, load_archive, save_archive
from .onnx import OnnxExportConfig, export_onnx, verify_onnx
from .sparse import load_sparse, save_sparse
from .weights import load_weights, read_state_dict, save_weights

__all__ = ["ArchiveError", "ExportError", "OnnxExportConfig", "export_onnx", "inspect_archive", "load_archive", "load_sparse", "load_weights", "read_state_dict", "save_archive", "save_sparse", "save_weights", "verify_onnx"]
