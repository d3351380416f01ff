"""An AMC-style reinforcement-learning policy maker: gymnasium environment + stable-baselines3.

An episode walks the coupled channel groups in forward order (AMC, He et al. 2018). The state
of step t is the group's features (position, width, how many layers move with it, its share of
the measured latency and of the MACs) and the budget so far (cost share already cut, cut still
needed, previous action); the action, in [0, 1], is the group's keep ratio in [keep_min, 1].
The budget is enforced by clipping, as in AMC: an action is lowered to the widest keep with
which the budget is still reachable if every later group went to keep_min. At the end of the
episode the policy is evaluated (``Evaluator``: fitted to the budget, pruned, briefly
fine-tuned) and the reward is its val metric minus a running mean of earlier rewards (AMC's
baseline, which keeps the critic's targets centred); earlier steps get reward 0.

Bit widths (``SearchSpace.int8``), as HAQ (Wang et al. 2019) picks them from measured latency:
the action is then 2-dim, [keep, bits]; bits >= 0.5 makes the group's member layers int8, else
they stay float; layers in no group (the classifier) are always int8; the int8 stage uses
per-channel weight scales (``GRANULARITY``; Optuna also searches per-tensor). The state gains the
group's int8 latency gain (from the cost model's ONNX Runtime int8 table, before its curve:
0.5 = none, 1 = the largest gain of any group, below 0.5 = int8 slower there; 0.5 for all
without an int8 table) and the previous bits action, so it has 10 entries instead of 8 (fixed
per run). The clipping then assumes every later group at keep_min AND int8 (their cheapest
choice), and a group whose float layers would break the budget even at keep_min is made int8:
that choice was reachable at the step before, so the budget still always holds. Without
``space.int8`` the environment is exactly the keep-only one (same seed, same policies).

The learning algorithm is stable-baselines3's DDPG (AMC's choice), not written here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from .int8_cost import table_ratio
from .space import Policy
from .trials import Evaluator

GRANULARITY = "per_channel"  # the agent's int8 weight scales


class PruneEnv(gym.Env):
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, ev: Evaluator, reward_scale: float = 10.0):
        super().__init__()
        self.ev, self.space, self.scale = ev, ev.space, reward_scale
        self.groups = self.space.groups
        self.int8 = bool(self.space.int8)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(10 if self.int8 else 8,), dtype=np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(2 if self.int8 else 1,), dtype=np.float32)
        widest = max(g.channels for g in self.groups)
        most = max(len(g.members) for g in self.groups)
        full = Policy({r: 1.0 for r in self.space.roots})
        base = ev.cost(full)
        self.feats = []
        for i, g in enumerate(self.groups):
            cut = ev.cost(Policy({**full.keep, g.root: self.space.keep_min})) / base
            macs_cut = ev.cost_model.macs(Policy({**full.keep, g.root: self.space.keep_min})) / ev.cost_model.macs(full)
            self.feats.append([i / max(len(self.groups) - 1, 1), g.channels / widest, len(g.members) / most,
                               1.0 - cut, 1.0 - macs_cut])
        if self.int8:
            gains = [self._int8_gain(g) for g in self.groups]
            top = max([abs(x) for x in gains] + [1e-12])
            for f, x in zip(self.feats, gains):
                f.append(0.5 + 0.5 * x / top)
        self.baseline: float | None = None
        self.records: list[dict[str, Any]] = []

    def _int8_gain(self, g) -> float:
        """Latency share (int8 table, before its curve) saved by making g's members int8 in the
        unpruned float model; 0 without an int8 table (``int8_backend: simulate``, no latency)."""
        cm, layers = self.ev.cost_model, self.space.layers
        if cm.int8 is None:
            return 0.0
        full = {r: 1.0 for r in self.space.roots}
        rest = tuple(n for n in layers if n not in set(g.members))
        return table_ratio(cm, Policy(full, {}, tuple(layers), GRANULARITY)) - table_ratio(cm, Policy(full, {}, rest, GRANULARITY))

    def _policy(self, keep: dict[str, float], bits: dict[str, bool], rest: float, rest_int8: bool) -> Policy:
        """Decided groups as chosen, the others at keep ``rest`` (and int8 if ``rest_int8``)."""
        k = {g.root: keep.get(g.root, rest) for g in self.groups}
        if not self.int8:
            return Policy(k)
        flt = {m for g in self.groups if not bits.get(g.root, rest_int8) for m in g.members}
        return Policy(k, {}, tuple(n for n in self.space.layers if n in flt), GRANULARITY)

    def _partial(self, rest: float) -> Policy:
        return self._policy(self.keep, self.bits, rest, False)

    def _obs(self) -> np.ndarray:
        t = min(self.t, len(self.groups) - 1)
        used = 1.0 - self.ev.cost(self._partial(1.0))
        need = max(self.ev.cost(self._partial(1.0)) - self.ev.budget.ratio, 0.0)
        tail = [self.prev_bits] if self.int8 else []
        return np.clip(np.asarray(self.feats[t] + [used, need, self.prev, *tail], dtype=np.float32), 0.0, 1.0)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t, self.keep, self.prev = 0, {}, 1.0
        self.bits: dict[str, bool] = {}  # group root -> int8 (space.int8 only)
        self.prev_bits = 0.0             # the unpruned model is float
        return self._obs(), {}

    def _clip(self, keep: float, int8: bool = False) -> tuple[float, bool]:
        """The widest keep <= keep with which the budget is reachable (later groups at keep_min,
        and int8 with space.int8), and the group's bits: int8 when even keep_min float breaks it."""
        g, lo_keep = self.groups[self.t], self.space.keep_min

        def cost(k: float, b: bool) -> float:
            return self.ev.cost(self._policy({**self.keep, g.root: k}, {**self.bits, g.root: b}, lo_keep, True))

        if self.int8 and not int8 and cost(lo_keep, False) > self.ev.budget.ratio:
            int8 = True  # forced: keep_min and int8 was reachable at the step before (see module doc)
        if cost(keep, int8) <= self.ev.budget.ratio:
            return keep, int8
        lo, hi = lo_keep, keep
        for _ in range(16):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(mid, int8) <= self.ev.budget.ratio else (lo, mid)
        return lo, int8

    def step(self, action):
        act = np.asarray(action).reshape(-1)
        a = float(np.clip(act[0], 0.0, 1.0))
        keep, int8 = self._clip(self.space.keep_min + a * (1.0 - self.space.keep_min), self.int8 and float(act[1]) >= 0.5)
        root = self.groups[self.t].root
        self.keep[root] = keep
        if self.int8:
            self.bits[root], self.prev_bits = int8, float(int8)
        self.prev = (keep - self.space.keep_min) / max(1.0 - self.space.keep_min, 1e-9)
        self.t += 1
        if self.t < len(self.groups):
            return self._obs(), 0.0, False, False, {}
        final = self._policy(self.keep, self.bits, 1.0, True) if self.int8 else Policy(dict(self.keep))
        rec = self.ev(final, maker="rl")
        self.records.append(rec)
        base = rec["val"] if self.baseline is None else self.baseline
        reward = self.scale * (rec["val"] - base)
        self.baseline = rec["val"] if self.baseline is None else 0.9 * self.baseline + 0.1 * rec["val"]
        return self._obs(), float(reward), True, False, {"record": rec}


