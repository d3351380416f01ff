"""Policy search under a budget: which channels, sparsities and float layers to keep, per layer.

``space`` (per-layer choices, graph-tied groups), ``cost`` (exact MACs, measured latency table),
``rules`` (budgets, uniform / sensitivity / user rules), ``optuna_search`` (TPE, random,
NSGA-II on SQLite or a shared storage), ``agent`` (AMC-style DDPG agent on a gymnasium
environment), ``policy`` (a policy becomes recipe stages), ``trials`` (the one evaluator
interface, its resumable trials log), ``verify`` (the answer's latency measured end to end until
one holds the budget), ``transformer_space`` (heads / FFN units per encoder layer and int8 or
float per Linear group of a Hugging Face BERT-style encoder, whole layers dropped),
``transformer_eval`` (its plans built, scored and timed end to end on ONNX Runtime; Optuna TPE
under the budget: ``torchslim search`` with ``space: transformer`` and B9's MiniLM part). Techniques never import this package: it writes recipes and applies their stages.
"""

from .cost import CostModel, build_cost_model, materialize
from .policy import evaluate, to_recipe, to_stages
from .rules import Budget, fit_budget, group_sensitivity, sensitivity_rule, uniform, user_rules
from .space import Group, Policy, SearchSpace, build_space
from .transformer_eval import PlanEvaluator, run_tpe
from .transformer_space import TransformerPolicy, TransformerSpace, build_transformer_space
from .trials import Evaluator, best, pareto
from .verify import enforce, hold, measure_ratio

__all__ = [
    "Budget",
    "CostModel",
    "Evaluator",
    "Group",
    "PlanEvaluator",
    "Policy",
    "SearchSpace",
    "TransformerPolicy",
    "TransformerSpace",
    "best",
    "build_cost_model",
    "build_space",
    "build_transformer_space",
    "enforce",
    "evaluate",
    "fit_budget",
    "group_sensitivity",
    "hold",
    "materialize",
    "measure_ratio",
    "pareto",
    "run_tpe",
    "sensitivity_rule",
    "to_recipe",
    "to_stages",
    "uniform",
    "user_rules",
]
