"""Online learning: a compressed model that keeps learning from a stream and stays compressed.

``online(model, stream, OnlineConfig(...))`` runs prequential (test-then-train) updates that
keep masks, shared codebooks, structured shapes and fake-quant exact (pruned tensors learn at
lr / density ** sparse_lr_power); River's ADWIN detects drift and triggers adaptation (LR
boost, drop-and-grow regrowth at constant sparsity, distillation from a teacher for a window);
a replay buffer and EWC control forgetting; checkpoints carry the stream offset so a killed run
resumes exactly.
"""

from .config import OnlineConfig
from .drift import DriftMonitor, false_alarm_rate
from .forgetting import EWC, ReplayBuffer
from .invariants import differences, fingerprint
from .loop import OnlineResult, online
from .stage import apply
from .stream import ArrayStream, Concat, FolderStream, GeneratorStream, TaskStream, batches_from

__all__ = [
    "EWC", "ArrayStream", "Concat", "DriftMonitor", "FolderStream", "GeneratorStream", "OnlineConfig",
    "OnlineResult", "ReplayBuffer", "TaskStream", "apply", "batches_from", "differences", "false_alarm_rate",
    "fingerprint", "online",
]
