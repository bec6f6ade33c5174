"""Plot training curves from one or more ``metrics.jsonl`` files into a PNG.

example:
  python tools/plot_metrics.py outputs/demo/luffy/metrics.jsonl outputs/demo/grpo/metrics.jsonl \\
      --labels LUFFY GRPO --keys reward/on_policy val/all/avg@1 --out curves.png
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
    args = parser.parse_args(argv)
    for f in args.files:
        if not Path(f).is_file():
            parser.error(f"no such metrics file: {f}")
    labels = args.labels or [Path(f).parent.name for f in args.files]
    if len(labels) != len(args.files):
        parser.error(f"{len(labels)} labels for {len(args.files)} files")
    print(plot(args.files, labels, args.keys, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
