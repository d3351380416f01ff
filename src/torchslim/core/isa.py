"""The CPU's instruction-set facts that decide int8 and fp32 speed and exactness.

The same CPU model name ("AMD EPYC") comes with AVX-512 VNNI on one machine and AVX2 only on
another; int8 kernels differ between them in speed (VNNI has a fused u8*s8 dot product) and in
*results*: without VNNI, x86 int8 GEMMs (ONNX Runtime's MatMulInteger/QLinear kernels, oneDNN)
use ``vpmaddubsw``, which adds two u8*s8 products into a **saturating** int16, so 8-bit weights
can overflow and the answer differs from exact integer arithmetic. Every measurement therefore
names these facts next to the CPU model and thread count.

Facts come from torch (``torch.backends.cpu.get_cpu_capability()`` and the ``torch.cpu``
probes, which ask cpuinfo) and from the OS (``/proc/cpuinfo`` flags on Linux, ``sysctl`` on
macOS); both are recorded so a record says where each fact came from.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

# /proc/cpuinfo flag -> our name (x86); Features entry -> our name (arm64)
_X86_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx_vnni": "avx_vnni",
    "amx_tile": "amx",
    "amx_int8": "amx_int8",
}
_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "bf16": "bf16"}


def _proc_cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


def _sysctl(name: str) -> str:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _torch_probe(fn_name: str) -> bool | None:
    fn = getattr(torch.cpu, fn_name, None)
    try:
        return bool(fn()) if fn is not None else None
    except Exception:  # noqa: BLE001 - a probe missing from this torch build: unknown, not an error
        return None


@functools.lru_cache(maxsize=1)
def cpu_isa() -> dict[str, Any]:
    """The CPU facts that matter for int8/fp32 speed, cached for the process.

    Keys: ``cpu`` (model name), ``arch``, ``torch_capability`` (what torch's kernels dispatch
    to: DEFAULT, AVX2, AVX512, or arm's SVE*), boolean features (avx2, fma, avx512,
    avx512_vnni, avx_vnni, amx on x86; neon, dotprod, i8mm, sve on arm64), ``vnni`` (either
    VNNI form: int8 dot products without int16 saturation), ``summary`` (one short string such
    as ``"AVX2 (no VNNI)"``) and ``source``.
    """
    arch = platform.machine().lower()
    name, flags = _proc_cpuinfo()
    source = "/proc/cpuinfo" if flags else ""
    if not flags and platform.system() == "Darwin":
        name = _sysctl("machdep.cpu.brand_string")
        flags = set((_sysctl("machdep.cpu.features") + " " + _sysctl("machdep.cpu.leaf7_features")).lower().split())
        if arch in ("arm64", "aarch64"):  # Apple silicon: NEON and dotprod are architectural
            flags |= {"asimd"} | ({"asimddp"} if _sysctl("hw.optional.arm.FEAT_DotProd") == "1" else set())
        source = "sysctl"
    facts: dict[str, Any] = {"cpu": name or platform.processor() or arch, "arch": arch}
    try:
        facts["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch without the call
        facts["torch_capability"] = "unknown"
    if arch in ("x86_64", "amd64", "i386", "i686"):
        for flag, key in _X86_FLAGS.items():
            facts[key] = flag in flags
        # torch's cpuinfo probes agree with the OS flags where both exist; trust either "yes"
        for key, probe in (("avx2", "_is_avx2_supported"), ("avx512", "_is_avx512_supported"),
                           ("avx512_vnni", "_is_vnni_supported"), ("amx", "_is_amx_tile_supported")):
            if _torch_probe(probe) and not facts[key]:
                facts[key] = True
                source = f"{source}+torch.cpu" if source and "torch" not in source else (source or "torch.cpu")
        facts["vnni"] = bool(facts["avx512_vnni"] or facts["avx_vnni"])
    else:
        for flag, key in _ARM_FLAGS.items():
            facts[key] = flag in flags
        facts["vnni"] = False
    facts["source"] = source or "torch"
    facts["summary"] = _summary(facts)
    return facts


def _summary(f: dict[str, Any]) -> str:
    if "avx2" in f:
        if f.get("amx"):
            base = "AVX-512 VNNI + AMX"
        elif f.get("avx512") and f.get("avx512_vnni"):
            base = "AVX-512 VNNI"
        elif f.get("avx512"):
            base = "AVX-512 (no VNNI)"
        elif f.get("avx2") and f.get("avx_vnni"):
            base = "AVX2 + AVX-VNNI"
        elif f.get("avx2"):
            base = "AVX2 (no VNNI)"
        else:
            base = "x86 without AVX2"
        return base
    parts = [k.upper() if k != "dotprod" else "dotprod" for k in ("neon", "dotprod", "i8mm", "sve") if f.get(k)]
    return f"{f['arch']} " + (" + ".join(parts) if parts else "(no SIMD facts)")


def int8_saturates() -> bool:
    """True on x86 CPUs without VNNI, where u8*s8 int8 GEMM kernels add pairs of products into
    a saturating int16 (``vpmaddubsw``): full-range 8-bit weights can then give wrong sums.
    ONNX Runtime's ``reduce_range`` (7-bit weights) exists for exactly this case."""
    f = cpu_isa()
    return "avx2" in f and not f["vnni"] and not f.get("amx")


def machine_facts(threads: int | None = None) -> dict[str, Any]:
    """What every record, run.json and benchmark result states about where it ran."""
    f = cpu_isa()
    return {
        "cpu": f["cpu"],
        "isa": f["summary"],
        "isa_facts": {k: v for k, v in f.items() if k not in ("cpu", "summary")},
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cores": os.cpu_count(),
    }


def describe() -> str:
    """One line for headers and tables: 'AMD EPYC, AVX2 (no VNNI), torch AVX2'."""
    f = cpu_isa()
    return f"{f['cpu']}, {f['summary']}, torch kernels {f['torch_capability']}"


def isa_slug(summary: str | None = None) -> str:
    """A file-name-safe key for an ISA summary: 'avx2', 'avx512-vnni', 'amx', 'arm64-neon-dotprod'
    (benchmark results are kept one file per benchmark and ISA)."""
    s = (summary or cpu_isa()["summary"]).lower()
    table = (("amx", "amx"), ("avx-512 vnni", "avx512-vnni"), ("avx-512", "avx512"),
             ("avx-vnni", "avx2-avxvnni"), ("avx2", "avx2"))
    for key, slug in table:
        if key in s:
            return slug
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").replace("--", "-") or "unknown"
