"""Seeded fuzz cases for the torchslim command line (issue 12, point 7).

Each ``Case`` is a command line (``{d}`` stands for the case's own temporary folder), the files
to write there first, how far the harness lets the command go (``mode``) and the oracle:
``expect`` is "valid" (must be accepted), "invalid" (must be refused in one line) or "any"
(a corruption that may be harmless: either is fine, only a traceback or a hang is not), with
``why``. Nothing here trains or measures: the harness stops every command at the first training
step or measurement.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MARKER = "PWNED_MARKER"  # a pickle payload creates {d}/PWNED_MARKER if it is ever executed


@dataclasses.dataclass
class Case:
    category: str  # recipe, cli, data, artifact
    kind: str  # short label of the generator that made it
    expect: str  # valid / invalid / any
    why: str
    argv: list[str]
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    mode: str = "validate"  # validate: run_recipe stubbed; deep: real runner up to the first fit/measure

    def label(self) -> str:
        return f"{self.category}/{self.kind} [{self.expect}: {self.why}] argv={self.argv}"


# ------------------------------------------------------------------ recipes
ENUM_FIELDS = {"criterion", "scope", "schedule", "optimizer", "scheduler", "weight_scheme", "act_scheme",
               "granularity", "weight_observer", "mode", "calibration", "backend", "init", "allocation",
               "split", "device"}
NONFINITE = [math.nan, math.inf, -math.inf]
HUGE = [1e308, -1e308, 10**30, -(10**30)]


def _base_recipes() -> list[dict]:
    """The shipped recipes that ``torchslim run`` takes (search and online recipes, with a
    ``search`` / ``stream`` block, belong to their own commands)."""
    out = [yaml.safe_load(p.read_text()) for p in RECIPES]
    return [r for r in out if isinstance(r, dict) and not {"search", "stream"} & set(r)]


def _is_digits(r: dict) -> bool:
    t = r.get("task")
    return (t if isinstance(t, str) else t.get("name") if isinstance(t, dict) else None) == "digits"


def _stage_fields() -> dict[str, dict[str, object]]:
    """technique -> {field: type hint}, from the registered config dataclasses."""
    import typing

    from torchslim.core.stage import stage_names

    return {n: {f.name: typing.get_type_hints(c).get(f.name) for f in dataclasses.fields(c) if f.init}
            for n, c in stage_names().items()}


def _bad_value(rng: random.Random, name: str, hint: object) -> tuple[object, str] | None:
    """A value no field of this type accepts, with the reason; None when there is none."""
    text = str(hint)
    if "Any" in text or "TrainConfig" in text or "RecoveryConfig" in text:
        return None
    if hint is bool:
        return rng.choice([("maybe", "string for a bool"), (2, "2 for a bool"), ([True], "list for a bool")])
    if hint is int or text.startswith("int |"):
        if "dict" in text:
            return rng.choice([("eight", "string for int|dict"), (1.5, "fractional float for int")])
        return rng.choice([("many", "string for an int"), (1.5, "fractional float for an int"),
                           ([1], "list for an int"), (True, "bool for an int"), (10**30, "int beyond 2**63"),
                           (math.nan, "nan for an int"), ({"a": 1}, "mapping for an int")])
    if hint is float or text.startswith("float |"):
        v = rng.choice(NONFINITE + HUGE[:2])
        return rng.choice([(v, f"{v!r} for a float"), ("fast", "string for a float"), ([0.5], "list for a float"),
                           (True, "bool for a float")])
    if hint is str or text.startswith("str |"):
        if name in ENUM_FIELDS:
            return rng.choice([("no-such-choice", "unknown choice"), (5, "int for a string"), (["a"], "list for a string")])
        return rng.choice([(5, "int for a string"), (["a"], "list for a string"), ({"a": 1}, "mapping for a string")])
    if text.startswith(("tuple[str", "list[str")) or "tuple[str" in text:
        return rng.choice([(5, "int for a list of names"), ([1, 2], "ints for names"), ({"a": 1}, "mapping for names")])
    if text.startswith("dict"):
        return rng.choice([("x", "string for a mapping"), ([1, 2], "list for a mapping")])
    return None


TOP_BAD = [
    (("seed",), -1, "negative seed"), (("seed",), 2**64, "seed beyond 2**63"), (("seed",), True, "bool seed"),
    (("seed",), 1.5, "fractional seed"), (("seed",), "x", "string seed"), (("seed",), math.nan, "nan seed"),
    (("measure", "batch_size"), 0, "batch 0"), (("measure", "batch_size"), 10**7, "batch 10**7"),
    (("measure", "batch_size"), True, "bool batch"), (("measure", "repeats"), 0, "repeats 0"),
    (("measure", "repeats"), 10**9, "repeats 10**9"), (("measure", "threads"), 0, "threads 0"),
    (("measure", "threads"), -3, "threads -3"), (("measure", "colour"), 1, "unknown measure key"),
    (("export",), ["zip"], "unknown export"), (("export",), "onnx", "export not a list"),
    (("guard", "max_drop"), -0.1, "negative max_drop"), (("guard", "max_drop"), 2.0, "max_drop > 1"),
    (("guard", "max_drop"), math.nan, "nan max_drop"), (("guard", "error"), "maybe", "string for a bool"),
    (("stages",), {"prune": {}}, "stages not a list"), (("stages",), "prune", "stages a string"),
    (("train",), 5, "train not a mapping"), (("train", "epochs"), -1, "negative epochs"),
    (("train", "epochs"), 10**12, "10**12 epochs"), (("train", "lr"), math.inf, "inf lr"),
    (("train", "lr"), 0, "lr 0"), (("train", "bogus"), 1, "unknown train field"),
    (("colour",), "red", "unknown top-level key"), (("name",), ["a"], "list name"), (("out",), 5, "int out"),
    (("trust_code",), "os", "trust_code not a list"), (("task",), 5, "task an int"), (("task",), None, "task null"),
    (("model",), ["lenet300"], "model a list"), (("task",), {"nme": "digits"}, "misspelled task key"),
]
STAGE_BAD = [
    ({"prune": {}, "share": {}}, "two techniques in one stage"), ({}, "stage without a technique"),
    ({"prunee": {"sparsity": 0.5}}, "unknown technique"), ({"magic": None}, "unknown technique"),
    ("prune", "stage is a string"), (5, "stage is an int"), ({"prune": 0.9}, "technique value a number"),
    ({"prune": {"sparsity": 0.5}, "name": 7}, "stage name an int"),
    ({"prune": {"sparsity": 1.0}}, "sparsity 1"), ({"prune": {"sparsity": -0.1}}, "negative sparsity"),
    ({"prune": {"sparsity": 0.5}, "finetune": {"epochs": 0.5}}, "fractional finetune epochs"),
    ({"prune": {"sparsity": 0.5}, "finetune": 3}, "finetune a number"),
    ({"share": {"bits": 0}}, "0-bit sharing"), ({"share": {"bits": 64}}, "64-bit sharing"),
    ({"quantize": {"bits": 3.5}}, "fractional bits"), ({"quantize": {"bits": 1}}, "1-bit quantization"),
    ({"lowrank": {"params_keep": 0}}, "rank ratio 0"), ({"lowrank": {"params_keep": 1.5}}, "rank ratio > 1"),
    ({"nm": {"n": 4, "m": 2}}, "n > m"), ({"nm": {"n": 0, "m": 4}}, "n = 0"),
    ({"structured_prune": {"macs_keep": 0}}, "keep 0 MACs"), ({"structured_prune": {"macs_keep": 1.5}}, "keep 150% MACs"),
    ({"train": {"epochs": 10**9}}, "10**9 epochs"), ({"train": {"optimizer": "os.system"}}, "optimizer not in torch.optim"),
    ({"distill": {"temperature": 0}}, "temperature 0"), ({"distill": {"alpha": 2}}, "alpha > 1"),
]
SPEC_BAD = [  # task / model specs, checked by the runner before any work (deep mode)
    ({"task": "no_such_task"}, "unknown task"), ({"model": "no_such_model"}, "unknown model"),
    ({"task": {"name": "digits", "kwargs": {"batch_size": 0}}}, "batch_size 0"),
    ({"task": {"name": "digits", "kwargs": {"batch_size": 10**9}}}, "batch_size 10**9"),
    ({"task": {"name": "digits", "kwargs": {"batch_size": True}}}, "bool batch_size"),
    ({"task": {"name": "digits", "kwargs": {"bogus": 1}}}, "unknown task kwarg"),
    ({"task": {"name": "digits", "kwargs": [1]}}, "task kwargs a list"),
    ({"model": {"name": "mlp", "kwargs": {"hidden": [0]}}}, "zero-width layer"),
    ({"model": {"name": "mlp", "kwargs": {"hidden": []}}}, "no hidden layers list"),
    ({"model": {"name": "mlp", "kwargs": {"hidden": "wide"}}}, "hidden a string"),
    ({"model": {"name": "lenet300", "kwargs": {"depth": 3}}}, "unknown model kwarg"),
    ({"model": {"name": "lenet300", "weights": "{d}/missing.safetensors"}}, "missing weights file"),
    ({"model": {"name": "lenet300", "weights": "{d}"}}, "a directory as weights"),
    ({"task": "os:system"}, "code spec without --trust-code"), ({"model": "subprocess:call"}, "code spec without --trust-code"),
]


def _set(data: dict, path: tuple, value: object) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return data


def _dump(data: object, rng: random.Random) -> tuple[str, bytes]:
    if rng.random() < 0.3:
        return "r.json", json.dumps(data).encode()  # nan/inf become NaN/Infinity literals
    return "r.yaml", yaml.safe_dump(data, allow_unicode=True).encode()


def _recipe_case(rng, data, kind, expect, why, extra=(), text=None, name=None, deep=None):
    fname, blob = (name or "r.yaml", text) if text is not None else _dump(data, rng)
    is_deep = deep if deep is not None else (isinstance(data, dict) and _is_digits(data))
    return Case("recipe", kind, expect, why, ["run", f"{{d}}/{fname}", "--out", "{d}/out", *extra],
                {fname: blob}, "deep" if is_deep else "validate")


def _text_cases(rng: random.Random, base: dict) -> list[Case]:
    good = yaml.safe_dump(base)
    alias = "a: &a [" + ",".join(["x"] * 9) + "]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefg", "bcdefgh"))
    deep_text = "task: digits\nmodel: lenet300\nx: " + "[" * rng.randint(40, 3000)
    nested = "task: digits\nmodel: lenet300\nstages:\n" + "".join("  " * i + "- \n" for i in range(1, 60))
    cases = [
        ("duplicate-key", (good + "seed: 3\nseed: 4\n").encode(), "r.yaml", "duplicate key"),
        ("duplicate-key-json", b'{"task": "digits", "model": "lenet300", "task": "mnist1d"}', "r.json", "duplicate JSON key"),
        ("alias-bomb", (alias + "task: digits\nmodel: lenet300\n").encode(), "r.yaml", "billion laughs"),
        ("deep-brackets", deep_text.encode(), "r.yaml", "unclosed deep nesting"),
        ("deep-lists", nested.encode(), "r.yaml", "lists nested 60 deep"),
        ("deep-json", ("[" * 5000 + "]" * 5000).encode(), "r.json", "JSON nested 5000 deep"),
        ("utf16", good.encode("utf-16"), "r.yaml", "UTF-16 text"),
        ("bad-utf8", good.encode()[:20] + bytes([0xFF, 0xFE, 0xC3]) + good.encode()[20:], "r.yaml", "invalid UTF-8"),
        ("nul-byte", good.encode() + b"\x00seed: 1\n", "r.yaml", "NUL byte"),
        ("huge", good.encode() + b"#" * (1 << 20) + b"\n", "r.yaml", "over 1 MiB"),
        ("huge-list", ("task: digits\nmodel: lenet300\nexport: [" + ",".join(["onnx"] * 300_000) + "]\n").encode(),
         "r.yaml", "300k values"),
        ("empty", b"", "r.yaml", "empty file"), ("scalar", b"42\n", "r.yaml", "top-level scalar"),
        ("list", b"- task: digits\n", "r.yaml", "top-level list"),
        ("python-tag", b"task: !!python/object/apply:os.system ['touch PWNED_MARKER']\nmodel: lenet300\n", "r.yaml",
         "python object tag"),
        ("binary-tag", b"task: !!binary aGVsbG8=\nmodel: lenet300\n", "r.yaml", "binary scalar for task"),
        ("date-seed", good.replace("seed: 0", "seed: 2001-12-14").encode(), "r.yaml", "date for seed"),
        ("tabs", b"task:\tdigits\n\tmodel: lenet300\n", "r.yaml", "tab indentation"),
        ("broken", good.encode()[: rng.randint(5, max(6, len(good) // 2))] + b"\n  - [unclosed: {", "r.yaml", "truncated YAML"),
        ("json-nan", b'{"task": "digits", "model": "lenet300", "seed": NaN}', "r.json", "NaN seed in JSON"),
        ("key-list", b"task: digits\nmodel: lenet300\n[a, b]: 1\n", "r.yaml", "list as key"),
        ("int-key", b"task: digits\nmodel: lenet300\n1: 2\n", "r.yaml", "int top-level key"),
        ("missing-task", b"model: lenet300\n", "r.yaml", "no task"),
        ("wrong-ext-text", good.encode(), "r.json", "YAML text in a .json file"),
    ]
    return [_recipe_case(rng, None, f"text-{k}", "invalid", w, text=t, name=n, deep=True) for k, t, n, w in cases]


def recipe_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    bases = _base_recipes()
    fields = _stage_fields()
    out = [_recipe_case(rng, b, "original", "valid", "a shipped recipe") for b in bases]
    out += _text_cases(rng, next(b for b in bases if _is_digits(b)))
    while len(out) < n:
        base = rng.choice(bases)
        roll = rng.random()
        if roll < 0.30:  # a bad value in a stage config field
            tech = rng.choice(sorted(fields))
            name, hint = rng.choice(sorted(fields[tech].items(), key=lambda kv: kv[0]))
            bad = _bad_value(rng, name, hint)
            if bad is None:
                continue
            data = copy.deepcopy(base)
            data["stages"] = [{tech: {name: bad[0]}}]
            out.append(_recipe_case(rng, data, f"field-{tech}.{name}", "invalid", bad[1]))
        elif roll < 0.45:
            path, value, why = rng.choice(TOP_BAD)
            out.append(_recipe_case(rng, _set(base, path, value), "top-" + ".".join(map(str, path)), "invalid", why))
        elif roll < 0.60:
            stage, why = rng.choice(STAGE_BAD)
            data = copy.deepcopy(base)
            data["stages"] = [*data.get("stages", [])[:1], stage]
            out.append(_recipe_case(rng, data, "stage", "invalid", why))
        elif roll < 0.70:
            tech = rng.choice(sorted(fields))
            data = _set(base, ("stages",), [{tech: {f"bogus_{rng.randint(0, 99)}": 1}}])
            out.append(_recipe_case(rng, data, f"unknown-field-{tech}", "invalid", "unknown config field"))
        elif roll < 0.82:
            digits = next(b for b in bases if _is_digits(b))
            change, why = rng.choice(SPEC_BAD)
            data = {**copy.deepcopy(digits), **copy.deepcopy(change)}
            out.append(_recipe_case(rng, data, "spec", "invalid", why, deep=True))
        else:  # valid variations: in-range values must still be accepted
            data = copy.deepcopy(base)
            data["seed"] = rng.randint(0, 2**31)
            if rng.random() < 0.5:
                data["measure"] = {"batch_size": rng.randint(1, 512), "repeats": rng.randint(1, 50)}
            if _is_digits(data) and rng.random() < 0.5:
                data["stages"] = [{"prune": {"sparsity": round(rng.uniform(0, 0.99), 3)}},
                                  {"train": {"epochs": rng.randint(1, 5), "lr": 10 ** rng.uniform(-5, -1)}}]
            out.append(_recipe_case(rng, data, "valid-variation", "valid", "in-range values"))
    return out[:n]


# ------------------------------------------------------------------ command lines
def cli_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    digits = yaml.safe_dump(next(b for b in _base_recipes() if _is_digits(b))).encode()
    fixed = [
        (["machine"], "valid", "machine facts", {}), (["machine", "--json"], "valid", "machine facts", {}),
        (["--help"], "valid", "help", {}), (["run", "--help"], "valid", "help", {}),
        (["measure", "--task", "digits", "--model", "lenet300"], "valid", "zoo measure", {}),
        (["measure", "--task", "digits", "--model", "mlp", "--batch-size", "7", "--threads", "1"], "valid", "zoo measure", {}),
        (["demo", "--out", "{d}/o", "--seed", "3"], "valid", "demo", {}),
        (["run", "{d}/r.yaml", "--out", "{d}/o", "--no-report"], "valid", "shipped recipe", {"r.yaml": digits}),
        ([], "invalid", "no command", {}), (["frobnicate"], "invalid", "unknown command", {}),
        (["run"], "invalid", "missing recipe", {}), (["inspect"], "invalid", "missing file", {}),
        (["run", "{d}/nope.yaml"], "invalid", "missing recipe file", {}), (["run", "{d}"], "invalid", "directory as recipe", {}),
        (["run", "{d}/r.yaml", "--out", "{d}/r.yaml"], "invalid", "a file as the output folder", {"r.yaml": digits}),
        (["run", "{d}/r.yaml", "--out", "{d}/o", "--resume"], "any", "resume without an earlier run", {"r.yaml": digits}),
        (["run", "{d}/r.yaml", "--bogus"], "invalid", "unknown flag", {"r.yaml": digits}),
        (["inspect", "{d}/nope.bin"], "invalid", "missing file", {}), (["inspect", "{d}"], "invalid", "directory", {}),
        (["report", "{d}/nope.json"], "invalid", "missing run.json", {}), (["report", "{d}"], "invalid", "directory", {}),
        (["report", "{d}/r.json"], "invalid", "not JSON", {"r.json": b"{rows: ["}),
        (["report", "{d}/r.json"], "invalid", "JSON list", {"r.json": b"[1, 2]"}),
        (["report", "{d}/r.json"], "invalid", "no rows", {"r.json": b"{}"}),
        (["report", "{d}/r.json"], "invalid", "binary", {"r.json": bytes(range(256))}),
        (["report", "{d}/r.json"], "any", "empty rows", {"r.json": b'{"rows": []}'}),
        (["report", "{d}/r.json"], "any", "nonsense rows", {"r.json": b'{"rows": [{"stage": 5, "metric": "x"}, 3]}'}),
        (["report", "{d}/r.json", "--out", "{d}/r.json/x.html"], "invalid", "output under a file", {"r.json": b'{"rows": []}'}),
        (["measure", "--task", "digits"], "invalid", "missing --model", {}),
        (["measure", "--task", "digits", "--model", "lenet300", "--weights", "{d}/nope.pt"], "invalid", "missing weights", {}),
        (["measure", "--task", "digits", "--model", "lenet300", "--weights", "{d}"], "invalid", "directory as weights", {}),
        (["measure", "--task", "digits", "--model", "lenet300", "--weights", "{d}/w.safetensors"], "invalid",
         "garbage weights", {"w.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"}),
        (["measure", "--task", "nope", "--model", "lenet300"], "invalid", "unknown task", {}),
        (["measure", "--task", "digits", "--model", "nope"], "invalid", "unknown model", {}),
        (["measure", "--task", "mnist1d", "--model", "minilm"], "invalid", "model does not fit task", {}),
        (["measure", "--task", "no_such_module_xyz:f", "--model", "lenet300"], "invalid", "unimportable task", {}),
    ]
    out = [Case("cli", "fixed", e, w, a, f, "deep") for a, e, w, f in fixed]
    bad_ints = ["0", "-1", "abc", "1.5", "99999999999999999999", "", "nan", "1e3"]
    while len(out) < n:
        roll = rng.random()
        if roll < 0.35:
            flag = rng.choice(["--batch-size", "--threads"])
            v = rng.choice(bad_ints)
            out.append(Case("cli", f"measure{flag}", "invalid", f"{flag} {v!r}",
                            ["measure", "--task", "digits", "--model", "lenet300", flag, v], mode="deep"))
        elif roll < 0.55:
            flag, v = rng.choice([("--threads", x) for x in bad_ints] + [("--seed", x) for x in ("-1", "abc", "1.5", "2e100")])
            out.append(Case("cli", f"demo{flag}", "invalid", f"{flag} {v!r}", ["demo", "--out", "{d}/o", flag, v], mode="deep"))
        elif roll < 0.8:  # random token soup
            pool = ["run", "measure", "inspect", "report", "demo", "machine", "--out", "--resume", "--trust-code",
                    "--json", "--task", "--model", "--weights", "-", "--", "{d}", "{d}/x", "é", "-h=1", "--threads=-2"]
            argv = [rng.choice(pool) for _ in range(rng.randint(1, 6))]
            if argv[0] == "machine" or "-h=1" in argv:
                continue
            out.append(Case("cli", "soup", "any", "random tokens", argv, mode="deep"))
        else:
            cmd = rng.choice(["inspect", "report", "run"])
            name = rng.choice(["x.yaml", "x.json", "x.tsla", "x.onnx", "x.pt", "x.safetensors"])
            blob = rng.choice([b"", b"\xff" * rng.randint(1, 4000), bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))])
            out.append(Case("cli", f"{cmd}-garbage", "invalid", f"{len(blob)} random bytes as {name}",
                            [cmd, f"{{d}}/{name}"], {name: blob}, "deep"))
    return out[:n]



def all_cases(sizes: dict[str, int], seed: int, folder: str) -> list[Case]:
    """Every category at the given sizes; ``folder`` holds the seed artifacts' scratch files."""
    from gen_files import artifact_cases, data_cases, seed_artifacts

    return (recipe_cases(sizes["recipe"], seed) + cli_cases(sizes["cli"], seed + 1)
            + data_cases(sizes["data"], seed + 2) + artifact_cases(sizes["artifact"], seed + 3, seed_artifacts(folder)))
