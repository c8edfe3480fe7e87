"""The pictures of tools/evaluate.py and tools/study.py (matplotlib, imported lazily; the
``test`` extra installs it). Headless: the Agg backend writes PNG files.

- ``plot_quality_vs_cost``: two panels, validation loss against generation tokens/s and
  against peak memory; one point per chunk size (labelled C=..), joined per model (rows with
  the same ``input``, else the same model name and role), so an adaptive CAT draws the curve
  its test-time knob moves along; baseline rows (a dense model) are a star and a dotted line
  at their loss.
- ``plot_loss_curves``: validation (and training) loss against step from runs' metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

MARKERS = "osD^vP<>"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def memory_key(rows: list[dict]) -> tuple[str, str]:
    """Peak memory when it was measured on CUDA, else weights + caches (the CPU peak RSS is a
    process-wide high-water mark, the same for every chunk size)."""
    if rows and all(r.get("peak_mem_kind", "").startswith("cuda") for r in rows if "peak_mem_gib" in r):
        if any("peak_mem_gib" in r for r in rows):
            return "peak_mem_gib", "peak GPU memory during generation (GiB)"
    return "state_mem_gib", "weights + KV caches (GiB)"


def plot_quality_vs_cost(rows: list[dict], path: Path, title: Optional[str] = None) -> Path:
    plt = _pyplot()
    mem_key, mem_label = memory_key(rows)
    mem_scale, mem_unit = 1.0, "GiB"
    if max((r.get(mem_key) or 0) for r in rows) < 1:
        mem_scale, mem_unit = 1024.0, "MiB"
    mem_label = mem_label.replace("GiB", mem_unit)
    speed = any(r.get("tokens_per_s") for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    xs = [("tokens_per_s", 1.0, "generation throughput (tokens/s)" if speed else "generation speed not measured"),
          (mem_key, mem_scale, mem_label)]
    series = plot_series(rows)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, scale, xlabel) in zip(axes, xs):
        for i, group in enumerate(series):
            pts = sorted((r for r in group if r.get(key)), key=lambda r: r.get("chunk_size") or 0)
            if not pts:
                continue
            x, y = [r[key] * scale for r in pts], [r["val_loss"] for r in pts]
            name, kind, baseline = pts[0]["model"], pts[0]["kind"], pts[0].get("role") == "baseline"
            if baseline:
                style = dict(marker="*", markersize=14, color="black", linestyle="--" if len(pts) > 1 else "none",
                             label=f"baseline: {name} ({kind})")
                if len(pts) == 1:
                    ax.axhline(y[0], color="black", linestyle=":", linewidth=0.8)
            else:
                style = dict(marker=MARKERS[i % len(MARKERS)], color=colors[i % len(colors)],
                             linestyle="-" if len(pts) > 1 else "none", label=f"{name} ({kind})")
            ax.plot(x, y, **style)
            for r, xi in zip(pts, x):
                if r.get("chunk_size"):
                    ax.annotate(f"C={r['chunk_size']}", (xi, r["val_loss"]), textcoords="offset points",
                                xytext=(5, 5), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        if key == "tokens_per_s":
            ax.set_title("quality vs speed (lower is better, right is faster)", fontsize=10)
        else:
            ax.set_title("quality vs memory (lower is better, left is smaller)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        axes[1].legend(handles, labels, fontsize=8, loc="best")
    return _save(fig, plt, path, title)


def plot_series(rows: list[dict]) -> list[list[dict]]:
    """The rows of each line of ``plot_quality_vs_cost``, in order: grouped by ``input`` (the
    model's position among tools/evaluate.py's inputs, so two models with equal labels are never
    joined into one line), else by label and role."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = ("input", r["input"]) if "input" in r else (r["model"], r.get("role") == "baseline")
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return rows


def plot_loss_curves(runs: dict[str, Path | list[dict]], path: Path, title: Optional[str] = None) -> Path:
    """Left: validation loss against step (an adaptive CAT: one curve per chunk size);
    right: training loss at the logged steps. ``runs``: name -> run directory (its
    metrics.jsonl) or the metrics rows themselves."""
    plt = _pyplot()
    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, run) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        rows = run if isinstance(run, list) else read_metrics(run)
        evals = [r for r in rows if r.get("eval")]
        keys = sorted({k for r in evals for k in r if k.startswith("val_loss")},
                      key=lambda k: int(k.rsplit("chunk", 1)[1]) if "chunk" in k else 0)
        styles = ["-", "--", "-.", ":"]
        for j, k in enumerate(keys):
            pts = [(r["step"], r[k]) for r in evals if k in r]
            if pts:
                suffix = f" C={k.rsplit('chunk', 1)[1]}" if "chunk" in k else ""
                ax_val.plot(*zip(*pts), marker="o", markersize=3, color=color, linestyle=styles[j % len(styles)],
                            label=f"{name}{suffix}")
        train = [(r["step"], r["loss"]) for r in rows if not r.get("eval") and "loss" in r]
        if train:
            ax_train.plot(*zip(*train), color=color, label=name, linewidth=1)
    for ax, what in ((ax_val, "validation loss"), (ax_train, "training loss")):
        ax.set_xlabel("optimizer step (same tokens per step for every model)")
        ax.set_ylabel(f"{what} (nats/token)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, plt, path, title)


def _save(fig, plt, path, title) -> Path:
    """Title, write the PNG (creating its folder) and free the figure."""
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
