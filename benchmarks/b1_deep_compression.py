"""B1: Deep Compression on LeNet-300-100 / sklearn digits: prune -> share -> entropy-coded archive.

Pipeline per seed (Han et al., ICLR 2016): dense training (torchslim.core.train.fit) -> gradual
magnitude pruning with fine-tuning (torchslim.prune PruneConfig, cubic schedule, global
threshold) -> k-means weight sharing with centroid fine-tuning and fp16 biases
(torchslim.sharing ShareConfig) -> compact archive (torchslim.export.archive). Accuracy of the
final model is measured on the model *loaded back from the archive*. Compression ratio = bytes
of the dense fp32 state dict written by torch.save / bytes of the archive file. Also recorded:
the pruned model in the sparse safetensors format (pruning alone), a per-layer table like the
paper's Table 2, and what each entropy coder would have given on every section.
"""

from __future__ import annotations

import copy
import io
import statistics
import tempfile
from pathlib import Path

import torch

ID = "B1"
TITLE = "Deep Compression: LeNet-300-100 on digits, prune + share + archive"
HEADLINE = ["compression_ratio", "accuracy_drop_pt", "seeds"]

SEEDS = (0, 1, 2)
BITS = {"net.1": 4, "net.3": 3, "net.5": 4}  # codebook index bits per layer (k = 2**bits)
# Global magnitude sparsity of the three weight matrices. The headline point is fixed in
# advance (93%); the aggressive point (95%, as in the paper's ~92% plus the small digits model's
# headroom) is reported next to it, measured on the same dense models.
POINTS = {"headline": 0.93, "aggressive": 0.95}


def _bytes_of_torch_save(state: dict) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(buf.getvalue())


def layer_table(model: torch.nn.Module, stats: dict, dense_sd: dict) -> list[dict]:
    """Per layer, like Deep Compression's Table 2: weights, kept %, bits per stored weight
    (codebook index, after entropy coding), bits per sparse position, bytes, ratio vs fp32."""
    tensors = {t["name"]: t for t in stats["tensors"]}
    rows = []
    for name, bits in BITS.items():
        w, b = tensors[f"{name}.weight"], tensors[f"{name}.bias"]
        secs = {s["role"]: s for s in w["sections"]}
        nnz = secs["i"]["count"] if "r" in secs or "m" in secs else dense_sd[f"{name}.weight"].numel()
        pos = secs.get("r") or secs.get("m")
        size = w["bytes"] + b["bytes"]
        fp32 = 4 * (dense_sd[f"{name}.weight"].numel() + dense_sd[f"{name}.bias"].numel())
        rows.append({
            "layer": name, "weights": dense_sd[f"{name}.weight"].numel(),
            "kept_pct": 100.0 * nnz / dense_sd[f"{name}.weight"].numel(),
            "codebook_bits": bits, "codebook_size": secs["c"]["count"],
            "weight_bits_coded": 8.0 * len_of(secs["i"]) / max(nnz, 1),
            "index_bits_fixed": pos["width"] if pos else 0,
            "index_encoding": ("relative" if pos and pos["role"] == "r" else "bitmask") if pos else "dense",
            "index_bits_coded": 8.0 * len_of(pos) / max(nnz, 1) if pos else 0.0,
            "coders": {s["role"]: s["coder"] for s in w["sections"]},
            "weight_bytes": w["bytes"], "bias_bytes": b["bytes"], "bytes": size,
            "ratio_vs_fp32": fp32 / size,
        })
    return rows


def len_of(section: dict) -> int:
    return section["alternatives"][section["coder"]]


def coder_totals(stats: dict) -> dict[str, int]:
    """Archive body bytes if every section used one coder (at the width chosen for it)."""
    coders = stats["tensors"][0]["sections"][0]["alternatives"].keys()
    secs = [s for t in stats["tensors"] for s in t["sections"]]
    totals = {c: sum(s["alternatives"].get(c, s["alternatives"]["none"]) for s in secs) for c in coders}
    totals["best_per_section"] = sum(len_of(s) for s in secs)
    return totals


def dense_model(seed: int, quick: bool):
    from torchslim.core.train import TrainConfig, fit
    from torchslim.core.utils import seed_everything
    from torchslim.zoo import build_model, build_task

    task = build_task("digits", seed=seed)
    seed_everything(seed)
    model = build_model("lenet300", task)
    fit(model, task, TrainConfig(epochs=15 if quick else 60, lr=1e-3, seed=seed))
    return task, model


