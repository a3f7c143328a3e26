"""Measuring a model: held-out perplexity, agreement with the teacher, size, generation latency;
and the run report that puts every stage side by side."""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch


@torch.no_grad()
def heldout_metrics(
    model,
    blocks: torch.Tensor,
    batch_size: int,
    vocab_size: int,
    autocast=None,
    accelerator=None,
    max_batches: int | None = None,
    chunk_size: int = 1024,
) -> dict:
    """Next-token loss and perplexity over held-out blocks, sharded over ranks when an
    accelerator with several processes is given."""
    from distill.trainer import DistillModule

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    was_training = model.training
    model.eval()
    n_batches = math.ceil(len(blocks) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    # Every rank runs the same number of forwards (ZeRO-3 gathers are collectives); a rank
    # without data left runs a fully masked batch that counts nothing.
    per_rank = math.ceil(n_batches / world)
    plain = DistillModule(model, None, vocab_size, chunk_size=chunk_size)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(per_rank):
        b = i * world + rank
        ids = blocks[b * batch_size : (b + 1) * batch_size] if b < n_batches else blocks[:1]
        ids = ids.to(device)
        labels = ids if b < n_batches else torch.full_like(ids, -100)
        with autocast or nullcontext():
            total, _, n = plain(ids, None, labels=labels)
        loss_sum += total.double()
        count += n.double()
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
        count = accelerator.reduce(count, "sum")
    model.train(was_training)
    loss = float(loss_sum / count.clamp(min=1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


@torch.no_grad()
def teacher_agreement(
    student, teacher, blocks: torch.Tensor, batch_size: int, vocab_size: int, max_batches: int = 4
) -> float:
    """Fraction of held-out positions where the student's top-1 token equals the teacher's."""
    from distill.trainer import backbone_of, causal_lm_of

    agree = total = 0
    for b in range(min(max_batches, math.ceil(len(blocks) / batch_size))):
        ids = blocks[b * batch_size : (b + 1) * batch_size]
        picks = []
        for model in (student, teacher):
            device = next(model.parameters()).device
            hidden = backbone_of(model)(input_ids=ids.to(device)).last_hidden_state
            head = causal_lm_of(model).get_output_embeddings()
            flat = hidden.reshape(-1, hidden.shape[-1])
            # chunked so a large vocabulary never needs [all tokens x vocab] at once
            picks.append(
                torch.cat(
                    [
                        head(flat[i : i + 1024])[:, :vocab_size].argmax(-1).cpu()
                        for i in range(0, len(flat), 1024)
                    ]
                )
            )
        agree += int((picks[0] == picks[1]).sum())
        total += picks[0].numel()
    return agree / max(total, 1)


@torch.no_grad()
def generate_latency_s(model, prompt_ids: torch.Tensor, new_tokens: int = 128) -> float:
    """Wall time of greedy generation of `new_tokens` tokens (after one warm-up)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(prompt_ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    start = time.perf_counter()
    model.generate(prompt_ids, **kwargs)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Report


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
