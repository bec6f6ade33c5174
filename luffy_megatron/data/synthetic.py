"""A synthetic addition task in the LUFFY schema, small enough for a tiny model to learn on CPU in minutes.

Problem ``47+85=`` (zero-padded operands of ``digits`` digits), expert trace
``<think>\\n7+5=12;4+8+1=13\\n</think>\\n\\boxed{132}`` (column sums from the right, ``+1`` for a carry), ground truth
``132``, data source ``synthetic_add``. Train and validation problems are disjoint draws from all operand pairs.

Out-of-distribution split (:func:`generate_ood`): two kinds of problem that training never shows, traced and rewarded
the same way; a lookup of memorised training strings has no entry for either.

- ``wider`` (data source ``synthetic_add_wider``): one more column, both operands of ``digits + 1`` digits without a
  leading zero (``347+185=``), so a third column step and possibly a ``digits + 2``-digit answer. A model that learned
  the traced procedure (add a column with the carry, move one column left) extends it by a column; one that learned a
  fixed two-column layout stops a column short. It is a test of length generalisation too: the trace is longer than
  any in training.
- ``unpadded`` (data source ``synthetic_add_unpadded``): an operand shorter than ``digits`` written without its
  leading zeros (``7+85=``; training always pads, ``07+85=``), traced as usual (``7+5=12;0+8+1=9``). The pair may
  occur in training, padded; the problem text never does. The columns are the training ones, but a model must find
  each digit from the operand's end rather than at a fixed position, and supply the missing zero itself.

The split draws from its own random stream, so adding it changes no training or validation draw, and its text uses
only in-distribution characters (digits are single tokens in the demo's tokenizer), so no token is new.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DATA_SOURCE = "synthetic_add"
#: Out-of-distribution kinds (:func:`generate_ood`) and their data sources.
OOD_KINDS = {"wider": "synthetic_add_wider", "unpadded": "synthetic_add_unpadded"}
DEFAULT_SYSTEM_PROMPT = "Add the numbers. Think inside <think> </think>, then write the sum in \\boxed{}."


def problem_text(a: int, b: int, digits: int, pad: bool = True) -> str:
    """The user turn, e.g. ``07+85=`` (``pad=False``: ``7+85=``)."""
    return f"{a:0{digits}d}+{b:0{digits}d}=" if pad else f"{a}+{b}="


def expert_trace(a: int, b: int, digits: int) -> str:
    """Column-by-column addition from the least significant digit, then the boxed sum."""
    steps, carry = [], 0
    for i in range(digits):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        total = da + db + carry
        steps.append(f"{da}+{db}{'+1' if carry else ''}={total}")
        carry = total // 10
    return "<think>\n" + ";".join(steps) + "\n</think>\n\\boxed{" + str(a + b) + "}"


def make_row(
    a: int,
    b: int,
    digits: int,
    index: int,
    split: str,
    system_prompt: str | None,
    data_source: str = DATA_SOURCE,
    pad: bool = True,
) -> dict[str, Any]:
    """One row in the paper's schema."""
    prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompt.append({"role": "user", "content": problem_text(a, b, digits, pad)})
    return {
        "data_source": data_source,
        "prompt": prompt,
        "target": [{"role": "assistant", "content": expert_trace(a, b, digits)}],
        "ability": "math",
        "reward_model": {"ground_truth": str(a + b), "style": "rule"},
        "extra_info": {"index": index, "split": split},
    }


def generate(
    num_train: int, num_val: int, seed: int = 0, digits: int = 2, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Disjoint train / validation rows drawn without replacement from all ``(10**digits)**2`` operand pairs."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    space = (10**digits) ** 2
    if num_train + num_val > space:
        raise ValueError(f"{num_train} + {num_val} problems exceed the {space} distinct {digits}-digit pairs")
    picks = random.Random(seed).sample(range(space), num_train + num_val)
    n = 10**digits
    pairs = [divmod(p, n) for p in picks]
    train = [make_row(a, b, digits, i, "train", system_prompt) for i, (a, b) in enumerate(pairs[:num_train])]
    val = [make_row(a, b, digits, i, "val", system_prompt) for i, (a, b) in enumerate(pairs[num_train:])]
    return train, val


def _ood_pairs(kind: str, num: int, digits: int, rng: random.Random) -> list[tuple[int, int]]:
    """``num`` distinct operand pairs of one out-of-distribution kind (see the module docstring)."""

    def count(available: int) -> int:
        if not 0 <= num <= available:
            raise ValueError(f"num must be in [0, {available}] (the distinct {kind} pairs), got {num}")
        return num

    if kind == "wider":
        low, width = 10**digits, 9 * 10**digits  # the digits+1-digit operands low .. low + width - 1
        return [(low + p // width, low + p % width) for p in rng.sample(range(width**2), count(width**2))]
    if kind == "unpadded":
        if digits < 2:
            raise ValueError(f"unpadded problems need digits >= 2 (a 1-digit operand has no padding), got {digits}")
        n, short = 10**digits, 10 ** (digits - 1)
        candidates = [p for p in range(n * n) if min(divmod(p, n)) < short]
        return [divmod(p, n) for p in rng.sample(candidates, count(len(candidates)))]
    raise ValueError(f"unknown out-of-distribution kind {kind!r}; choose from {sorted(OOD_KINDS)}")


def generate_ood(
    num: int,
    seed: int = 0,
    digits: int = 2,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    kinds: tuple[str, ...] = tuple(OOD_KINDS),
) -> list[dict[str, Any]]:
    """``num`` distinct out-of-distribution rows of each kind in ``kinds`` (``wider``, then ``unpadded``) for a task
    of ``digits``-digit operands: split ``ood``, data source ``OOD_KINDS[kind]``. The draw has its own random stream
    (seeded by ``seed``), independent of :func:`generate`'s."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    rng, rows = random.Random(f"ood:{seed}"), []
    for kind in kinds:
        width, pad = (digits + 1, True) if kind == "wider" else (digits, False)
        for a, b in _ood_pairs(kind, num, digits, rng):
            rows.append(make_row(a, b, width, len(rows), "ood", system_prompt, OOD_KINDS[kind], pad))
    return rows


def tokenizer_corpus(num: int = 500, seed: int = 0, digits: int = 2) -> str:
    """Chat-formatted problems and traces: the text the demo's small ASCII tokenizer is trained on."""
    rows, _ = generate(num, 0, seed, digits, system_prompt=None)
    return "\n".join(
        f"<|im_start|>user\n{r['prompt'][-1]['content']}<|im_end|>\n<|im_start|>assistant\n{r['target'][0]['content']}"
        for r in rows
    )


def write_parquet(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write rows with an explicit schema (identical for every split, and for empty files)."""

    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(message)),
            ("target", pa.list_(message)),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
            ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
        ]
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_task(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    digits: int = 2,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> tuple[Path, Path]:
    """Write ``train.parquet`` and ``val.parquet`` to ``out_dir``; returns their paths."""
    train, val = generate(num_train, num_val, seed, digits, system_prompt)
    out = Path(out_dir)
    paths = out / "train.parquet", out / "val.parquet"
    write_parquet(train, paths[0])
    write_parquet(val, paths[1])
    return paths


def write_ood(
    out_dir: str | Path, num: int, seed: int = 0, digits: int = 2, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> Path:
    """Write :func:`generate_ood`'s rows (``num`` of each kind) to ``out_dir/ood.parquet``; returns its path."""
    path = Path(out_dir) / "ood.parquet"
    write_parquet(generate_ood(num, seed, digits, system_prompt), path)
    return path
