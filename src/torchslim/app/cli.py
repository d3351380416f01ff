"""The ``torchslim`` command: demo, measure, run, report, inspect, machine, stages, online, search.

Bad input ends with one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from ..core.errors import TorchslimError
from ..core.utils import console


def _bounded(low: int, high: int):
    """argparse type: an integer in [low, high] (argparse reports a bad one and exits 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train (or load) LeNet-300-100 on digits, compress it, print the table",
                       description="The main job on the bundled default: LeNet-300-100 on sklearn digits.")
    p.add_argument("--out", default="out", help="output directory (default: out/)")
    p.add_argument("--cache-dir", default=None, help="where the trained baseline is cached (default: $TORCHSLIM_CACHE or ~/.cache/torchslim)")
    p.add_argument("--retrain", action="store_true", help="ignore the cached baseline")
    p.add_argument("--threads", type=_bounded(1, 1024), default=None,
                   help="torch threads for training and latency, 1-1024 (default: torch's)")
    p.add_argument("--seed", type=_bounded(0, 2**63 - 1), default=0)
    p.set_defaults(func=_cmd_demo)


def _add_measure(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure", help="measure a model on a task (metric, params, bytes, MACs, latency)",
                       description="Measure a zoo or user model on a zoo or user task.")
    p.add_argument("--task", required=True, help="zoo task (digits, mnist1d, minilm) or 'package.module:function'")
    p.add_argument("--model", required=True, help="zoo model (lenet300, lenet5, rescnn1d, mlp, minilm) or 'package.module:function'")
    p.add_argument("--weights", default=None, help="state dict (.safetensors, or .pt loaded with weights_only=True)")
    p.add_argument("--batch-size", type=_bounded(1, 65_536), default=256, help="batch size for latency, 1-65536 (default 256)")
    p.add_argument("--threads", type=_bounded(1, 1024), default=None, help="torch threads for latency, 1-1024")
    p.add_argument("--json", default=None, help="also write the record to this JSON file")
    p.set_defaults(func=_cmd_measure)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, cache_dir=args.cache_dir, retrain=args.retrain, threads=args.threads, seed=args.seed)
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    import json

    from ..core.measure import MeasureConfig, format_records, measure
    from ..core.utils import atomic_write_text
    from ..export.weights import load_weights
    from ..zoo import build_model, build_task

    if args.batch_size < 1:
        raise TorchslimError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.weights is not None and not os.path.isfile(args.weights):
        raise TorchslimError(f"--weights: file {args.weights!r} does not exist")
    task = build_task(args.task)
    model = build_model(args.model, task)
    if args.weights:
        load_weights(model, args.weights)
    task.check_model(model)
    from ..core.data_check import check_task_and_model

    check_task_and_model(task, model, training=False)
    record = measure(model, task, MeasureConfig(batch_size=args.batch_size, threads=args.threads),
                     saved_path=args.weights, stage=args.model)
    console().print(format_records([record]))
    if args.json:
        atomic_write_text(args.json, json.dumps(record.to_dict(), indent=2))
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a YAML/JSON recipe, measuring after every stage",
                       description="Run a recipe; writes run.json, artifacts and report.html to the output dir.")
    p.add_argument("recipe", help="recipe file (.yaml/.yml/.json)")
    p.add_argument("--out", default=None, help="output directory (default: the recipe's `out`, else out/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished stage")
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    p.add_argument("--trust-code", action="store_true",
                   help="allow the recipe's 'package.module:function' task/model/teacher specs to be imported and run "
                        "(the current folder is importable); built-in tasks and models need no flag")
    p.add_argument("--nproc", type=_bounded(1, 1024), default=1,
                   help="train with N processes on this machine, 1-1024 (DDP: gloo on CPU, NCCL on CUDA); the same as "
                        "`torchrun --standalone --nproc_per_node N -m torchslim run ...` (default 1)")
    p.set_defaults(func=_cmd_run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the HTML report (and PNG plots) of a run.json")
    p.add_argument("run_json", help="run.json written by `torchslim run` or `torchslim demo`")
    p.add_argument("--out", default=None, help="HTML path (default: report.html next to run.json)")
    p.set_defaults(func=_cmd_report)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what is in a model file (archive, safetensors, checkpoint)")
    p.add_argument("file", help="a .tsa archive, .safetensors, .pt state dict or .onnx model")
    p.set_defaults(func=_cmd_inspect)


def _cmd_run(args: argparse.Namespace) -> int:
    from ..core import distributed
    from ..core.measure import Record, format_records
    from .recipe import load_recipe
    from .runner import run_recipe

    con = console()
    recipe = load_recipe(args.recipe)  # every error surfaces here, before any work
    if args.nproc > 1 and not distributed.under_torchrun():
        argv = ["run", args.recipe, *(["--out", args.out] if args.out else []), *(["--resume"] if args.resume else []),
                *(["--no-report"] if args.no_report else []), *(["--trust-code"] if args.trust_code else [])]
        return distributed.launch(args.nproc, argv)
    summary = run_recipe(recipe, out=args.out, resume=args.resume, log=lambda m: con.print(m, markup=False),
                         trust_code=args.trust_code)
    if not distributed.is_main():
        return 0  # under torchrun rank 0 alone prints the table and writes the report
    con.print(format_records([Record.from_dict(r) for r in summary["rows"]]))
    out = args.out or recipe.spec.out or "out"
    if not args.no_report:
        from .report import write_report

        con.print(f"report: {write_report(f'{out}/run.json')}", markup=False)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.run_json, args.out))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_file import inspect_file

    console().print(inspect_file(args.file))
    return 0


