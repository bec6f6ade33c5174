"""Rule-based rewards: the LUFFY math verifier (think-format check + math-verify) and a fault-tolerant process pool."""

from luffy_megatron.reward.math_reward import RewardResult, score_detailed, score_one, split_think
from luffy_megatron.reward.memo import RewardMemo
from luffy_megatron.reward.pool import RewardPool, RewardStats

__all__ = ["RewardMemo", "RewardPool", "RewardResult", "RewardStats", "score_detailed", "score_one", "split_think"]
