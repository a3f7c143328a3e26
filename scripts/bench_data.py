"""Data preparation at scale, measured: builds a corpus of at least `--tokens` tokens from this
machine's standard library sources (copied as often as needed, each copy its own directory so
every document has its own id), prepares its token store with `distill data`, and trains a few
steps of the quickstart's student on it and on the quickstart's own store.

    python scripts/bench_data.py                 # 100 M tokens (about 19,000 files, 450 MB)
    python scripts/bench_data.py --tokens 5e6    # a quick check

Prints preparation tokens/s, peak RSS of the preparing process tree, bytes per token on disk, and
the training process's peak RSS on each store; `--json PATH` also writes them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
# One training stage of the quickstart's student (what the training RSS is compared on).
STUDENT_ONLY = "stages=[{name: baseline, kind: train, model: student}]"


def distill(*args: str) -> tuple[str, int]:
    """Run the `distill` CLI; returns its stderr and the peak RSS in bytes of its largest process,
    read from a wrapper's RUSAGE_CHILDREN so nothing else this script started is counted."""
    code = (
        "import resource, subprocess, sys; "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(p.stderr); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
        "sys.exit(p.returncode)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "distill", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"distill {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stderr, int(proc.stdout.split()[-1])


def stdlib_sources() -> list[tuple[Path, Path]]:
    """(path, path relative to the stdlib) of the quickstart's documents."""
    import sysconfig

    from distill.config import DataSpec
    from distill.data.documents import stdlib_paths

    root = Path(sysconfig.get_paths()["stdlib"])
    return [(p, p.relative_to(root)) for p in stdlib_paths(DataSpec(stdlib=True).stdlib_exclude)]


def build_corpus(corpus: Path, copies: int) -> int:
    """`copies` copies of the stdlib sources under corpus/copyNNN/; returns the bytes written."""
    sources = stdlib_sources()
    written = 0
    for k in range(copies):
        for path, rel in sources:
            target = corpus / f"copy{k:03d}" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            written += target.stat().st_size
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=1e8, help="corpus size to reach")
    parser.add_argument("--steps", type=int, default=20, help="training steps on each store")
    parser.add_argument("--workdir", help="where to build (default: a temporary directory)")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="distill-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    small = work / "quickstart"
    distill("data", str(RECIPE), "--output-dir", str(small))
    small_stats = json.loads((small / "data" / "stats.json").read_text())
    per_copy = small_stats["train_tokens"] + small_stats["heldout_tokens"]
    copies = math.ceil(args.tokens / per_copy * 1.02)  # its own tokenizer differs a little
    corpus = work / "corpus"
    if not corpus.exists():
        t0 = time.perf_counter()
        corpus_bytes = build_corpus(corpus, copies)
        print(
            f"corpus: {copies} copies, {corpus_bytes / 1e6:,.0f} MB ({time.perf_counter() - t0:.0f} s)"
        )
    big = work / "large"
    data_args = ["data.stdlib=false", f"data.files=[{corpus}/**/*.py]", "--output-dir", str(big)]
    if (big / "data").exists():  # measure a build, not a reuse
        shutil.rmtree(big / "data")
    _, prep_rss = distill("data", str(RECIPE), *data_args)
    stats = json.loads((big / "data" / "stats.json").read_text())
    tokens = stats["train_tokens"] + stats["heldout_tokens"]

    rss = {}
    for name, out, extra in (("quickstart", small, []), ("large", big, data_args[:2])):
        _, rss[name] = distill(
            "run", str(RECIPE), *extra, STUDENT_ONLY, "--output-dir", str(out),
            "--max-steps", str(args.steps),
        )  # fmt: skip
    results = {
        "tokens": tokens,
        "documents": stats["documents"],
        "prep_wall_s": stats["wall_s"],
        "prep_tokens_per_s": stats["tokens_per_s"],
        "prep_cpu_s": stats["cpu_s"],
        "prep_tokens_per_cpu_s": stats["tokens_per_cpu_s"],
        "prep_peak_rss_tree_bytes": stats["peak_rss_bytes"],
        "prep_peak_rss_largest_process_bytes": prep_rss,
        "bytes_on_disk": stats["bytes_on_disk"],
        "bytes_per_token": stats["bytes_per_token"],
        "num_proc": stats["num_proc"],
        "train_peak_rss_bytes": rss,
        "train_peak_rss_difference_bytes": rss["large"] - rss["quickstart"],
        "train_steps": args.steps,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    mb = 1e6
    print(
        f"prepared {tokens:,} tokens ({stats['documents']:,} documents) in {stats['wall_s']:.1f} s "
        f"with {stats['num_proc']} tokenizer processes\n"
        f"  tokens/s                      {stats['tokens_per_s']:,.0f} "
        f"({stats['tokens_per_cpu_s']:,.0f} per CPU second of the process tree)\n"
        f"  peak RSS, whole process tree  {stats['peak_rss_bytes'] / mb:,.0f} MB "
        f"(largest single process {prep_rss / mb:,.0f} MB)\n"
        f"  on disk                       {stats['bytes_on_disk'] / mb:,.1f} MB, "
        f"{stats['bytes_per_token']:.3f} bytes/token\n"
        f"training {args.steps} steps of the quickstart student, peak RSS\n"
        f"  on the quickstart store       {rss['quickstart'] / mb:,.0f} MB ({per_copy:,} tokens)\n"
        f"  on this store                 {rss['large'] / mb:,.0f} MB "
        f"({(rss['large'] - rss['quickstart']) / mb:+,.0f} MB)\n"
        f"load average {load_before[0]:.2f} before, {results['load_average_after'][0]:.2f} after, "
        f"{os.cpu_count()} CPUs"
    )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
