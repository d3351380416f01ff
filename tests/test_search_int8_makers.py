"""Issue 13 item 3: the rules and the RL agent search the bit width (int8 or float per layer)
next to the keep ratios, over the same space and cost model as Optuna.

The latency tables here are built by hand (a layer's fp32 time = its MACs, exactly bilinear in
its widths on a 2-point grid; int8 = INT8_SPEED of it), so every number below is exact on any
CPU: no timing. The RL tests score a policy with a closed-form function of its widths instead of
pruning and fine-tuning (``Scored``), so the agent's rewards are exact as well; only DDPG's own
float32 network differs between AVX2 and AVX-512 kernels (last bits), which the widths' rounding
absorbs and the raw keeps' 1e-4 tolerance covers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from torchslim.app.recipe import RecipeError, load_recipe
from torchslim.app.search import SearchSpec, read_search_recipe, write_outputs
from torchslim.core.errors import ConfigError
from torchslim.search import (
    Budget,
    Policy,
    agent,
    build_cost_model,
    build_space,
    sensitivity_rule,
    uniform,
    user_rules,
)
from torchslim.search.int8_cost import Int8Table
from torchslim.search.trials import Evaluator
from torchslim.zoo import build_model, build_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TASK = {"name": "mnist1d", "kwargs": {"num_samples": 1200}}
INT8_SPEED = (0.3, 0.5, 0.7)  # int8 time / fp32 time of layer i: INT8_SPEED[i % 3]


@pytest.fixture(scope="module")
def task():
    return build_task(TASK["name"], **TASK["kwargs"])


@pytest.fixture(scope="module")
def model(task):
    torch.manual_seed(0)  # untrained: widths, MACs and bits are what these tests check
    return build_model("rescnn1d", task, width=16).eval()


def hand_cost(model, space, task):
    """The cost model with hand-built eager and int8 tables (module doc): the float latency
    ratio is the MACs ratio, and int8 makes each layer INT8_SPEED times as slow."""
    cm = build_cost_model(model, space, task, latency=False)
    tables, t8 = {}, {}
    for i, layer in enumerate(space.layers):
        (c_in, c_out), m, f = cm.base_widths[layer], float(cm.base_macs[layer]), INT8_SPEED[i % 3]
        grid = {"in": [0, c_in], "out": [0, c_out]}
        tables[layer] = {**grid, "ms": [[0.0, 0.0], [0.0, m]]}
        t8[layer] = {**grid, "fp32": [[0.0, 0.0], [0.0, m]], "per_channel": [[0.0, 0.0], [0.0, f * m]],
                     "per_tensor": [[0.0, 0.0], [0.0, 0.9 * f * m]]}
    cm.tables = tables
    cm.int8 = Int8Table(t8, eager_ms=sum(float(cm.base_macs[n]) for n in space.layers))
    return cm


def score(p: Policy, space) -> float:
    """A closed-form stand-in for the val metric: later groups' channels count more, int8 costs a little."""
    roots = space.roots
    s = sum((i + 1) * math.sqrt(p.keep[r]) for i, r in enumerate(roots)) / sum(range(1, len(roots) + 1))
    if p.keep_float is not None:
        s -= 0.02 * (len(space.layers) - len(p.keep_float)) / len(space.layers)
    return s


class Scored(Evaluator):
    """The real evaluator's fit and canonical policy, scored by ``score`` (no pruning, no training)."""

    def __call__(self, raw, maker="", fitted=False, feasible=None):
        p, ok = (raw, True) if fitted else self.fit(raw)
        p = self.space.canonical(p)
        rec = {"raw": {k: round(v, 6) for k, v in raw.keep.items()}, "index": len(self.trials), "maker": maker,
               "policy": p.to_dict(), "feasible": ok, "val": score(p, self.space), **self.cost_model.cost(p)}
        self.trials.append(rec)
        return rec


def _spaces(model, task):
    s8, s32 = build_space(model, task, step=None, int8=True), build_space(model, task, step=None)
    cm8, cm32 = hand_cost(model, s8, task), hand_cost(model, s32, task)
    return (s8, lambda p: cm8.cost(p)["latency_ratio"]), (s32, lambda p: cm32.cost(p)["latency_ratio"])


