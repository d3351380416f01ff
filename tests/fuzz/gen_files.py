"""Fuzz cases for user files: data files of the npz/csv tasks and model artifacts (issue 12.7).

Split from generators.py (which re-exports them) to keep each file short; same ``Case`` oracle.
"""

from __future__ import annotations

import io
import random

import yaml
from generators import MARKER, Case


# ------------------------------------------------------------------ data files (npz / csv tasks)
def _npz(**arrays) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _data_recipe(task: str, fname: str, kwargs: dict | None = None) -> bytes:
    spec = {"task": {"name": task, "kwargs": {"path": f"{{d}}/{fname}", "batch_size": 16, **(kwargs or {})}},
            "model": {"name": "mlp", "kwargs": {"hidden": [8]}}, "seed": 0, "train": {"epochs": 1}}
    return yaml.safe_dump(spec).encode()


def data_cases(n: int, seed: int) -> list[Case]:
    import numpy as np

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        r = np.random.default_rng(rng.getrandbits(32))
        rows, feats, classes = rng.randint(60, 400), rng.randint(1, 12), rng.randint(2, 5)
        x = r.normal(size=(rows, feats)).astype(np.float32)
        y = np.arange(rows) % classes
        fmt = rng.choice(["npz", "csv"])
        kind, expect, why, kw = rng.choice([
            ("clean", "valid", "balanced numeric data", {}), ("nan", "invalid", "NaN feature", {}),
            ("inf", "invalid", "Inf feature", {}), ("huge", "invalid", "1e39 overflows float32", {}),
            ("three-samples", "invalid", "3 samples cannot be split 60/20/20", {}),
            ("one-per-class", "invalid", "a class with one sample", {}), ("empty", "invalid", "0 bytes", {}),
            ("header-only", "invalid", "no rows", {}), ("ragged", "invalid", "ragged rows", {}),
            ("text-label", "invalid", "text in a numeric column", {}), ("wrong-key", "invalid", "no array 'x'", {}),
            ("length-mismatch", "invalid", "x and y lengths differ", {}), ("garbage", "invalid", "random bytes", {}),
            ("truncated", "invalid" if fmt == "npz" else "any", "truncated file", {}), ("label-col", "invalid", "label_column out of range",
                                                              {"label_column": rng.choice([99, -99])}),
            ("dir", "invalid", "a directory as the data file", {}), ("bad-kwarg", "invalid", "unknown kwarg", {"sep": ";"}),
            ("object", "invalid", "object array (pickle)", {}), ("scalar", "invalid", "0-d arrays", {}),
        ])
        if fmt == "csv" and kind in ("wrong-key", "object", "scalar"):
            continue
        if fmt == "npz" and kind in ("header-only", "ragged", "label-col"):
            continue
        if kind == "nan":
            x[rng.randrange(rows), rng.randrange(feats)] = np.nan
        elif kind == "inf":
            x[rng.randrange(rows), rng.randrange(feats)] = rng.choice([np.inf, -np.inf])
        elif kind == "three-samples":
            x, y = x[:3], y[:3]
        elif kind == "one-per-class":
            y = y.copy()
            y[0] = classes
        fname = f"data.{fmt}"
        if fmt == "npz":
            if kind == "huge":
                blob = _npz(x=x.astype(np.float64) * 1e39, y=y)
            elif kind == "wrong-key":
                blob = _npz(features=x, labels=y)
            elif kind == "length-mismatch":
                blob = _npz(x=x, y=y[: rows // 2])
            elif kind == "object":
                buf = io.BytesIO()
                np.savez(buf, x=np.array([{"a": 1}] * rows, dtype=object), y=y)
                blob = buf.getvalue()
            elif kind == "scalar":
                blob = _npz(x=np.float32(1), y=np.int64(0))
            elif kind == "text-label":
                blob = _npz(x=np.array([["a"] * feats] * rows), y=y)
            else:
                blob = _npz(x=x, y=y)
        else:
            lines = [",".join(f"f{i}" for i in range(feats)) + ",label"]
            scale = 1e39 if kind == "huge" else 1.0
            lines += [",".join(f"{float(v) * scale:.6g}" for v in row) + f",{lab}" for row, lab in zip(x, y)]
            if kind == "ragged":
                lines[rng.randint(1, len(lines) - 1)] += ",7"
            elif kind == "text-label":
                lines[rng.randint(1, len(lines) - 1)] = ",".join(["x"] * (feats + 1))
            elif kind == "header-only":
                lines = lines[:1]
            elif kind == "length-mismatch":
                lines[-1] = lines[-1].rsplit(",", 1)[0]
            blob = ("\n".join(lines) + "\n").encode()
        if kind == "empty":
            blob = b""
        elif kind == "garbage":
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000)))
        elif kind == "truncated":
            blob = blob[: rng.randint(1, max(2, len(blob) - 1))]
        files = {"r.yaml": _data_recipe(fmt, fname, kw)}
        if kind != "dir":
            files[fname] = blob
        else:
            files["r.yaml"] = _data_recipe(fmt, "", kw)
        out.append(Case("data", f"{fmt}-{kind}", expect, why, ["run", "{d}/r.yaml", "--out", "{d}/out"], files, "deep"))
    return out


