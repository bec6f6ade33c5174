"""The synthetic task's out-of-distribution split: one more column than training, the same reward, and no change to
the training and validation files."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from luffy_megatron.data.synthetic import OOD_DATA_SOURCE, generate, generate_ood, write_ood, write_task
from luffy_megatron.reward.math_reward import score_one


def _operands(row: dict) -> tuple[str, str]:
    a, b = row["prompt"][-1]["content"].rstrip("=").split("+")
    return a, b


def test_ood_problems_have_one_more_digit_and_every_trace_scores_one() -> None:
    rows = generate_ood(300, seed=1, system_prompt=None)
    assert len({r["prompt"][-1]["content"] for r in rows}) == 300  # distinct problems
    train, val = generate(500, 50, seed=1, system_prompt=None)
    assert all(len(x) == 2 for r in train + val for x in _operands(r))
    for r in rows:
        a, b = _operands(r)
        assert len(a) == len(b) == 3 and a[0] != "0" and b[0] != "0", (a, b)  # never a zero-padded 2-digit problem
        assert r["reward_model"]["ground_truth"] == str(int(a) + int(b))
        assert r["target"][0]["content"].count(";") == 2  # three column steps
        assert r["data_source"] == OOD_DATA_SOURCE and r["extra_info"]["split"] == "ood"
        assert score_one(r["target"][0]["content"], r["reward_model"]["ground_truth"], False, None) == 1.0
    assert generate_ood(300, seed=1, system_prompt=None) == rows and generate_ood(300, seed=2)[0] != rows[0]
    assert generate_ood(5, seed=1, digits=1, system_prompt=None)[0]["prompt"][-1]["content"].count("+") == 1
    with pytest.raises(ValueError, match="num must be"):
        generate_ood(8101, digits=1)  # 90 x 90 two-digit pairs without a leading zero


def test_the_ood_split_leaves_the_train_and_val_files_byte_identical(tmp_path: Path) -> None:
    """The OOD draw has its own random stream: writing it next to a task changes neither file of the task."""
    plain = write_task(tmp_path / "plain", 300, 40, seed=3, system_prompt=None)
    both = write_task(tmp_path / "both", 300, 40, seed=3, system_prompt=None)
    ood = write_ood(tmp_path / "both", 64, seed=3, system_prompt=None)
    for a, b in zip(plain, both):
        assert a.read_bytes() == b.read_bytes()
    table = pq.read_table(ood)
    assert ood.name == "ood.parquet" and table.num_rows == 64
    assert table.schema == pq.read_table(both[0]).schema