def test_rules_quantize_every_layer_and_keep_more_channels_at_the_same_latency(model, task):
    (s8, c8), (s32, c32) = _spaces(model, task)
    assert c8(s8.uniform(1.0)) == pytest.approx(0.50237, abs=1e-5)  # all int8 at full width: about half
    sens = {r: 0.1 * i for i, r in enumerate(s8.roots)}
    makers = {"uniform": lambda s, c: uniform(s, c, 0.3), "sensitivity": lambda s, c: sensitivity_rule(sens, s, c, 0.3)}
    more = {}
    for name, make in makers.items():
        (p8, ok8), (p32, ok32) = make(s8, c8), make(s32, c32)
        assert ok8 and ok32, name
        assert p8.keep_float == () and p8.granularity == "per_channel", name  # every layer int8, per channel
        assert p32.keep_float is None and p32.granularity is None, name       # no int8 stage without space.int8
        assert c8(p8) <= 0.3 + 1e-12 and c32(p32) <= 0.3 + 1e-12, name
        assert c8(Policy(p8.keep)) > 0.3, name  # the fit priced int8: the same widths in float break the budget
        w8 = {g.root: s8.width(g, p8.keep[g.root]) for g in s8.groups}
        w32 = {g.root: s32.width(g, p32.keep[g.root]) for g in s32.groups}
        assert all(w8[r] >= w32[r] for r in w8), name
        more[name] = (sum(w8.values()), sum(w32.values()))
    assert more == {"uniform": (72, 48), "sensitivity": (83, 54)}  # channels kept of 96, int8 vs float


def test_user_rule_bits_32_keeps_its_layers_float(model, task):
    (s8, c8), _ = _spaces(model, task)
    rules = [{"match": "stem.*", "bits": 32}, {"match": "fc", "bits": 32},
             {"match": "layers.3.*", "weight": 3}, {"match": "layers.0.*", "keep": 1.0, "bits": 8}]
    p, ok = user_rules(rules, s8, c8, 0.3)
    assert ok and p.keep_float == ("stem.0", "fc") and p.granularity == "per_channel"
    assert c8(p) <= 0.3 + 1e-12
    assert c8(p) > c8(Policy(p.keep, {}, (), "per_channel"))  # the two float layers are priced float
    assert p.keep["stem.0"] == 1.0 and p.keep["layers.0.conv1"] == 1.0  # keep rules still fix their groups
    assert p.keep["layers.3.conv1"] == s8.keep_min  # weight 3: pruned hardest
    p_all8, _ = user_rules([{"match": "layers.3.*", "weight": 3}], s8, c8, 0.3)
    assert p_all8.keep_float == ()  # no bits rule: all int8
    fixed, ok = user_rules([{"match": "*", "keep": 0.5}], s8, c8, 0.3)  # every group fixed: nothing to fit
    assert ok and set(fixed.keep.values()) == {0.5} and c8(fixed) == pytest.approx(0.1272, abs=1e-4)


@pytest.mark.parametrize(("rule", "int8", "message"), [
    ({"match": "fc", "bits": 16}, True, r"rules\[0\]\.bits: must be 8 \(int8\) or 32 \(kept float\), got 16"),
    ({"match": "fc", "bits": True}, True, r"rules\[0\]\.bits: must be 8"),
    ({"match": "fc", "bits": 32}, False, r"rules\[0\]\.bits: bit widths are searched only with search.int8: true"),
    ({"match": "fc"}, True, r"rules\[0\]: give weight: W, keep: K or bits: 8 \| 32"),
    ({"match": "fc", "bit": 32}, True, r"rules\[0\]: unknown key 'bit'"),
    ({"match": "fc", "keep": "0.5"}, True, r"rules\[0\]\.keep: must be in \(0, 1\]"),
])
def test_bad_user_rules_fail_in_one_line(model, task, rule, int8, message):
    space = build_space(model, task, step=None, int8=int8)
    with pytest.raises(ConfigError, match=message):
        user_rules([rule], space, lambda p: 0.0, 0.5)
    with pytest.raises(ConfigError, match="SearchSpec." + message):  # before any work, from Python
        SearchSpec(rules=[rule], int8=int8)


def test_bits_rule_without_int8_fails_in_the_recipe(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"task": TASK, "model": {"name": "rescnn1d"}, "seed": 0,
                                    "search": {"method": "rules", "rules": [{"match": "fc", "bits": 32}]}}))
    with pytest.raises(RecipeError, match=r"^search\.rules\[0\]\.bits: bit widths are searched only with search.int8"):
        read_search_recipe(path)


def test_rl_agent_searches_bits_and_always_holds_the_budget(model, task):
    s8 = build_space(model, task, step=None, int8=True)
    cm = hand_cost(model, s8, task)
    env = agent.PruneEnv(Scored(model, task, s8, cm, Budget("latency", 0.3), {}, None, log=lambda s: None))
    assert env.observation_space.shape == (10,) and env.action_space.shape == (2,)
    gains = [f[5] for f in env.feats]  # int8 latency gain per group, 0.5 = none, 1 = the largest
    assert max(gains) == pytest.approx(1.0) and all(0.5 < g <= 1.0 for g in gains)
    for budget in (0.3, 0.05):  # 0.05: below every group at keep_min in float (0.066), above int8 (0.033)
        ev = Scored(model, task, s8, cm, Budget("latency", budget), {}, None, log=lambda s: None)
        recs = agent.run(ev, 6, seed=0, warmup=3)
        assert len(recs) == 6
        for r in recs:
            assert r["feasible"] and r["latency_ratio"] <= budget + 1e-12, (budget, r)
            assert r["policy"]["granularity"] == "per_channel" and "fc" not in r["policy"]["keep_float"]
        mixed = [r for r in recs if 0 < len(r["policy"]["keep_float"]) < len(s8.layers)]
        assert mixed, budget  # int8 and float layers in one policy
        assert len({tuple(r["policy"]["keep_float"]) for r in recs}) >= 2, budget  # bits differ between episodes


