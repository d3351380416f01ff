"""The model gallery: tiny, randomly initialised models of many families; nothing is downloaded.

``GALLERY[name]`` is a :class:`Entry`; ``entry.build()`` returns ``(model, example_inputs, task,
notes)``: the model in eval mode, one batch of its inputs (a Tensor or a dict), a small
:class:`torchslim.Task` on random data shaped for the model, and a one-line description.
Entries whose optional package is missing say so in ``entry.missing()`` (the matrix skips them).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchslim import Task

N_TRAIN, N_TEST, BATCH = 16, 16, 8
VOCAB, SEQ, CLASSES = 64, 8, 4


# ----------------------------------------------------------------------------- data / tasks
class _Pairs(Dataset):
    """(inputs, target) pairs where inputs is a Tensor or a dict of Tensors (collated as dicts)."""

    def __init__(self, inputs: Any, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x = {k: v[i] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[i]
        return x, self.targets[i]


def token_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def token_accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return (out.argmax(-1) == y).float().mean().item()


def make_task(name: str, make_inputs: Callable[[int, torch.Generator], Any], target_shape: tuple[int, ...],
              classes: int, lm: bool = False, n_train: int = N_TRAIN) -> Task:
    g = torch.Generator().manual_seed(0)
    loaders = {}
    for split, n in (("train", n_train), ("val", N_TEST), ("test", N_TEST)):
        x = make_inputs(n, g)
        y = torch.randint(0, classes, (n, *target_shape), generator=g)
        loaders[split] = DataLoader(_Pairs(x, y), batch_size=BATCH, shuffle=False)
    kwargs = {"loss": token_loss, "metric": token_accuracy} if lm else {"num_classes": classes}
    return Task(name=name, test=loaders["test"], train=loaders["train"], val=loaders["val"], **kwargs)


def images(c: int = 3, hw: int = 32):
    return lambda n, g: torch.randn(n, c, hw, hw, generator=g)


def tokens(n: int, g: torch.Generator, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (n, SEQ), generator=g)


def token_dict(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[: n // 2, -2:] = 0  # some padding, so the attention mask matters
    return {"input_ids": tokens(n, g), "attention_mask": mask}


def sequences(d: int = 16):
    return lambda n, g: torch.randn(n, SEQ, d, generator=g)


# ----------------------------------------------------------------------------- optional packages
def _torchvision_importable() -> bool:
    """torchvision beside the CPU torch: see torchslim.core.compat.import_torchvision."""
    from torchslim.core.compat import import_torchvision

    return import_torchvision()


def _have(pkg: str) -> bool:
    if pkg == "torchvision":
        try:
            return _torchvision_importable()
        except Exception:  # noqa: BLE001
            return False
    if pkg == "timm":
        return _have("torchvision") and importlib.util.find_spec("timm") is not None
    return importlib.util.find_spec(pkg) is not None


from .custom import (
    CustomLayers,
    DictIn,
    DictOut,
    MHABlock,
    OneFeature,
    RNNClassifier,
    SeqClassifier,
    TiedLM,
    TiedParams,
    TupleOut,
    UsedTwice,
    _EdgeMLP,
)


# ----------------------------------------------------------------------------- builders
def _vision(model: nn.Module, name: str) -> tuple[nn.Module, Task]:
    return model, make_task(name, images(), (), CLASSES)


def _tv(name: str):
    def build():
        _torchvision_importable()
        from torchvision.models import efficientnet as e
        from torchvision.models import mobilenetv3 as mv
        from torchvision.models.resnet import BasicBlock, ResNet

        class SlimResNet(ResNet):
            """torchvision's ResNet-18 graph (BasicBlock x [2, 2, 2, 2]) at 1/8 of its widths."""

            def __init__(self):
                super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=CLASSES)
                self.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
                self.bn1 = nn.BatchNorm2d(8)
                self.fc = nn.Linear(64, CLASSES)

            def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
                if planes == 64:
                    self.inplanes = 8
                return super()._make_layer(block, planes // 8, blocks, stride, dilate)

        if name == "tv_resnet18":
            model = SlimResNet()
        elif name == "tv_mobilenet_v3_small":
            setting, last = mv._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
            model = mv.MobileNetV3(setting, last, num_classes=CLASSES)
        else:
            setting, last = e._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
            model = e.EfficientNet(setting, 0.2, num_classes=CLASSES, last_channel=last)
        return _vision(model, name)
    return build


def _timm(name: str):
    def build():
        _torchvision_importable()
        import timm

        if name == "timm_vit_tiny":
            model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                      embed_dim=32, depth=2, num_heads=2, num_classes=CLASSES)
        else:
            model = timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES,
                                      dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))
        return _vision(model, name)
    return build


_HF_SIZE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _hf(name: str):
    def build():
        import transformers as tr

        if name == "hf_bert":
            cfg = tr.BertConfig(vocab_size=VOCAB, max_position_embeddings=32, num_labels=CLASSES, **_HF_SIZE)
            return tr.BertForSequenceClassification(cfg), make_task(name, token_dict, (), CLASSES)
        if name == "hf_distilbert":
            cfg = tr.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=32, dim=32, n_layers=2,
                                      n_heads=2, hidden_dim=64, num_labels=CLASSES)
            return tr.DistilBertForSequenceClassification(cfg), make_task(name, token_dict, (), CLASSES)
        if name == "hf_gpt2":
            cfg = tr.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2)
            return tr.GPT2LMHeadModel(cfg), make_task(name, tokens, (SEQ,), VOCAB, lm=True)
        if name == "hf_vit":
            cfg = tr.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=CLASSES, **_HF_SIZE)
            return tr.ViTForImageClassification(cfg), make_task(name, images(), (), CLASSES)
        cfg = tr.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=32, num_key_value_heads=1,
                             tie_word_embeddings=False, **_HF_SIZE)
        return tr.LlamaForCausalLM(cfg), make_task(name, tokens, (SEQ,), VOCAB, lm=True)
    return build