def run(ev: Evaluator, n_trials: int, seed: int = 0, warmup: int | None = None, noise: float = 0.3) -> list[dict[str, Any]]:
    """``n_trials`` episodes of DDPG (the first ``warmup`` explore with noise before learning,
    AMC's warm-up); each episode evaluates one policy (keep ratios, and bit widths with
    ``space.int8``). Returns the evaluated trial records."""
    import torch
    from stable_baselines3 import DDPG
    from stable_baselines3.common.noise import NormalActionNoise

    env = PruneEnv(ev)
    n, dims = len(env.groups), env.action_space.shape[0]
    warmup = max(1, n_trials // 3) if warmup is None else warmup
    threads = torch.get_num_threads()
    model = DDPG("MlpPolicy", env, learning_rate=1e-3, buffer_size=10_000, learning_starts=warmup * n,
                 batch_size=min(64, max(8, warmup * n)), tau=0.01, gamma=1.0, train_freq=(1, "episode"),
                 gradient_steps=n * 4, action_noise=NormalActionNoise(np.zeros(dims), np.full(dims, noise)),
                 policy_kwargs={"net_arch": [64, 64]}, seed=seed, device="cpu", verbose=0)
    model.learn(total_timesteps=n_trials * n)
    torch.set_num_threads(threads)
    return env.records