def one_seed(seed: int, sparsity: float, task, dense, quick: bool, workdir: Path) -> dict:
    from torchslim.core.train import TrainConfig
    from torchslim.export.archive import load_archive, save_archive
    from torchslim.export.sparse import save_sparse
    from torchslim.pruning.unstructured import PruneConfig
    from torchslim.pruning.unstructured import apply as prune
    from torchslim.sharing import ShareConfig
    from torchslim.sharing import apply as share
    from torchslim.zoo import build_model

    epochs = (15, 20, 3) if quick else (60, 80, 10)
    model = copy.deepcopy(dense)
    dense_acc = task.evaluate(model)
    dense_sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    dense_bytes = _bytes_of_torch_save(dense_sd)

    model = prune(model, PruneConfig(sparsity=sparsity, schedule="gradual", scope="global",
                                     finetune=TrainConfig(epochs=epochs[1], lr=1e-3, seed=seed)), task).model
    pruned_acc = task.evaluate(model)
    sparse_bytes = save_sparse(model, workdir / f"pruned{seed}_{sparsity}.safetensors").stat().st_size

    result = share(model, ShareConfig(bits=BITS, init="linear", fp16_floats=True,
                                      finetune=TrainConfig(epochs=epochs[2], lr=1e-3, seed=seed)), task)
    shared_acc = task.evaluate(model)
    path = workdir / f"lenet300_seed{seed}_{sparsity}.tsla"
    stats = save_archive(model, path)
    loaded = load_archive(path, build_model("lenet300", task))
    final_acc = task.evaluate(loaded)
    x = task.example_inputs()
    model.eval()
    identical = bool(torch.equal(loaded(x.to(next(loaded.parameters()).device)).cpu(), model(x.to(next(model.parameters()).device)).cpu()))
    return {
        "seed": seed, "dense_acc": dense_acc, "pruned_acc": pruned_acc, "shared_acc": shared_acc,
        "final_acc": final_acc, "accuracy_drop_pt": 100.0 * (dense_acc - final_acc),
        "dense_state_dict_bytes": dense_bytes, "pruned_sparse_bytes": sparse_bytes,
        "archive_bytes": stats["bytes"], "header_bytes": stats["header_bytes"],
        "compression_ratio": dense_bytes / stats["bytes"], "pruning_only_ratio": dense_bytes / sparse_bytes,
        "archive_outputs_identical": identical,
        "kept_pct": 100.0 * sum(r["nonzeros"] for r in result.info["layers"].values())
        / sum(r["numel"] for r in result.info["layers"].values()),
        "layers": layer_table(model, stats, dense_sd), "coder_totals": coder_totals(stats),
    }


def summarize(per_seed: list[dict], sparsity: float) -> dict:
    mean = lambda k: statistics.fmean(r[k] for r in per_seed)
    spread = lambda k: statistics.pstdev(r[k] for r in per_seed)
    ratio, drop = mean("compression_ratio"), mean("accuracy_drop_pt")
    return {
        "sparsity": sparsity, "compression_ratio": ratio, "accuracy_drop_pt": drop,
        "compression_ratio_std": spread("compression_ratio"), "accuracy_drop_pt_std": spread("accuracy_drop_pt"),
        "dense_acc": mean("dense_acc"), "final_acc": mean("final_acc"), "kept_pct": mean("kept_pct"),
        "archive_bytes": mean("archive_bytes"), "pruning_only_ratio": mean("pruning_only_ratio"),
        "meets_target": bool(ratio >= 40 and drop <= 0.5), "meets_stretch": bool(ratio >= 50 and drop <= 0.5),
        "per_seed": per_seed,
    }


def run(quick: bool = False) -> dict:
    from torchslim.zoo import build_task

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLP: one thread is faster, and the 2 cores are shared
    runs: dict[str, list[dict]] = {name: [] for name in POINTS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in SEEDS:
                task, dense = dense_model(seed, quick)
                for name, sparsity in POINTS.items():
                    runs[name].append(one_seed(seed, sparsity, task, dense, quick, Path(tmp)))
    finally:
        torch.set_num_threads(threads)
    points = {name: summarize(runs[name], POINTS[name]) for name in POINTS}
    head = points["headline"]
    return {
        "compression_ratio": head["compression_ratio"], "accuracy_drop_pt": head["accuracy_drop_pt"],
        "seeds": list(SEEDS), "compression_ratio_std": head["compression_ratio_std"],
        "accuracy_drop_pt_std": head["accuracy_drop_pt_std"], "kept_pct": head["kept_pct"],
        "meets_target": head["meets_target"], "meets_stretch": head["meets_stretch"],
        "test_set_size": len(build_task("digits").test.dataset),
        "target": {"compression_ratio_min": 40, "compression_ratio_stretch": 50, "accuracy_drop_pt_max": 0.5},
        "config": {"headline_sparsity": POINTS["headline"], "prune": "gradual magnitude, global, cubic schedule",
                   "share_bits": BITS, "share_init": "linear", "biases": "fp16 (rounded in the share stage)",
                   "epochs_dense_prune_share": [15, 20, 3] if quick else [60, 80, 10], "optimizer": "Adam lr 1e-3"},
        "operating_points": points,
        "torch_threads_used": 1,
        "notes": ("Run with torch.set_num_threads(1) on a machine shared with other jobs. Sizes and accuracies only "
                  "(no timing), so the shared machine does not affect them. Final accuracy is of the model loaded "
                  "from the archive. digits test split: 360 images, so 1 image = 0.28 pt; drops are means over "
                  "seeds. coder_totals: body bytes if every section used that one coder ('huffman' = zlib "
                  "Z_HUFFMAN_ONLY, pure Huffman); best_per_section is what the archive stores."),
    }