def _add_machine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("machine", help="the CPU's instruction-set facts that decide int8/fp32 speed",
                       description="CPU model, ISA (AVX2 / AVX-512 / VNNI / AMX; NEON / dotprod on arm64), "
                                   "torch's kernel level, threads: what every record and benchmark names.")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=_cmd_machine)


def _cmd_machine(args: argparse.Namespace) -> int:
    import json

    from ..core.isa import describe, int8_saturates, machine_facts

    facts = machine_facts()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(describe())
    yes = [k for k, v in facts["isa_facts"].items() if v is True]
    print(f"features: {', '.join(yes) or 'none known'}; {facts['threads']} torch threads, {facts['cores']} cores")
    if int8_saturates():
        print("int8: no VNNI here: 8-bit u8*s8 kernels can saturate; torchslim's ONNX Runtime int8 uses 7-bit weights (reduce_range)")
    return 0


def _add_online(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("online", help="compress as a recipe says, then keep learning from its stream",
                       description="Prequential online learning (predict, score, then learn each batch) of a "
                                   "compressed model that stays compressed; see docs/online.md.")
    p.add_argument("recipe", help="a recipe with a `stream` block (e.g. recipes/online_digits_drift.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: the recipe's `out`, else out/)")
    p.add_argument("--resume", action="store_true", help="continue at the next unseen batch")
    p.add_argument("--trust-code", action="store_true", help="allow the recipe to import your own module")
    p.set_defaults(func=_cmd_online)


def _cmd_online(args: argparse.Namespace) -> int:
    from .online import run_online_recipe

    con = console()
    return run_online_recipe(args.recipe, args.out, resume=args.resume, trust_code=args.trust_code,
                             log=lambda m: con.print(m, markup=False))


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search the best compression policy under a budget; writes it as a recipe",
                       description="Per-layer policy search (uniform, sensitivity, random, Optuna TPE/NSGA-II, "
                                   "an AMC-style RL agent) against measured cost; see docs/search.md.")
    p.add_argument("recipe", help="a recipe with a `search` block (e.g. recipes/search_rescnn_latency.yaml)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the study (finished trials are kept)")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args: argparse.Namespace) -> int:
    from .search import run_search

    return run_search(args.recipe, args.out, resume=args.resume)


def _add_stages(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stages", help="list the recipe stages, or one stage's fields, defaults and ranges",
                       description="Every stage a recipe can name (read from the stage registry).")
    p.add_argument("name", nargs="?", default=None, help="a stage, e.g. prune, quantize, structured_prune")
    p.set_defaults(func=_cmd_stages)


def _cmd_stages(args: argparse.Namespace) -> int:
    from .stages_doc import describe, stages_table

    if args.name is not None:
        describe(args.name)  # an unknown name: one line, exit 2
    console().print(stages_table(args.name))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``torchslim: error: ...``, exit 2) like every
    other bad input, not a usage block; ``--help`` is unchanged."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise TorchslimError(f"{command}: {message}" if command else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="torchslim", description="Make trained PyTorch models really smaller and faster, and measure it."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_measure(sub)
    _add_run(sub)
    _add_report(sub)
    _add_inspect(sub)
    _add_machine(sub)
    _add_stages(sub)
    _add_online(sub)
    _add_search(sub)
    return parser


_FAULTS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
           errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory", errno.EEXIST: "already exists",
           errno.ENAMETOOLONG: "file name too long", errno.ENOENT: "no such file or directory"}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except TorchslimError as exc:
        print(f"torchslim: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _FAULTS:
            raise
        # a fault of the machine or of a path given (not a file where a folder belongs): one
        # line, exit 1; writes are atomic, so no half-written file is left under a final name
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"torchslim: error: {_FAULTS[exc.errno]}{where}: {exc.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("torchslim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