def test_rl_clipping_forces_int8_where_float_cannot_fit(model, task):
    s8 = build_space(model, task, step=None, int8=True)
    ev = Scored(model, task, s8, hand_cost(model, s8, task), Budget("latency", 0.05), {}, None, log=lambda s: None)
    env = agent.PruneEnv(ev)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (10,) and obs[-1] == 0.0
    done = False
    while not done:  # always ask for the whole group, in float
        obs, _, done, _, info = env.step(np.array([1.0, 0.0], dtype=np.float32))
    rec = info["record"]
    assert rec["feasible"] and rec["latency_ratio"] <= 0.05 + 1e-12
    forced = [r for r, is8 in env.bits.items() if is8]
    assert forced and len(forced) < len(s8.groups)  # some groups kept float, the rest made int8 to fit
    assert set(rec["policy"]["keep_float"]) == {m for g in s8.groups if not env.bits[g.root] for m in g.members}


def test_rl_int8_best_recipe_excludes_the_float_layers(model, task, tmp_path):
    from torchslim.export.weights import save_weights

    s8 = build_space(model, task, step=4, int8=True, int8_backend="simulate")
    weights = tmp_path / "base.safetensors"
    save_weights(model, weights)
    base = {"task": TASK, "model": {"name": "rescnn1d", "kwargs": {"width": 16}, "weights": str(weights)}, "seed": 0}
    ev = Evaluator(model, task, s8, build_cost_model(model, s8, task, latency=False), Budget("macs", 0.5), base, None,
                   log=lambda s: None)
    recs = agent.run(ev, 3, seed=1, warmup=2)  # really pruned, fake-quantized and evaluated
    assert all(r["feasible"] and r["macs_ratio"] <= 0.5 + 1e-9 for r in recs)
    assert any(r["policy"]["keep_float"] for r in recs) and all(r["policy"]["keep_float"] != s8.layers for r in recs)
    spec = SearchSpec(method="rl", budget={"macs": "0.5x"}, int8=True, int8_backend="simulate", step=4)
    summary = write_outputs(ev, spec, recs, tmp_path, 0.0, log=lambda s: None)
    written = yaml.safe_load((tmp_path / "best_recipe.yaml").read_text())
    q = written["stages"][-1]["quantize"]
    assert q == {"bits": 8, "mode": "static", "backend": "simulate",
                 "layers": {"exclude": summary["best"]["policy"]["keep_float"]}, "granularity": "per_channel"}
    stage = load_recipe(written).stages[-1]
    assert stage.config.layers.exclude == tuple(summary["best"]["policy"]["keep_float"])


# Records of the keep-only agent made by the code before bit widths were added (same set-up,
# Budget("macs", 0.4), 5 episodes, warmup 2, seed 0): raw keeps per group, fitted keeps, score.
PRE_CHANGE = [
    ([0.926177, 0.497358, 0.390838, 0.514496, 0.874996, 0.374997], [1.0, 0.5, 0.5, 0.5, 0.75, 0.25], 0.6997184785524343),
    ([0.811862, 0.780095, 0.646107, 0.624992, 0.374994, 0.374998], [0.75, 0.75, 0.75, 0.5, 0.25, 0.25], 0.6440275974977534),
    ([0.765608, 0.693011, 0.729831, 0.624993, 0.374997, 0.374995], [0.75, 0.75, 0.75, 0.5, 0.25, 0.25], 0.6440275974977534),
    ([0.884478, 0.818066, 0.624995, 0.374999, 0.374999, 0.374997], [1.0, 0.75, 0.5, 0.25, 0.25, 0.25], 0.5882557691013581),
    ([0.718967, 0.982667, 0.625, 0.374997, 0.625, 0.374992], [0.75, 1.0, 0.5, 0.25, 0.5, 0.25], 0.643946650156039),
]


def test_rl_agent_without_int8_is_unchanged(model, task):
    space = build_space(model, task, step=4)
    ev = Scored(model, task, space, build_cost_model(model, space, task, latency=False), Budget("macs", 0.4), {}, None,
                log=lambda s: None)
    env = agent.PruneEnv(ev)
    assert env.observation_space.shape == (8,) and env.action_space.shape == (1,)
    recs = agent.run(ev, 5, seed=0, warmup=2)
    assert len(recs) == len(PRE_CHANGE)
    for r, (raw, keep, val) in zip(recs, PRE_CHANGE):
        assert [r["raw"][k] for k in space.roots] == pytest.approx(raw, abs=1e-4)
        assert [r["policy"]["keep"][k] for k in space.roots] == keep
        assert r["val"] == pytest.approx(val, abs=1e-12) and r["policy"]["keep_float"] is None
        assert "granularity" not in r["policy"]
