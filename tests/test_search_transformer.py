"""Issue 13 item 1: the transformer search space (heads / FFN units kept per layer, int8 or float per
Linear group), a policy written as a recipe that ``run_recipe`` reproduces, and the measured cost.
A tiny BERT built from a config with random weights (nothing downloaded)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

from torchslim import zoo
from torchslim.app.runner import run_recipe
from torchslim.core.errors import ConfigError
from torchslim.core.task import Task
from torchslim.search import transformer_eval as te
from torchslim.search import transformer_space as ts
from torchslim.zoo.minilm import SentenceEncoder, cosine_loss, mean_cosine

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB, HIDDEN, HEADS, FFN = 60, 64, 4, 256


def tiny_encoder(layers: int = 2, hidden: int = HIDDEN, heads: int = HEADS, ffn: int = FFN) -> SentenceEncoder:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=32)
    bert = BertModel(cfg)
    bert.pooler = None
    return SentenceEncoder(bert).eval()


def tiny_task() -> Task:
    """Fidelity to the tiny encoder's own embeddings (as the minilm task: mean cosine)."""
    ref = tiny_encoder()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(1, VOCAB, (8, 12), generator=g)
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[:4, 9:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            batches.append((inputs, ref(**inputs)))
    dl = DataLoader(batches, batch_size=None)
    return Task("tiny_bert_e", test=dl, train=dl, val=dl, loss=cosine_loss, metric=mean_cosine,
                metric_name="mean_cosine", num_classes=None, input_shape=None)


def _layer(space, i):
    return space.layers[i].name


def test_space_offers_only_legal_widths_and_precisions():
    model = tiny_encoder()
    space = ts.build_transformer_space(model)
    assert [x.name for x in space.layers] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert space.heads == ((4, 3, 2), (4, 3, 2))  # >= 1 head, multiples of one head
    assert space.ffn == ((256, 192, 128), (256, 192, 128))  # multiples of 64 (224 rounds to 256)
    assert space.layers[0].linears["qkv"] == tuple(f"bert.encoder.layer.0.attention.self.{k}" for k in ("query", "key", "value"))
    assert space.layers[1].linears["ffn_out"] == ("bert.encoder.layer.1.output.dense",)
    # MiniLM's shape (12 heads of 32, FFN 1536): heads 12/9/6, FFN 1536/1344/1152/768, all multiples of 64
    mini = ts.build_transformer_space(tiny_encoder(layers=1, hidden=384, heads=12, ffn=1536))
    assert mini.heads == ((12, 9, 6),) and mini.ffn == ((1536, 1344, 1152, 768),)
    assert all(f % 64 == 0 for f in mini.ffn[0])
    one = ts.build_transformer_space(model, heads_keep=(0.01,), ffn_keep=(0.01,))
    assert one.heads[0] == (4, 1) and one.ffn[0] == (256, 64)  # never 0 heads, never under 64 units
    name = _layer(space, 0)
    for bad, field in ((ts.TransformerPolicy(heads={name: 0}), "heads"), (ts.TransformerPolicy(ffn={name: 100}), "ffn"),
                       (ts.TransformerPolicy(quant={f"{name}:qkv": "blocks"}), "quant"),
                       (ts.TransformerPolicy(quant={f"{name}:ffn_out": "int4"}), "quant")):
        with pytest.raises(ConfigError, match=rf"TransformerPolicy\.{field}\["):
            ts.to_stages(bad, space)
    # B2's fidelity fixes and the unfused graph are quantize-stage options, per layer for the blocks
    q = ts.uniform_policy(space, smooth=True, fuse=False)
    q.quant[f"{name}:ffn_out"] = "blocks"
    opts = ts.to_stages(q, space)[-1]["quantize"]["ort_options"]
    assert opts["optimize"] is False and opts["block_layers"] == ["bert.encoder.layer.0.output.dense"]
    assert opts["block_bits"] == 8 and opts["smooth_alpha"] == 0.6
    assert "ort_options" not in ts.to_stages(ts.uniform_policy(space), space)[-1]["quantize"]
    # every Optuna suggestion is legal, and a policy survives its trial parameters
    import optuna

    st = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = st.ask()
        p = ts.suggest(t, space)
        space.check(p)
        assert set(p.quant) == {f"{x.name}:{g}" for x in space.layers for g in ts.GROUPS}
        assert ts.trial_params(p, space) == t.params
        st.tell(t, 0.0)


def test_plans_equal_in_effect_share_one_key():
    space = ts.build_transformer_space(tiny_encoder(), drop=True)
    a, b = _layer(space, 0), _layer(space, 1)
    one = ts.uniform_policy(space)
    one.drop = (a,)
    two = ts.uniform_policy(space, heads_keep=0.5, ffn_keep=0.5, quant="float")  # differs only in a's and b's...
    two.heads[b], two.ffn[b] = one.heads[b], one.ffn[b]
    two.quant = {k: (one.quant[k] if k.startswith(b + ":") else v) for k, v in two.quant.items()}
    two.drop = (a,)  # ...and a is dropped: the same model
    assert two.heads[a] != one.heads[a] and one.key() == two.key()
    two.ffn[b] = 128  # a kept layer's choice still tells plans apart
    assert one.key() != two.key()
    kept = ts.uniform_policy(space)  # a plan that drops nothing keys as before the change
    want = {"ffn": {a: 256, b: 256}, "fuse": True, "heads": {a: 4, b: 4}, "smooth": False,
            "quant": {f"{x}:{g}": "int8" for x in (a, b) for g in ts.GROUPS}}
    assert kept.key() == json.dumps(want, sort_keys=True)


def _policy(space):
    a, b = _layer(space, 0), _layer(space, 1)
    quant = {f"{x.name}:{g}": "int8" for x in space.layers for g in ts.GROUPS}
    quant[f"{a}:ffn_out"] = "float"
    quant[f"{b}:attn_out"] = "float"
    if space.per_layer:
        return ts.TransformerPolicy({a: 3, b: 2}, {a: 192, b: 256}, quant)
    return ts.TransformerPolicy({a: 3, b: 3}, {a: 192, b: 192}, quant)


def test_policy_recipe_runs_to_the_shapes_and_float_layers_asked(tmp_path, monkeypatch):
    monkeypatch.setitem(zoo.TASKS, "tiny_bert_e", tiny_task)
    monkeypatch.setitem(zoo.MODELS, "tiny_bert_e", lambda: tiny_encoder())
    model, task = tiny_encoder(), tiny_task()
    space = ts.build_transformer_space(model)
    p = _policy(space)
    base = {"task": {"name": "tiny_bert_e"}, "model": {"name": "tiny_bert_e"}, "seed": 0,
            "measure": {"batch_size": 8, "threads": 1, "repeats": 2}}
    recipe = ts.to_recipe(p, space, base)
    kinds = [next(k for k in s if k != "name") for s in recipe["stages"]]
    assert kinds == ["transformer_prune"] * (2 if space.per_layer else 1) + ["quantize"]
    q = recipe["stages"][-1]["quantize"]
    floats = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.attention.output.dense"]
    assert q["backend"] == "onnxruntime" and q["mode"] == "dynamic" and sorted(q["layers"]["exclude"]) == sorted(floats)
    run = run_recipe(recipe, tmp_path / "run", log=lambda s: None)
    widths = {}
    for row in run["rows"][1:-1]:  # the transformer_prune stages, in order
        for name, rec in row["info"]["layers"].items():
            if rec["heads_after"] != rec["heads_before"] or rec["ffn_after"] != rec["ffn_before"]:
                widths[name] = (rec["heads_after"], rec["ffn_after"])
    want = {x.name: (p.heads[x.name], p.ffn[x.name]) for x in space.layers
            if (p.heads[x.name], p.ffn[x.name]) != (x.heads, x.ffn)}
    assert widths == want
    info = run["rows"][-1]["info"]
    assert info["excluded_layers_not_found"] == [] and len(info["excluded_nodes"]) == 2  # one MatMul each
    # the fused graph: one QAttention per layer (Q/K/V int8); MatMulInteger for the dense layers
    # (attention output, FFN in, FFN out: 3 per layer) less the 2 kept float
    assert info["quantized_nodes"]["QAttention"] == 2 and info["quantized_nodes"]["MatMulInteger"] == 3 * 2 - 2
    # the evaluator builds the same model the run measured (same stages, same seeds)
    ev = te.PlanEvaluator(model, task, space, base, [b for b, _ in task.test][:1], repeats=2)
    built = ev.build(p)
    assert task.evaluate(built, "test") == pytest.approx(run["rows"][-1]["metric"], abs=1e-6)
    pruned = run_recipe({**recipe, "stages": recipe["stages"][:-1]}, tmp_path / "run2", log=lambda s: None)
    assert pruned["rows"][-1]["params"] < pruned["rows"][0]["params"]


def test_per_layer_widths_refused_in_one_line_without_the_layers_field(monkeypatch):
    space = ts.build_transformer_space(tiny_encoder())
    monkeypatch.setattr(space, "per_layer", False)
    a, b = _layer(space, 0), _layer(space, 1)
    with pytest.raises(ConfigError, match=r"TransformerPolicy\.heads: per-layer widths need TransformerPruneConfig\.layers"):
        ts.to_stages(ts.TransformerPolicy({a: 3, b: 2}), space)
    stages = ts.to_stages(ts.TransformerPolicy({a: 2, b: 2}, {a: 128, b: 128}), space)
    cfg = stages[0]["transformer_prune"]
    assert len(stages) == 1 and "layers" not in cfg
    assert int(HEADS * cfg["heads_prune"]) == 2 and int(FFN * cfg["ffn_prune"]) == 128  # removes exactly 2 / 128


def test_cost_is_measured_once_per_plan_and_ordered_by_size():
    model, task = tiny_encoder(), tiny_task()
    space = ts.build_transformer_space(model)
    full = ts.TransformerPolicy()
    small = ts.uniform_policy(space, 0.5, 0.5, quant=None)
    assert small.heads == {x.name: 2 for x in space.layers} and small.ffn == {x.name: 128 for x in space.layers}
    # fewer units -> fewer MACs, strictly, per kind
    assert ts.macs_per_token(small, space) < ts.macs_per_token(ts.uniform_policy(space, 0.5, 1.0, None), space) \
        < ts.macs_per_token(full, space)
    ev = te.PlanEvaluator(model, task, space, {"task": {"name": "x"}, "model": {"name": "x"}, "seed": 0},
                          [b for b, _ in task.val], budget=0.9, repeats=7)
    ev.build = lambda p: model if p.key() == full.key() else _pruned(model, p, space, task)
    same = ev(full)
    # the untouched float model timed against itself, interleaved: a ratio near 1 (loose: a loaded machine)
    assert 0.4 < same["latency_ratio"] < 2.5 and same["val_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["macs_ratio"] == 1.0 and same["feasible"] == (same["latency_ratio"] <= 0.9)
    again = ev(full)
    assert again["cached"] and again["latency_ratio"] == same["latency_ratio"] and len(ev.cache) == 1
    rec = ev(small)
    assert rec["macs_ratio"] < 0.6 and math.isfinite(rec["latency_ratio"]) and rec["latency_ratio"] > 0
    assert rec["val_cosine"] < same["val_cosine"]
    best = te.best_feasible(ev.records)
    assert best is None or best["val_cosine"] == max(r["val_cosine"] for r in ev.records if r["feasible"])


def _pruned(model, p, space, task):
    import torchslim
    from torchslim.pruning.transformer import TransformerPruneConfig

    stage = ts.to_stages(p, space)[0]["transformer_prune"]
    stage.pop("layers", None)
    return torchslim.prune(model, TransformerPruneConfig(**stage), task).model.eval()
