"""QAT vs PTQ at 4-bit weights, per-tensor, 8-bit static activations (issue 4 acceptance point).

A narrow residual CNN (width 16) on a small MNIST-1D is a setting where 4-bit per-tensor PTQ
clearly hurts (one scale for a whole folded conv); two epochs of QAT with the same scheme and
the same calibration must recover most of it. The full-size comparison over seeds is in
benchmarks/b3_cnn_int8.py (``qat_vs_ptq_4bit``).
"""

import dataclasses

import pytest
import torch

from torchslim.core.train import TrainConfig, fit
from torchslim.core.utils import seed_everything
from torchslim.quantization.config import QuantConfig
from torchslim.quantization.ptq import apply, export_weights
from torchslim.zoo import build_model, build_task

W4A8 = QuantConfig(bits=4, act_bits=8, weight_scheme="symmetric", granularity="per_tensor", mode="static", seed=0)


@pytest.fixture(scope="module")
def setting():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared machine
    try:
        seed_everything(0)
        task = build_task("mnist1d", num_samples=3000, seed=0)  # 600 test signals
        model = build_model("rescnn1d", task, width=16)
        fit(model, task, TrainConfig(epochs=8, lr=3e-3, scheduler="CosineAnnealingLR", device="cpu", seed=0))
        model.eval()
        yield model, task, task.evaluate(model)
    finally:
        torch.set_num_threads(threads)


def _acc(model, task, cfg):
    res = apply(model, cfg, task)
    return task.evaluate(res.model), res.model


# One QAT run is noisy here, and so is per-tensor 4-bit PTQ itself (one outlier weight sets a
# whole folded conv's grid): retraining the fp32 model from an init perturbed by 1e-6 (as a
# different BLAS / ISA does) gave PTQ drops of 3.8 to 36 pt over 7 runs (AVX2 machine: 35 pt,
# AVX-512 machine: 25 pt). So QAT and LSQ are compared on means over 3 QAT seeds (shuffling and
# calibration sample), and the PTQ assertions only ask for what held in all 7 runs.
SEEDS = (0, 1, 2)
# LSQ may trail plain QAT by at most 2 pt (12 of 600 test signals; 1 signal = 0.17 pt) in those
# means: per seed, LSQ - QAT had a std of 1.6 pt (8 seeds), so a 3-seed mean difference has a
# standard error of ~0.9 pt and 2 pt is ~2 of them. Measured over the 7 perturbed runs: -0.7 to
# +0.9 pt. Before the scale learning-rate fix (qat.param_groups) LSQ trailed by 5.4 pt (5-seed
# mean) and 8 pt in the test on AVX2; with the scales at R = 1 (ratio 1) it trailed by up to 2.3.
LSQ_TOLERANCE = 0.02


def test_qat_4bit_per_tensor_beats_ptq(setting):
    model, task, fp32 = setting
    before = [p.detach().clone() for p in model.parameters()]
    ptq, _ = _acc(model, task, W4A8)
    qat, lsq = [], []
    for seed in SEEDS:
        cfg = dataclasses.replace(W4A8, finetune=TrainConfig(epochs=2, lr=1e-3, seed=seed), seed=seed)
        qat.append(_acc(model, task, cfg)[0])
        lsq.append(_acc(model, task, dataclasses.replace(cfg, learnable_scales=True))[0])
    mean_qat, mean_lsq = sum(qat) / len(qat), sum(lsq) / len(lsq)
    # Measured on AVX2 (600 test signals): fp32 94.3%, PTQ 59.0%, QAT 92.2 / 91.8 / 91.0%
    # (mean 91.7%), QAT + LSQ 93.3 / 93.0 / 91.2% (mean 92.5%).
    assert fp32 - ptq >= 0.03, (fp32, ptq)  # the setting hurts PTQ
    assert mean_qat > ptq and mean_lsq > ptq, (ptq, qat, lsq)  # QAT loses less than PTQ
    assert fp32 - mean_qat <= 0.05 and fp32 - mean_lsq <= 0.05, (fp32, qat, lsq)  # near fp32 (max 3.8 pt in 7 runs)
    assert mean_lsq >= mean_qat - LSQ_TOLERANCE, (qat, lsq)  # learnable scales do not lose to QAT
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # input model untouched


def test_qat_keeps_the_4bit_per_tensor_scheme(setting):
    model, task, _ = setting
    _, q = _acc(model, task, dataclasses.replace(W4A8, finetune=TrainConfig(epochs=1, max_steps=5, lr=1e-4),
                                                       learnable_scales=True))
    layers = export_weights(q).layers
    assert len(layers) == 11  # stem, 4 blocks x 2 convs, 1 strided shortcut, fc
    for lq in layers.values():
        assert lq.bits == 4 and lq.scale.shape == () and lq.act["mode"] == "static"
        assert int(lq.weight.min()) >= -8 and int(lq.weight.max()) <= 7
        assert len(torch.unique(lq.weight)) <= 16


def test_lsq_scale_groups_lr_no_decay_and_positive():
    from torch import nn

    from torchslim.quantization import qat
    from torchslim.quantization.fake import EPS, ActQuantizer, FakeQuantLayer, WeightQuantizer

    torch.manual_seed(0)
    model = nn.Sequential(FakeQuantLayer(nn.Linear(64, 8), WeightQuantizer(4, True, "per_tensor"), ActQuantizer(8)))
    layer = model[0]
    layer.aq.set_range(0.0, 2.0)
    layer.wq.make_learnable()
    layer.aq.make_learnable()
    w, s_w, s_a = layer.layer.weight, float(layer.wq.scale.detach()), float(layer.aq.scale.detach())
    rms = float(w.detach().pow(2).mean().sqrt())
    groups = qat.param_groups(model, TrainConfig(lr=1e-3, optimizer="AdamW"))
    assert [len(g["params"]) for g in groups] == [2, 1, 1]  # weight + bias, then each scale
    assert groups[1]["params"][0] is layer.wq.scale and groups[2]["params"][0] is layer.aq.scale
    # Adam-like: Adam cancels LSQ's gradient scale, so the lr makes the relative step balanced
    assert groups[1]["lr"] == pytest.approx(1e-3 * qat.SCALE_LR_RATIO * s_w / rms)
    assert groups[2]["lr"] == pytest.approx(1e-3 * qat.SCALE_LR_RATIO * s_a / rms)
    assert all(g["weight_decay"] == 0.0 for g in groups[1:]) and "weight_decay" not in groups[0]
    sgd = qat.param_groups(model, TrainConfig(lr=1e-2, optimizer="SGD"))  # SGD: g does it, as in the paper
    assert [g["lr"] for g in sgd[1:]] == [1e-2, 1e-2]
    with torch.no_grad():
        layer.wq.scale.fill_(-1.0)
    qat.ScaleKeeper(qat.learnable_scales(model)).after_step(model, 1)
    assert float(layer.wq.scale.detach()) == pytest.approx(EPS) and float(layer.aq.scale.detach()) == pytest.approx(s_a)
    # later fine-tuning (recipe `finetune`) gets the keeper through the training-hook registry
    from torchslim.core.stage import training_hooks

    assert any(isinstance(h, qat.ScaleKeeper) for h in training_hooks(model))