def _simple(make: Callable[[], nn.Module], inputs: Callable, lm: bool = False, name: str = ""):
    def build():
        model = make()
        if lm:
            return model, make_task(name, inputs, (SEQ,), VOCAB, lm=True)
        return model, make_task(name, inputs, (), CLASSES)
    return build


def _vec(d: int = 32):
    return lambda n, g: torch.randn(n, d, generator=g)


def _dict_in(n, g):
    return {"a": torch.randn(n, 16, generator=g), "b": torch.randn(n, 16, generator=g)}


@dataclass
class Entry:
    name: str
    builder: Callable[[], tuple[nn.Module, Task]]
    notes: str
    requires: tuple[str, ...] = ()
    kinds: tuple[str, ...] = field(default_factory=tuple)

    def missing(self) -> str | None:
        for pkg in self.requires:
            if not _have(pkg):
                return f"optional package {pkg} is not installed (or cannot be imported)"
        return None

    def build(self) -> tuple[nn.Module, Any, Task, str]:
        torch.manual_seed(0)
        model, task = self.builder()
        with torch.no_grad():  # freshly initialised BatchNorms are identities; give them real statistics
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        model.eval()
        return model, task.example_inputs(), task, self.notes


def _entries() -> list[Entry]:
    tv, tm, hf = ("torchvision",), ("timm",), ("transformers",)
    return [
        Entry("tv_resnet18", _tv("tv_resnet18"), "torchvision ResNet-18 graph at 1/8 width, 32x32 input", tv, ("cnn",)),
        Entry("tv_mobilenet_v3_small", _tv("tv_mobilenet_v3_small"),
              "torchvision MobileNetV3-small, width 0.25 (SE, hardswish)", tv, ("cnn",)),
        Entry("tv_efficientnet_b0", _tv("tv_efficientnet_b0"), "torchvision EfficientNet-B0, width/depth 0.25", tv,
              ("cnn",)),
        Entry("timm_vit_tiny", _timm("timm_vit_tiny"), "timm vit_tiny_patch16_224: dim 32, depth 2, 32x32, patch 8", tm,
              ("transformer",)),
        Entry("timm_convnext_atto", _timm("timm_convnext_atto"), "timm convnext_atto, dims 8-32, depths 1", tm,
              ("cnn",)),
        Entry("hf_bert", _hf("hf_bert"), "BertForSequenceClassification from config; dict inputs, ModelOutput", hf,
              ("transformer", "hf")),
        Entry("hf_distilbert", _hf("hf_distilbert"), "DistilBertForSequenceClassification from config", hf,
              ("transformer", "hf")),
        Entry("hf_gpt2", _hf("hf_gpt2"), "GPT2LMHeadModel from config: Conv1D layers, lm_head tied to wte", hf,
              ("transformer", "hf", "tied")),
        Entry("hf_vit", _hf("hf_vit"), "ViTForImageClassification from config", hf, ("transformer", "hf")),
        Entry("hf_llama", _hf("hf_llama"), "LlamaForCausalLM from config (GQA, RMSNorm, SwiGLU, RoPE)", hf,
              ("transformer", "hf")),
        Entry("nn_transformer_encoder", _simple(lambda: SeqClassifier(nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)),
            sequences(), name="nn_transformer_encoder"), "stock nn.TransformerEncoder (2 layers) + Linear head",
            kinds=("transformer",)),
        Entry("nn_multihead_attention", _simple(MHABlock, sequences(), name="nn_multihead_attention"),
              "stock nn.MultiheadAttention block"),
        Entry("nn_lstm", _simple(lambda: RNNClassifier("LSTM"), sequences(), name="nn_lstm"), "nn.LSTM classifier"),
        Entry("nn_gru", _simple(lambda: RNNClassifier("GRU"), sequences(), name="nn_gru"), "nn.GRU classifier"),
        Entry("tied_embedding_lm", _simple(TiedLM, tokens, lm=True, name="tied_embedding_lm"),
              "Embedding tied to the output head", kinds=("tied",)),
        Entry("tied_parameters", _simple(TiedParams, _vec(), name="tied_parameters"),
              "two Linears holding one Parameter", kinds=("tied",)),
        Entry("module_used_twice", _simple(UsedTwice, _vec(), name="module_used_twice"),
              "one Linear registered under two names, called twice", kinds=("tied",)),
        Entry("custom_layers", _simple(CustomLayers, _vec(), name="custom_layers"),
              "custom layer with its own Parameters (F.linear) and buffers"),
        Entry("tuple_output", _simple(TupleOut, _vec(), name="tuple_output"), "forward returns (logits, hidden)"),
        Entry("dict_output", _simple(DictOut, _vec(), name="dict_output"), "forward returns {'logits', 'hidden'}"),
        Entry("linear_1_to_64", _simple(OneFeature, _vec(1), name="linear_1_to_64"),
              "MLP whose first layer is Linear(1, 64)"),
        Entry("mlp_config_edges", lambda: (_EdgeMLP(),
                                           make_task("mlp_config_edges", _vec(), (), CLASSES, n_train=20)),
              "plain MLP; config edges: QuantConfig(layers={exclude: ['head']}), last calibration batch smaller (8, 8, 4)"),
        Entry("dict_inputs", _simple(DictIn, _dict_in, name="dict_inputs"), "forward(a, b): a batch's inputs are a dict"),
    ]


GALLERY: dict[str, Entry] = {e.name: e for e in _entries()}
