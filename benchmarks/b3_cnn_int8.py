"""B3 (int8 part): static int8 PTQ of LeNet-300-100/digits and the residual CNN/MNIST-1D.

Per model and seed: train fp32, quantize with ``QuantConfig(mode="static", backend=...)``
(BatchNorm folded, activation ranges calibrated on 8 train batches, int8 per-channel weights),
and report the test accuracy drop. Latency at batch 256, side by side (interleaved medians):
PyTorch fp32 eager, ONNX Runtime fp32, ONNX Runtime int8 (QDQ, static), torchao int8
(dynamic activations, Linear layers only). This benchmark later also gets structured pruning +
int8 (the combined recipe); ``per_model`` keeps every figure.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

ID = "B3"
TITLE = "int8 PTQ of LeNet-300-100/digits and ResCNN/MNIST-1D: accuracy drop and speedup at batch 256"
HEADLINE = ["speedup_vs_torch_fp32", "accuracy_drop_pt"]
BATCH = 256


def _setups(quick: bool):
    from torchslim.core.train import TrainConfig

    return {
        "lenet300_digits": {"task": ("digits", {}), "model": "lenet300",
                            "train": TrainConfig(epochs=5 if quick else 40, lr=1e-3, device="cpu")},
        "rescnn1d_mnist1d": {"task": ("mnist1d", {"num_samples": 6000 if quick else 25000}), "model": "rescnn1d",
                             "train": TrainConfig(epochs=2 if quick else 6, lr=2e-3, device="cpu")},
    }


def _one_seed(name, setup, seed, timing):
    import dataclasses

    from torchslim.core.measure import compare_latency
    from torchslim.core.train import fit
    from torchslim.core.utils import seed_everything
    from torchslim.quantization import ptq
    from torchslim.quantization.backends import OrtModel, ort_fp32, saved_bytes
    from torchslim.quantization.config import QuantConfig
    from torchslim.zoo import build_model, build_task

    seed_everything(seed)
    task = build_task(setup["task"][0], seed=seed, **setup["task"][1])
    model = build_model(setup["model"], task)
    fit(model, task, dataclasses.replace(setup["train"], seed=seed))
    model.eval()
    fp32_acc = task.evaluate(model)
    row = {"seed": seed, "fp32_acc": fp32_acc, "test_size": len(task.test.dataset)}
    built = {}
    for backend in ("onnxruntime", "torchao"):
        start = time.perf_counter()
        res = ptq.apply(model, QuantConfig(mode="static", calibration="percentile", backend=backend), task)
        acc = task.evaluate(res.model)
        built[backend] = res.model
        row[backend] = {"acc": acc, "drop_pt": 100 * (fp32_acc - acc), "ptq_seconds": time.perf_counter() - start,
                        "file_bytes": saved_bytes(res.model), "float_layers": res.info.get("float_layers"),
                        "notes": res.info.get("notes")}
    if timing:
        x = task.example_inputs(BATCH)
        f32 = ort_fp32(model, x)
        cands = {"torch_fp32": model, "ort_fp32": f32, "ort_int8": built["onnxruntime"], "torchao_int8": built["torchao"]}
        lat = compare_latency({k: (lambda m=m: m(x)) for k, m in cands.items()}, warmup=5, repeats=30)
        ref = lat["torch_fp32"]["median_ms"]
        row["latency_ms"] = {k: v["median_ms"] for k, v in lat.items()}
        row["speedup_vs_torch_fp32"] = {k: ref / v["median_ms"] for k, v in lat.items()}
        # one thread as well: an oversubscribed machine hurts torch's spinning OpenMP pool more
        # than ONNX Runtime's, so the 1-thread ratio is the more conservative one
        one = {k: (OrtModel(m.onnx_bytes, m.input_names, threads=1) if isinstance(m, OrtModel) else m) for k, m in cands.items()}
        lat1 = compare_latency({k: (lambda m=m: m(x)) for k, m in one.items()}, warmup=3, repeats=20, threads=1)
        row["latency_ms_1thread"] = {k: v["median_ms"] for k, v in lat1.items()}
        row["speedup_vs_torch_fp32_1thread"] = {k: lat1["torch_fp32"]["median_ms"] / v["median_ms"] for k, v in lat1.items()}
        from torchslim.core.measure import state_dict_bytes

        row["fp32_state_dict_bytes"] = state_dict_bytes(model)
    return row


def run(quick: bool = False) -> dict:
    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    seeds = (0,) if quick else (0, 1)
    per_model = {}
    for name, setup in _setups(quick).items():
        rows = [_one_seed(name, setup, s, timing=(s == seeds[0])) for s in seeds]
        drops = {b: [r[b]["drop_pt"] for r in rows] for b in ("onnxruntime", "torchao")}
        per_model[name] = {
            "seeds": list(seeds),
            "test_size": rows[0]["test_size"],
            "fp32_acc": [r["fp32_acc"] for r in rows],
            "ort_int8_drop_pt_mean": float(np.mean(drops["onnxruntime"])),
            "ort_int8_drop_pt_spread": float(np.ptp(drops["onnxruntime"])),
            "torchao_int8_drop_pt_mean": float(np.mean(drops["torchao"])),
            "speedup_vs_torch_fp32": rows[0]["speedup_vs_torch_fp32"],
            "latency_ms_batch256": rows[0]["latency_ms"],
            "speedup_vs_torch_fp32_1thread": rows[0]["speedup_vs_torch_fp32_1thread"],
            "ort_int8_file_vs_fp32": rows[0]["onnxruntime"]["file_bytes"] / rows[0]["fp32_state_dict_bytes"],
            "per_seed": rows,
        }
    main = per_model["rescnn1d_mnist1d"]
    best_rt = max(("ort_int8", "torchao_int8"), key=lambda k: main["speedup_vs_torch_fp32_1thread"][k])
    two, one = main["speedup_vs_torch_fp32"][best_rt], main["speedup_vs_torch_fp32_1thread"][best_rt]
    return {
        # headline: the more conservative of the 2-thread and 1-thread ratios (torch's 2-thread
        # pool suffers most from the oversubscribed shared machine, inflating the 2-thread one)
        "speedup_vs_torch_fp32": min(two, one),
        "accuracy_drop_pt": main["ort_int8_drop_pt_mean"] if best_rt == "ort_int8" else main["torchao_int8_drop_pt_mean"],
        "speedup_vs_torch_fp32_2threads": two,
        "headline_model": "rescnn1d_mnist1d",
        "headline_runtime": best_rt,
        "speedup_vs_torch_fp32_1thread": one,
        "lenet_speedup_vs_torch_fp32": per_model["lenet300_digits"]["speedup_vs_torch_fp32"],
        "per_model": per_model,
        "batch_size": BATCH,
        "threads": torch.get_num_threads(),
        "targets": {"accuracy_drop_pt_static_int8": 0.5, "int8_speedup_min": 1.5, "combined_recipe_speedup": 4.0},
        "qat_vs_ptq_4bit": run_qat_vs_ptq_4bit(quick),
        "notes": "2-core machine shared with other engineers' jobs: latencies are interleaved medians of 30 "
                 "repeats (compare_latency), ratios only. Pruning + int8 (the >= 4x target) is the combined "
                 "recipe's part, not measured here.",
    }


# --- QAT vs PTQ at 4-bit weights (issue 4: "QAT at 4-bit weights loses less than PTQ at 4-bit") ---
# Both use the same scheme: W4 symmetric (per-tensor = the hardest honest setting, and
# per-channel), 8-bit static activations calibrated the same way, simulated (fake-quant).
# QAT = that PTQ model fine-tuned with ``finetune`` (STE; and LSQ learnable scales).
# Control: the fp32 model fine-tuned with the very same TrainConfig, so that a QAT "gain" that
# is only extra training shows up as such (``qat_drop_vs_fp32_finetuned_pt``).
QAT_SEEDS = (0, 1, 2)
QAT_EPOCHS, QAT_LR = 2, 3e-4
QAT_VARIANTS = {"qat_ste": False, "qat_lsq": True}  # name -> learnable_scales
# LSQ (learnable scales; qat.param_groups balances the scales' lr against the weights' as LSQ
# asks) counts as "not worse than STE" when its 3-seed mean accuracy is within this many points:
# about one standard error of that mean paired difference (per-seed std ~0.9 pt measured on
# ResCNN/MNIST-1D per-tensor); on digits it is under 2 test images.
LSQ_NOISE_PT = 0.5


def _qat_setups(quick: bool):
    from torchslim.core.train import TrainConfig

    return {
        "lenet300_digits": {"task": ("digits", {}), "model": "lenet300",
                            "train": TrainConfig(epochs=5 if quick else 40, lr=1e-3, device="cpu")},
        "rescnn1d_mnist1d": {"task": ("mnist1d", {"num_samples": 4000 if quick else 20000}), "model": "rescnn1d",
                             "train": TrainConfig(epochs=1 if quick else 6, lr=2e-3, scheduler="CosineAnnealingLR", device="cpu")},
    }


def _qat_one_seed(setup, seed, quick):
    import copy
    import dataclasses

    from torchslim.core.train import fit
    from torchslim.core.utils import seed_everything
    from torchslim.quantization import ptq, qat
    from torchslim.quantization.config import QuantConfig
    from torchslim.zoo import build_model, build_task

    seed_everything(seed)
    task = build_task(setup["task"][0], seed=seed, **setup["task"][1])
    model = build_model(setup["model"], task)
    fit(model, task, dataclasses.replace(setup["train"], seed=seed))
    fp32 = task.evaluate(model.eval())
    # the QAT budget (before issue 11: qat_epochs / qat_lr / qat_steps, optimizer Adam, seed = the config's)
    from torchslim.core.train import TrainConfig

    budget = {"finetune": TrainConfig(epochs=QAT_EPOCHS, max_steps=3 if quick else None, lr=QAT_LR, optimizer="Adam",
                                      seed=seed)}
    control = copy.deepcopy(model)  # fp32 + the same fine-tuning budget as QAT
    fit(control, task, qat.qat_train_config(QuantConfig(**budget, seed=seed)))
    row = {"seed": seed, "test_size": len(task.test.dataset), "fp32_acc": fp32,
           "fp32_finetuned_acc": task.evaluate(control.eval())}
    for gran in ("per_tensor", "per_channel"):
        base = QuantConfig(bits=4, act_bits=8, weight_scheme="symmetric", granularity=gran, mode="static",
                           calibration="percentile", backend="simulate", seed=seed)
        accs = {"ptq": task.evaluate(ptq.apply(model, base, task).model)}
        for name, learnable in QAT_VARIANTS.items():
            cfg = dataclasses.replace(base, **budget, learnable_scales=learnable)
            accs[name] = task.evaluate(ptq.apply(model, cfg, task).model)
        row[gran] = {k: {"acc": a, "drop_pt": 100 * (fp32 - a), "drop_vs_fp32_finetuned_pt": 100 * (row["fp32_finetuned_acc"] - a)}
                     for k, a in accs.items()}
    return row


def _qat_summary(rows):
    import numpy as np

    def stats(vals):
        return {"mean": float(np.mean(vals)), "spread": float(np.ptp(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}

    out = {}
    for gran in ("per_tensor", "per_channel"):
        ptq_drop = [r[gran]["ptq"]["drop_pt"] for r in rows]
        g = {"ptq_drop_pt": stats(ptq_drop)}
        for name in QAT_VARIANTS:
            qat_drop = [r[gran][name]["drop_pt"] for r in rows]
            gain = [p - q for p, q in zip(ptq_drop, qat_drop)]  # paired per seed: > 0 = QAT lost less
            g[name] = {"drop_pt": stats(qat_drop), "gain_over_ptq_pt": stats(gain),
                       "drop_vs_fp32_finetuned_pt": stats([r[gran][name]["drop_vs_fp32_finetuned_pt"] for r in rows]),
                       "qat_less_loss_mean": bool(np.mean(gain) > 0), "qat_less_or_equal_every_seed": bool(min(gain) >= 0)}
        ste, lsq = ([r[gran][v]["acc"] for r in rows] for v in ("qat_ste", "qat_lsq"))
        lsq_minus_ste = [100 * (b - a) for a, b in zip(ste, lsq)]  # paired per seed: > 0 = LSQ better
        g["lsq_minus_ste_pt"] = stats(lsq_minus_ste)
        g["lsq_not_worse_than_ste_mean"] = bool(np.mean(lsq_minus_ste) >= -LSQ_NOISE_PT)
        out[gran] = g
    return out


def run_qat_vs_ptq_4bit(quick: bool = False) -> dict:
    """QAT vs PTQ at W4/A8 static, per model, over seeds (one thread: others time latency)."""
    import time

    import torch

    from torchslim.quantization import qat

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seeds = QAT_SEEDS[:1] if quick else QAT_SEEDS
        per_model = {}
        for name, setup in _qat_setups(quick).items():
            start = time.perf_counter()
            rows = [_qat_one_seed(setup, s, quick) for s in seeds]
            per_model[name] = {"seeds": list(seeds), "test_size": rows[0]["test_size"],
                               "fp32_acc": [r["fp32_acc"] for r in rows],
                               "fp32_finetuned_acc": [r["fp32_finetuned_acc"] for r in rows],
                               **_qat_summary(rows), "seconds": time.perf_counter() - start, "per_seed": rows}
    finally:
        torch.set_num_threads(threads)
    holds = {m: {g: {v: per_model[m][g][v]["qat_less_loss_mean"] for v in QAT_VARIANTS} for g in ("per_tensor", "per_channel")}
             for m in per_model}
    return {"scheme": "W4 symmetric weights (per_tensor / per_channel), A8 asymmetric static (percentile 99.99, "
                      "8 calibration batches), BatchNorm folded, simulated",
            "qat_budget": {"epochs": QAT_EPOCHS, "lr": QAT_LR, "optimizer": "Adam", "variants": QAT_VARIANTS,
                           "lsq_scale_lr": f"{qat.SCALE_LR_RATIO:.3g} * lr * mean(scale) / rms(layer weight), no weight decay"},
            "qat_less_loss_than_ptq": holds, "per_model": per_model, "threads": 1,
            "lsq_not_worse_than_ste": {m: {g: per_model[m][g]["lsq_not_worse_than_ste_mean"] for g in ("per_tensor", "per_channel")}
                                       for m in per_model},
            "notes": "drop_pt = 100 * (fp32 test acc - quantized test acc), mean and spread (max - min) over seeds; "
                     "gain_over_ptq_pt and lsq_minus_ste_pt are paired per seed. fp32_finetuned = the fp32 model given the same "
                     "fine-tuning budget as QAT (control for extra training). Digits has 360 test images "
                     "(1 image = 0.28 pt): differences there are within noise. Machine shared with other engineers' jobs "
                     "(accuracy is unaffected; run time is)."}


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
