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

The learning algorithm is stable-baselines3's DDPG (AMC's choice), not written here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from .space import Policy
from .trials import Evaluator


class PruneEnv(gym.Env):
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, ev: Evaluator, reward_scale: float = 10.0):
        super().__init__()
        self.ev, self.space, self.scale = ev, ev.space, reward_scale
        self.groups = self.space.groups
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(8,), dtype=np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
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
        self.baseline: float | None = None
        self.records: list[dict[str, Any]] = []

    def _partial(self, rest: float) -> Policy:
        return Policy({g.root: self.keep.get(g.root, rest) for g in self.groups})

    def _obs(self) -> np.ndarray:
        t = min(self.t, len(self.groups) - 1)
        used = 1.0 - self.ev.cost(self._partial(1.0))
        need = max(self.ev.cost(self._partial(1.0)) - self.ev.budget.ratio, 0.0)
        return np.clip(np.asarray(self.feats[t] + [used, need, self.prev], dtype=np.float32), 0.0, 1.0)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t, self.keep, self.prev = 0, {}, 1.0
        return self._obs(), {}

    def _clip(self, keep: float) -> float:
        """The widest keep <= keep with which the budget is reachable (later groups at keep_min)."""
        g, lo_keep = self.groups[self.t], self.space.keep_min

        def cost(k: float) -> float:
            return self.ev.cost(Policy({**self._partial(lo_keep).keep, g.root: k}))

        if cost(keep) <= self.ev.budget.ratio:
            return keep
        lo, hi = lo_keep, keep
        for _ in range(16):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(mid) <= self.ev.budget.ratio else (lo, mid)
        return lo

    def step(self, action):
        a = float(np.clip(np.asarray(action).reshape(-1)[0], 0.0, 1.0))
        keep = self._clip(self.space.keep_min + a * (1.0 - self.space.keep_min))
        self.keep[self.groups[self.t].root] = keep
        self.prev = (keep - self.space.keep_min) / max(1.0 - self.space.keep_min, 1e-9)
        self.t += 1
        if self.t < len(self.groups):
            return self._obs(), 0.0, False, False, {}
        rec = self.ev(Policy(dict(self.keep)), maker="rl")
        self.records.append(rec)
        base = rec["val"] if self.baseline is None else self.baseline
        reward = self.scale * (rec["val"] - base)
        self.baseline = rec["val"] if self.baseline is None else 0.9 * self.baseline + 0.1 * rec["val"]
        return self._obs(), float(reward), True, False, {"record": rec}


def run(ev: Evaluator, n_trials: int, seed: int = 0, warmup: int | None = None, noise: float = 0.3) -> list[dict[str, Any]]:
    """``n_trials`` episodes of DDPG (the first ``warmup`` explore with noise before learning,
    AMC's warm-up); each episode evaluates one policy. Returns the evaluated trial records."""
    import torch
    from stable_baselines3 import DDPG
    from stable_baselines3.common.noise import NormalActionNoise

    env = PruneEnv(ev)
    n = len(env.groups)
    warmup = max(1, n_trials // 3) if warmup is None else warmup
    threads = torch.get_num_threads()
    model = DDPG("MlpPolicy", env, learning_rate=1e-3, buffer_size=10_000, learning_starts=warmup * n,
                 batch_size=min(64, max(8, warmup * n)), tau=0.01, gamma=1.0, train_freq=(1, "episode"),
                 gradient_steps=n * 4, action_noise=NormalActionNoise(np.zeros(1), np.full(1, noise)),
                 policy_kwargs={"net_arch": [64, 64]}, seed=seed, device="cpu", verbose=0)
    model.learn(total_timesteps=n_trials * n)
    torch.set_num_threads(threads)
    return env.records
