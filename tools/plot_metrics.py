"""Plot training curves from one or more ``metrics.jsonl`` files into a PNG; or, with ``--timeline``, each run's
per-step generation and update windows (``timeline/*``), which shows how asynchronous rollout overlaps them.

examples:
  python tools/plot_metrics.py outputs/demo/luffy/metrics.jsonl outputs/demo/grpo/metrics.jsonl \\
      --labels LUFFY GRPO --keys reward/on_policy val/all/avg@1 --out curves.png
  python tools/plot_metrics.py outputs/demo/luffy/metrics.jsonl outputs/demo/luffy_async/metrics.jsonl \\
      --timeline --steps 12 --out timeline.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_KEYS = ["reward/on_policy", "val/all/avg@1", "actor/entropy", "response/length_mean"]


def plot(files: list[str], labels: list[str], keys: list[str], out: str, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from luffy_megatron.metrics.logger import read_jsonl

    runs = [read_jsonl(f) for f in files]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, records in zip(labels, runs):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label, marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    return _save(fig, out, title)


TIMELINE = (("generate", "rollout + reward of the step's batch", "tab:blue"), ("update", "policy update", "tab:orange"))


def plot_timeline(files: list[str], labels: list[str], out: str, steps: int = 12, title: str | None = None) -> Path:
    """One panel per run: for each of its first ``steps`` steps, a bar per phase from ``timeline/<phase>_start`` to
    ``timeline/<phase>_end`` (seconds since the first step's generation started). Overlapping bars of neighbouring
    steps are time when generation and update ran at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from luffy_megatron.metrics.logger import read_jsonl

    fig, axes = plt.subplots(len(files), 1, figsize=(10, 0.35 * steps + 1.6), squeeze=False)
    for ax, label, f in zip(axes[:, 0], labels, files):
        records = [r for r in read_jsonl(f) if "timeline/update_start" in r][:steps]
        if not records:
            raise SystemExit(f"{f}: no timeline/* metrics (written by runs of this version)")
        origin = min(r["timeline/generate_start"] for r in records)
        for offset, (phase, name, color) in zip((-0.2, 0.2), TIMELINE):
            for i, r in enumerate(records):
                start, end = r[f"timeline/{phase}_start"] - origin, r[f"timeline/{phase}_end"] - origin
                ax.barh(
                    r["step"] + offset,
                    end - start,
                    left=start,
                    height=0.38,
                    color=color,
                    label=name if i == 0 else None,
                )
        ax.invert_yaxis()
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("step")
        ax.set_title(label)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1][0].set_xlabel("seconds since the first generation started")
    return _save(fig, out, title)


def _save(fig, out: str | Path, title: str | None) -> Path:
    """Title, lay out and write ``fig`` as a PNG (parent folders created); close it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Plot metrics.jsonl training curves to a PNG.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", help="metrics.jsonl files (one curve each)")
    parser.add_argument("--labels", nargs="*", help="legend labels (default: parent folder names)")
    parser.add_argument("--keys", nargs="*", default=DEFAULT_KEYS, help="metric names, one panel each")
    parser.add_argument("--out", default="curves.png", help="output PNG")
    parser.add_argument("--title", default=None)
    parser.add_argument("--timeline", action="store_true", help="plot per-step generation/update windows instead")
    parser.add_argument("--steps", type=int, default=12, help="with --timeline: the first N steps (12)")
    args = parser.parse_args(argv)
    for f in args.files:
        if not Path(f).is_file():
            parser.error(f"no such metrics file: {f}")
    labels = args.labels or [Path(f).parent.name for f in args.files]
    if len(labels) != len(args.files):
        parser.error(f"{len(labels)} labels for {len(args.files)} files")
    if args.timeline:
        print(plot_timeline(args.files, labels, args.out, args.steps, args.title))
    else:
        print(plot(args.files, labels, args.keys, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
