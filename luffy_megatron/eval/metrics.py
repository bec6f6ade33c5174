"""avg@k and unbiased pass@k per data source, and the paper-style markdown tables.

A *problem* is a distinct (data source, rendered prompt, ground truth). Its samples are every sample of every row that
carries it: the paper's file repeats AIME/AMC rows 32 times (avg@32 from one sample per row), ``--n`` adds samples per
row. avg@k of a source is the mean over its problems of the problem's mean score (the paper's per-row mean when every
problem has the same number of rows). pass@k is the unbiased estimator of Chen et al. (2021),
``1 - C(n - c, k) / C(n, k)`` for a problem with ``n`` samples of which ``c`` are correct, averaged over problems.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from math import comb

# The paper's column names and order (Table 1: math; Table 3: out-of-distribution).
MATH_SOURCES = {
    "aime": "AIME 2024",
    "aime25": "AIME 2025",
    "amc": "AMC",
    "math": "MATH-500",
    "minerva": "Minerva",
    "olympiad_bench": "Olympiad",
}
OOD_SOURCES = {"arc_c": "ARC-c", "gpqa": "GPQA-diamond", "mmlu_pro": "MMLU-Pro"}


def problem_id(source: str, prompt_ids: Sequence[int], truth: str) -> str:
    """The problem a sample answers: a digest of (data source, rendered prompt ids, ground truth)."""
    text = f"{source}\x00{','.join(map(str, prompt_ids))}\x00{truth}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` correct (``k <= n``)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _ks(k_max: int) -> list[int]:
    """1, 2, 4, ... up to ``k_max``, and ``k_max`` itself."""
    ks, k = [], 1
    while k < k_max:
        ks.append(k)
        k *= 2
    return [*ks, k_max]


def summarise(samples: Iterable[dict]) -> dict[str, dict]:
    """Per data source: problems, samples, k (fewest samples of a problem), avg@k, pass@k for k = 1, 2, 4, ..., k and
    counts of sample statuses. ``samples`` are the per-sample records (``data_source``, ``problem_id``, ``score``,
    ``status``)."""
    per_problem: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    statuses: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        per_problem[s["data_source"]][s["problem_id"]].append(float(s["score"]))
        statuses[s["data_source"]][s["status"]] += 1
    out: dict[str, dict] = {}
    for source in sorted(per_problem):
        problems = per_problem[source]
        k = min(len(v) for v in problems.values())
        avg = sum(sum(v) / len(v) for v in problems.values()) / len(problems)
        passes = {
            str(kk): sum(pass_at_k(len(v), int(sum(x >= 1.0 for x in v)), kk) for v in problems.values())
            / len(problems)
            for kk in _ks(k)
        }
        out[source] = {
            "problems": len(problems),
            "samples": sum(len(v) for v in problems.values()),
            "k": k,
            "avg@k": avg,
            "pass@k": passes,
            "status": dict(sorted(statuses[source].items())),
        }
    return out


def source_average(per_source: dict[str, dict]) -> float:
    """The mean of the sources' avg@k in a :func:`summarise` result (the tables' ``Avg.`` when all sources are in
    one table); 0.0 without sources."""
    return sum(r["avg@k"] for r in per_source.values()) / len(per_source) if per_source else 0.0


def column_groups(sources: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Sources split into the paper's tables: math benchmarks (known ones in the paper's order, then others sorted)
    and out-of-distribution sets."""
    present = set(sources)
    math = [s for s in MATH_SOURCES if s in present] + sorted(present - set(MATH_SOURCES) - set(OOD_SOURCES))
    ood = [s for s in OOD_SOURCES if s in present]
    return [(name, cols) for name, cols in (("math", math), ("out-of-distribution", ood)) if cols]


def _title(source: str) -> str:
    return MATH_SOURCES.get(source) or OOD_SOURCES.get(source) or source


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_tables(runs: list[tuple[str, dict[str, dict]]]) -> str:
    """Markdown tables laid out like the paper's (one column per benchmark, then the average; scores in %), one row
    per run: avg@k, then pass@k at each source's k. ``runs`` are (name, :func:`summarise` output)."""
    sources = sorted({s for _, res in runs for s in res})
    parts = []
    for group, cols in column_groups(sources):
        for metric in ("avg@k", "pass@k"):
            head = [f"{_title(s)} ({_k_label(runs, s, metric)})" for s in cols]
            lines = [
                f"**{group}, {metric}**",
                "",
                "| Model | " + " | ".join(head) + " | Avg. |",
                "|---" * (len(cols) + 2) + "|",
            ]
            for name, res in runs:
                vals = [_metric(res.get(s), metric) for s in cols]
                avg = sum(vals) / len(vals) if all(v is not None for v in vals) else None
                lines.append(f"| {name} | " + " | ".join(_pct(v) for v in vals) + f" | {_pct(avg)} |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _metric(entry: dict | None, metric: str) -> float | None:
    if entry is None:
        return None
    return entry["avg@k"] if metric == "avg@k" else entry["pass@k"][str(entry["k"])]


def _k_label(runs: list[tuple[str, dict[str, dict]]], source: str, metric: str) -> str:
    ks = sorted({res[source]["k"] for _, res in runs if source in res})
    return metric.replace("k", "/".join(str(k) for k in ks))