# ------------------------------------------------------------------ artifacts (torchslim inspect / --weights)
class _Payload:
    """Unpickling this creates the marker file: it must never happen (weights_only=True)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _onnx_bytes() -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    b = numpy_helper.from_array(np.ones(3, np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w, b])
    from torchslim.export.digest import stamp_onnx_bytes

    return stamp_onnx_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def seed_artifacts(folder: str) -> dict[str, tuple[str, bytes]]:
    """kind -> (suffix, bytes) of one small valid file of each kind (and lenet300 weights for digits)."""
    import pickle
    from pathlib import Path

    import torch

    from torchslim.export.archive import save_archive
    from torchslim.export.sparse import save_sparse
    from torchslim.export.weights import save_weights
    from torchslim.zoo import models

    d = Path(folder)
    torch.manual_seed(0)
    tiny = models.mlp(in_shape=(6,), num_classes=3, hidden=(8,))
    with torch.no_grad():
        for p in tiny.parameters():
            p[p.abs() < 0.2] = 0
    lenet = models.lenet300()
    save_archive(tiny, d / "a.tsla")
    save_sparse(tiny, d / "s.safetensors")
    save_weights(tiny, d / "w.safetensors")
    save_weights(tiny, d / "w.pt")
    save_weights(lenet, d / "l.safetensors")
    save_weights(lenet, d / "l.pt")
    torch.save({"w": _Payload(f"{d}/{MARKER}")}, d / "evil.pt")
    torch.save({"w": torch.zeros(2), "m": _Payload(f"{d}/{MARKER}")}, d / "evil2.pt", _use_new_zipfile_serialization=False)
    out = {k: (Path(f).suffix, (d / f).read_bytes()) for k, f in [
        ("archive", "a.tsla"), ("sparse", "s.safetensors"), ("safetensors", "w.safetensors"), ("pt", "w.pt"),
        ("lenet-safetensors", "l.safetensors"), ("lenet-pt", "l.pt"), ("evil-zip", "evil.pt"), ("evil-legacy", "evil2.pt")]}
    out["evil-raw"] = (".pt", pickle.dumps(_Payload(f"{d}/{MARKER}")))
    out["onnx"] = (".onnx", _onnx_bytes())
    return out


# formats whose every byte is under a checksum or a strict parser: any damage must be refused.
# torch files (zip) and ONNX also carry a checksum of their tensor data, but a flip in a zip
# record's padding or an ONNX field name can leave what loads intact, so they stay "any".
CHECKED = {"archive", "sparse", "safetensors", "lenet-safetensors"}


def artifact_cases(n: int, seed: int, seeds: dict[str, tuple[str, bytes]]) -> list[Case]:
    rng = random.Random(seed)
    plain = ["archive", "sparse", "safetensors", "pt", "onnx"]
    out = []
    for k in ("evil-zip", "evil-legacy", "evil-raw"):
        for cmd in ("inspect", "measure"):
            out.append(_art(cmd, k, seeds[k], "invalid", "pickle payload"))
    while len(out) < n:
        kind = rng.choice(plain + ["lenet-safetensors", "lenet-pt"])
        suffix, blob = seeds[kind]
        cmd = "measure" if kind.startswith("lenet") else rng.choice(["inspect"] * 4 + ["measure"])
        op = rng.choice(["intact", "flip", "flip", "truncate", "truncate", "zero", "append", "swap", "header", "tiny"])
        expect, why = "any", op
        if op == "intact":
            expect, why = ("valid", "intact file") if cmd == "inspect" or kind.startswith("lenet") else ("invalid", "weights of another model")
        elif op == "flip":
            blob = bytearray(blob)
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
            blob = bytes(blob)
            expect, why = ("invalid", "bit flips under a checksum") if kind in CHECKED else ("any", "bit flips")
        elif op == "truncate":
            blob = blob[: rng.randrange(1, len(blob))]
            expect, why = "invalid", f"truncated to {len(blob)} bytes"
        elif op == "zero":
            blob, expect, why = b"", "invalid", "0 bytes"
        elif op == "append":
            blob += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
            expect, why = ("invalid", "junk after a checksummed file") if kind == "archive" else ("any", "junk appended")
        elif op == "swap":
            other = rng.choice([s for s in (".tsla", ".safetensors", ".pt", ".onnx", ".bin") if s != suffix])
            suffix, why = other, f"{kind} named {other}"
            # inspect reads by content; --weights picks its reader by suffix (a refusal is fine there)
            expect = "valid" if cmd == "inspect" else "any" if kind.startswith("lenet") else "invalid"
        elif op == "header":
            fake = rng.choice([(2**63).to_bytes(8, "little") + b"{}", (len(blob) * 4).to_bytes(8, "little") + b"{\"a\":1}",
                               (20).to_bytes(8, "little") + b'{"t":{"dtype":"F32","shape":[99999],"data_offsets":[0,4]}}',
                               b"TSLA" + bytes(rng.getrandbits(8) for _ in range(40)), b"PK\x03\x04" + b"\x00" * 40,
                               b"\x08\x07" + bytes(rng.getrandbits(8) for _ in range(60))])
            blob, expect, why = fake, "invalid", "forged header"
        else:
            blob, expect, why = blob[:9], "invalid", "first 9 bytes only"
        out.append(_art(cmd, kind, (suffix, blob), expect, why, op))
    return out[:n]


def _art(cmd: str, kind: str, file: tuple[str, bytes], expect: str, why: str, op: str = "seed") -> Case:
    name = "f" + file[0]
    argv = ["inspect", f"{{d}}/{name}"] if cmd == "inspect" else [
        "measure", "--task", "digits", "--model", "lenet300", "--weights", f"{{d}}/{name}"]
    return Case("artifact", f"{cmd}-{kind}-{op}", expect, why, argv, {name: file[1]}, "deep")
