"""The report's plots (matplotlib): quality against size and against speed across the stages (the
trade-off frontier), and each training stage's loss terms over its steps."""

from __future__ import annotations

import json
from pathlib import Path

from distill.files import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    try:
        with atomic_file(path, f"writing the plot {path}") as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)


def heldout_perplexity(entry: dict) -> float | None:
    sets = (entry.get("metrics") or {}).get("sets") or {}
    return (sets.get("heldout") or {}).get("perplexity") or (entry.get("eval") or {}).get(
        "perplexity"
    )


def _frontier(points: list[tuple[float, float]], higher_x_better: bool) -> list[tuple]:
    """The points no other point beats on both axes (lower perplexity; smaller or faster)."""
    ordered = sorted(points, key=lambda p: (-p[0] if higher_x_better else p[0], p[1]))
    best, out = float("inf"), []
    for x, y in ordered:
        if y < best:
            best = y
            out.append((x, y))
    return out


def _scatter(ax, rows: list[tuple[str, float, float]], xlabel: str, higher_x_better: bool) -> None:
    for name, x, y in rows:
        ax.scatter([x], [y], s=30)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    line = _frontier([(x, y) for _, x, y in rows], higher_x_better)
    ax.plot([x for x, _ in line], [y for _, y in line], "--", color="gray", label="frontier")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.legend(fontsize=8)


def plot_frontier(out_dir: Path, entries: list[dict]) -> Path | None:
    """report.png: perplexity against size on disk and against generation tokens/s."""
    plt = _pyplot()
    sized = [
        (e["name"], e["size_bytes"] / 2**20, heldout_perplexity(e))
        for e in entries
        if e.get("size_bytes") and heldout_perplexity(e)
    ]
    if not sized:
        return None
    fast = [
        (e["name"], e["metrics"]["speed"]["tokens_per_s"], heldout_perplexity(e))
        for e in entries
        if ((e.get("metrics") or {}).get("speed") or {}).get("tokens_per_s")
        and heldout_perplexity(e)
    ]
    fig, axes = plt.subplots(1, 2 if fast else 1, figsize=(12 if fast else 6, 4.5), squeeze=False)
    _scatter(axes[0][0], sized, "size on disk (MiB)", higher_x_better=False)
    axes[0][0].set_title("quality vs size")
    if fast:
        _scatter(axes[0][1], fast, "generation (tokens/s)", higher_x_better=True)
        axes[0][1].set_title("quality vs speed")
    fig.tight_layout()
    path = out_dir / "report.png"
    _save(plt, fig, path)
    return path


def _loss_rows(metrics_file: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics_file.open() if line.strip()]
    return [r for r in rows if "loss" in r and "step" in r]


def plot_training_curves(out_dir: Path, entries: list[dict]) -> Path | None:
    """report_curves.png: every loss term of each training stage (from its metrics.jsonl)."""
    curves = {}
    for e in entries:
        path = out_dir / e["name"] / "metrics.jsonl"
        rows = _loss_rows(path) if path.is_file() else []
        if rows:
            curves[e["name"]] = rows
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        terms = sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss_")})
        for term in terms:
            points = [(r["step"], r[term]) for r in rows if term in r]
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=term)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "report_curves.png"
    _save(plt, fig, path)
    return path
