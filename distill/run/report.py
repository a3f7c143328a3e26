"""The run's summary and report: every stage side by side (size, quality, what each step cost and
won), as `summary.json`, `report.md` and `report.png`."""

from __future__ import annotations

import json
from pathlib import Path

from distill.config import WandbSpec
from distill.files import atomic_write
from distill.run.report_plots import heldout_perplexity, plot_frontier, plot_training_curves
from distill.tracking import log_report


def write_summary(path: Path, entries: list[dict]) -> None:
    atomic_write(path, json.dumps({"stages": entries}, indent=2), f"writing the summary {path}")


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _pct(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{(value / reference - 1) * 100:+.1f} %"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _teacher_stage(entries: list[dict]) -> str | None:
    """The stage others are compared with: the teacher most stages measured agreement against."""
    names = {e["name"] for e in entries}
    refs = [((e.get("metrics") or {}).get("teacher") or {}).get("model") for e in entries]
    refs += [e.get("teacher") for e in entries]
    refs = [r for r in refs if r in names]
    return max(set(refs), key=refs.count) if refs else None


def stage_table(entries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every stage's size and metrics, and the change of held-out perplexity against the teacher
    and against the stage it came from: (header, rows)."""
    by_name = {e["name"]: e for e in entries}
    teacher = _teacher_stage(entries)
    sets = list(
        dict.fromkeys(k for e in entries for k in ((e.get("metrics") or {}).get("sets") or {}))
    )
    tasks = list(
        dict.fromkeys(k for e in entries for k in ((e.get("metrics") or {}).get("lm_eval") or {}))
    )
    header = ["stage", "kind", "from", "params", "size", "scheme"]
    header += [f"{name} ppl" for name in sets] or ["held-out ppl"]
    header += [f"vs {teacher or 'teacher'}", "vs from", "top-1 agree", "KL", *tasks]
    on_policy = any((e.get("metrics") or {}).get("on_policy") for e in entries)
    if on_policy:
        header += ["teacher NLL sampled", "teacher NLL greedy", "gen share"]
    header += ["tok/s", "first token ms", "peak MiB", "steps", "wall s", "notes"]
    rows = []
    for i, e in enumerate(entries):
        m = e.get("metrics") or {}
        ppl = heldout_perplexity(e)
        # the stage it came from: an earlier stage (a `models` key of the same name is not one)
        source = next((s for s in entries[:i] if s["name"] == e.get("from")), None)
        speed, agree = m.get("speed") or {}, m.get("teacher") or {}
        peak = speed.get("peak_mem_bytes")
        row = [e["name"], e["kind"], e.get("from", "-"), f"{e.get('params', 0):,}"]
        row += [_fmt_bytes(e.get("size_bytes")), str(e.get("scheme", "-"))]
        row += [_num((m.get("sets", {}).get(n) or {}).get("perplexity")) for n in sets] or [
            _num(ppl)
        ]
        row += [_pct(ppl, heldout_perplexity(by_name[teacher]) if teacher else None)]
        row += [_pct(ppl, heldout_perplexity(source) if source else None)]
        row += [_num(agree.get("top1_agreement"), 3), _num(agree.get("kl"), 4)]
        row += [_num((m.get("lm_eval") or {}).get(t), 3) for t in tasks]
        if on_policy:
            row += _on_policy_cells(m.get("on_policy") or {}, e.get("on_policy") or {})
        row += [_num(speed.get("tokens_per_s"), 1)]
        first = speed.get("time_to_first_token_s")
        row += [_num(first * 1000 if first is not None else None, 1)]
        row += [_num(peak / 2**20 if peak else None, 0), str(e.get("steps", 0))]
        row += [_num(e.get("wall_s"), 1), _notes(e)]
        rows.append(row)
    return header, rows


def _on_policy_cells(metrics: dict, training: dict) -> list[str]:
    """The teacher's per-token NLL of the stage's own held-out completions, and the share of its
    training time spent generating (on-policy stages)."""
    share = training.get("generation_share")
    return [
        _num(metrics.get("sampled_nll"), 3),
        _num(metrics.get("greedy_nll"), 3),
        f"{share * 100:.0f} %" if share is not None else "-",
    ]


def _notes(entry: dict) -> str:
    """What a stage kind records beside the metrics (pruning method, sparsity, before/after)."""
    keys = ("method", "sparsity", "perplexity_before", "params_before", "teacher", "latency_s")
    notes = []
    for key in keys:
        value = entry.get(key)
        if value is not None:
            notes.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(notes)


def _position_lines(entries: list[dict]) -> list[str]:
    """Held-out perplexity by position in the block, per stage."""
    rows = [e for e in entries if ((e.get("metrics") or {}).get("sets") or {}).get("heldout")]
    if not rows:
        return []
    spans = rows[0]["metrics"]["sets"]["heldout"]["position_buckets"]
    lines = ["", "## Held-out perplexity by position in the block", ""]
    lines += ["| stage | " + " | ".join(f"tokens {a}-{b - 1}" for a, b in spans) + " |"]
    lines += ["| --- |" + " ---: |" * len(spans)]
    for e in rows:
        values = e["metrics"]["sets"]["heldout"]["position_perplexity"]
        lines.append(f"| {e['name']} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines


def write_report(
    out_dir: Path, recipe_name: str, entries: list[dict], wandb_spec: WandbSpec | None = None
) -> Path:
    """report.md (every stage side by side), report.png (the size and speed frontiers) and
    report_curves.png (training curves); logged to W&B too when `wandb_spec` enables it."""
    header, rows = stage_table(entries)
    lines = [f"# distill report: {recipe_name}", "", "| " + " | ".join(header) + " |"]
    lines += ["| --- | --- | --- |" + " ---: |" * (len(header) - 4) + " --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += _position_lines(entries)
    comparisons = _comparisons(entries)
    if comparisons:
        lines += ["", "## Comparisons", ""] + [f"- {c}" for c in comparisons]
    images = [
        p for p in (plot_frontier(out_dir, entries), plot_training_curves(out_dir, entries)) if p
    ]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in images]
    path = out_dir / "report.md"
    atomic_write(path, "\n".join(lines) + "\n", f"writing the report {path}")
    if wandb_spec is not None and wandb_spec.mode != "disabled":
        log_report(wandb_spec, recipe_name, header, rows, images)
    return path


def _comparisons(entries: list[dict]) -> list[str]:
    out = []
    by_name = {e["name"]: e for e in entries}
    for e in entries:
        if e.get("kind") == "cache-teacher":
            out.append(_cache_reuse(e, [r for r in entries if r.get("teacher_cache") == e["name"]]))
        ref = e.get("compare_to")
        if ref and ref in by_name and e.get("kind") != "export":  # exports: one line per file
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
        if e.get("kind") == "export" and ref in by_name:
            out += _export_lines(e, by_name[ref])
    return out


def _export_lines(export: dict, source: dict) -> list[str]:
    """Each exported file's perplexity in each runtime against the stage it exported (for a
    `qat`/`ptq` stage: its fake-quantized perplexity, which an export on the same grid keeps)."""
    base = (source.get("eval") or {}).get("perplexity")
    lines = []
    for x in export.get("exports", []):
        grid = x.get("grid") or "float"
        trained = x.get("trained_grid")
        onto = f" (trained on {trained})" if trained and trained != grid else ""
        for runtime, m in x["runtimes"].items():
            delta = (
                f", {(m['perplexity'] / base - 1) * 100:+.2f} % vs {source['name']}" if base else ""
            )
            lines.append(
                f"{export['name']}: {x['format']} on grid {grid}{onto} through {runtime}: "
                f"perplexity {m['perplexity']:.2f}{delta}; {_fmt_bytes(x['size_bytes'])}"
            )
    return lines


def _cache_reuse(cache: dict, readers: list[dict]) -> str:
    """How much teacher work an offline cache saved: computed once, read by every reader."""
    trained = sum(r.get("tokens") or 0 for r in readers)
    samples = f" + {cache['tail_samples']} tail samples" if cache.get("tail_samples") else ""
    return (
        f"{cache['name']}: {cache['tokens']:,} teacher tokens computed once (k={cache['k']}"
        f"{samples}, {cache['bytes_per_token']:.0f} bytes/token) and reused by {len(readers)} stages "
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
