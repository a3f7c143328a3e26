"""The run's summary and report: every stage side by side (size, quality, what each step cost and
won), as `summary.json`, `report.md` and `report.png`."""

from __future__ import annotations

import json
from pathlib import Path


def write_summary(path: Path, entries: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stages": entries}, indent=2))
    tmp.replace(path)


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def write_report(out_dir: Path, recipe_name: str, entries: list[dict]) -> Path:
    """report.md (a table of every stage) and report.png (perplexity and size side by side)."""
    lines = [
        f"# distill report: {recipe_name}",
        "",
        "| stage | kind | params | size on disk | held-out ppl | held-out loss | steps | wall s | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for e in entries:
        ev = e.get("eval") or {}
        notes = []
        keys = ("method", "sparsity", "perplexity_before", "params_before", "scheme", "teacher")
        for key in (*keys, "teacher_agreement", "latency_s"):
            if e.get(key) is not None:
                v = e[key]
                notes.append(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}")
        ppl = ev.get("perplexity")
        lines.append(
            f"| {e['name']} | {e['kind']} | {e.get('params', 0):,} | "
            f"{_fmt_bytes(e.get('size_bytes'))} | {ppl:.2f} | {ev.get('loss', float('nan')):.4f} "
            f"| {e.get('steps', 0)} | {e.get('wall_s', 0):.1f} | {', '.join(notes)} |"
            if ppl is not None
            else f"| {e['name']} | {e['kind']} | {e.get('params', 0):,} | - | - | - | - | - | |"
        )
    comparisons = _comparisons(entries)
    if comparisons:
        lines += ["", "## Comparisons", ""] + [f"- {c}" for c in comparisons]
    png = _plot(out_dir, entries)
    if png:
        lines += ["", f"![stages]({png.name})"]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _comparisons(entries: list[dict]) -> list[str]:
    out = []
    by_name = {e["name"]: e for e in entries}
    for e in entries:
        if e.get("kind") == "cache-teacher":
            out.append(_cache_reuse(e, [r for r in entries if r.get("teacher_cache") == e["name"]]))
        ref = e.get("compare_to")
        if ref and ref in by_name:
            a = (by_name[ref].get("eval") or {}).get("perplexity")
            b = (e.get("eval") or {}).get("perplexity")
            if a and b:
                out.append(
                    f"{e['name']} vs {ref}: perplexity {b:.2f} vs {a:.2f} "
                    f"({(a - b) / a * 100:+.1f} % better)"
                )
        if e.get("recovered_fraction") is not None and ref in by_name:
            if by_name[ref]["kind"] == "prune":
                out.append(_pruning_recovery(e, by_name[ref]))
                continue
            ptq = by_name[ref]
            out.append(
                f"{e['name']} recovered {e['recovered_fraction'] * 100:.0f} % of the perplexity "
                f"{ref} lost ({ptq['scheme']}: full precision {ptq['perplexity_before']:.2f}, "
                f"ptq {ptq['eval']['perplexity']:.2f}, qat {e['eval']['perplexity']:.2f})"
            )
        if e.get("kind") == "convert" and ref in by_name and by_name[ref].get("size_bytes"):
            latency = (
                f"; generation {e['latency_s']:.2f} s vs {e['float_latency_s']:.2f} s in float"
                if e.get("latency_s") and e.get("float_latency_s")
                else ""
            )
            out.append(
                f"{e['name']}: {e['size_bytes'] / by_name[ref]['size_bytes']:.2f}x the bytes of "
                f"{ref} ({_fmt_bytes(e['size_bytes'])} vs {_fmt_bytes(by_name[ref]['size_bytes'])})"
                f"{latency}"
            )
    return out


def _cache_reuse(cache: dict, readers: list[dict]) -> str:
    """How much teacher work an offline cache saved: computed once, read by every reader."""
    trained = sum(r.get("tokens") or 0 for r in readers)
    return (
        f"{cache['name']}: {cache['tokens']:,} teacher tokens computed once (k={cache['k']}, "
        f"{cache['bytes_per_token']:.0f} bytes/token) and reused by {len(readers)} stages "
        f"({', '.join(r['name'] for r in readers) or 'none'}) that trained on {trained:,} tokens "
        "without running the teacher"
    )


def _pruning_recovery(recovery: dict, pruned: dict) -> str:
    before, after = pruned["perplexity_before"], pruned["eval"]["perplexity"]
    return (
        f"{recovery['name']} recovered {recovery['recovered_fraction'] * 100:.0f} % of the "
        f"perplexity {pruned['name']} lost ({pruned['method']}: before pruning {before:.2f}, "
        f"pruned {after:.2f}, recovered {recovery['eval']['perplexity']:.2f})"
    )


def recovered_fraction(
    perplexity_full: float, perplexity_ptq: float, perplexity_qat: float
) -> float | None:
    """Share of the post-training perplexity increase that QAT won back (1 = all of it, < 0 =
    worse than PTQ); None when PTQ lost nothing to win back."""
    lost = perplexity_ptq - perplexity_full
    if lost <= 0:
        return None
    return (perplexity_ptq - perplexity_qat) / lost


def _plot(out_dir: Path, entries: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [e for e in entries if (e.get("eval") or {}).get("perplexity")]
    if not rows:
        return None
    names = [e["name"] for e in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(rows) + 4), 4))
    ax1.bar(names, [e["eval"]["perplexity"] for e in rows], color="tab:blue")
    ax1.set_title("held-out perplexity (lower is better)")
    ax2.bar(names, [(e.get("size_bytes") or 0) / 2**20 for e in rows], color="tab:orange")
    ax2.set_title("size on disk (MiB)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = out_dir / "report.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
