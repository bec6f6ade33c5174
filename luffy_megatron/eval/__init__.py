"""``luffy-eval``: the paper's benchmarks (avg@k and pass@k per data source) on an HF or Megatron checkpoint."""

from luffy_megatron.eval.metrics import pass_at_k, render_tables, summarise
from luffy_megatron.eval.runner import EvalOptions, compare, run_eval
from luffy_megatron.eval.store import EvalError

__all__ = ["EvalError", "EvalOptions", "compare", "pass_at_k", "render_tables", "run_eval", "summarise"]
