"""Input-adaptive inference: early exits (exits.py) and cascades (cascade.py).

Importing the package registers both stages (``ExitConfig``, ``CascadeConfig``).
"""

from .cascade import CascadeConfig, CascadeModel, cascade
from .exits import ExitConfig, early_exit
from .export import save_torchscript, to_torchscript
from .model import EarlyExitModel, ExitHead

__all__ = [
           "CascadeConfig",
           "CascadeModel",
           "EarlyExitModel",
           "ExitConfig",
           "ExitHead",
           "cascade",
           "early_exit",
           "save_torchscript",
           "to_torchscript",
]
