"""The synthetic task's out-of-distribution split: kinds of problem training never shows (one more column, operands
without their padding), the same reward, and no change to the training and validation files."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from luffy_megatron.data.synthetic import OOD_KINDS, generate, generate_ood, write_ood, write_task
from luffy_megatron.reward.math_reward import score_one


def _operands(row: dict) -> tuple[str, str]:
    a, b = row["prompt"][-1]["content"].rstrip("=").split("+")
    return a, b


def test_ood_problems_are_of_kinds_training_never_shows_and_every_trace_scores_one() -> None:
    rows = generate_ood(300, seed=1, system_prompt=None)
    assert len(rows) == 600 and len({r["prompt"][-1]["content"] for r in rows}) == 600  # distinct problems
    assert [r["extra_info"]["index"] for r in rows] == list(range(600))
    train, val = generate(500, 50, seed=1, system_prompt=None)
    assert all(len(x) == 2 for r in train + val for x in _operands(r))  # training pads every operand
    by_kind = {kind: [r for r in rows if r["data_source"] == source] for kind, source in OOD_KINDS.items()}
    assert {len(v) for v in by_kind.values()} == {300}
    for r in by_kind["wider"]:
        a, b = _operands(r)
        assert len(a) == len(b) == 3 and a[0] != "0" and b[0] != "0", (a, b)  # never a padded 2-digit problem
        assert r["target"][0]["content"].count(";") == 2  # three column steps
    for r in by_kind["unpadded"]:
        a, b = _operands(r)
        assert min(len(a), len(b)) == 1 and max(len(a), len(b)) <= 2 and str(int(a)) == a and str(int(b)) == b
        assert r["target"][0]["content"].count(";") == 1  # the usual two column steps
    for r in rows:
        a, b = _operands(r)
        assert r["reward_model"]["ground_truth"] == str(int(a) + int(b)) and r["extra_info"]["split"] == "ood"
        assert score_one(r["target"][0]["content"], r["reward_model"]["ground_truth"], False, None) == 1.0
    assert generate_ood(300, seed=1, system_prompt=None) == rows and generate_ood(300, seed=2)[0] != rows[0]
    assert generate_ood(300, seed=1, system_prompt=None, kinds=("wider",)) == by_kind["wider"]


def test_ood_bad_arguments_name_the_kind() -> None:
    with pytest.raises(ValueError, match=r"num must be in \[0, 8100\] \(the distinct wider pairs\)"):
        generate_ood(8101, digits=1, kinds=("wider",))  # 90 x 90 two-digit pairs without a leading zero
    with pytest.raises(ValueError, match=r"num must be in \[0, 1900\] \(the distinct unpadded pairs\)"):
        generate_ood(1901, kinds=("unpadded",))  # pairs of 2-digit operands with one under 10
    with pytest.raises(ValueError, match="unpadded problems need digits >= 2"):
        generate_ood(5, digits=1)
    with pytest.raises(ValueError, match="unknown out-of-distribution kind 'longer'"):
        generate_ood(5, kinds=("longer",))


def test_the_ood_split_leaves_the_train_and_val_files_byte_identical(tmp_path: Path) -> None:
    """The OOD draw has its own random stream: writing it next to a task changes neither file of the task."""
    plain = write_task(tmp_path / "plain", 300, 40, seed=3, system_prompt=None)
    both = write_task(tmp_path / "both", 300, 40, seed=3, system_prompt=None)
    ood = write_ood(tmp_path / "both", 64, seed=3, system_prompt=None)
    for a, b in zip(plain, both):
        assert a.read_bytes() == b.read_bytes()
    table = pq.read_table(ood)
    assert ood.name == "ood.parquet" and table.num_rows == 2 * 64
    assert table.schema == pq.read_table(both[0]).schema
