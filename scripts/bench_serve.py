"""Serving speed on CPU: greedy generation tokens/s and time to first token of one Llama (about
0.5 B parameters by default, random weights: speed does not depend on them) in torch fp32 and
bf16, and in llama.cpp as GGUF F16, Q8_0 and Q4_0 written by distill's exporter.

    python scripts/bench_serve.py                 # the 0.5 B shape, a few minutes on 2 cores
    python scripts/bench_serve.py --json out.json --new-tokens 64 --threads 8
    python scripts/bench_serve.py --tiny          # a 2-layer model: checks the script runs

Each backend: one untimed warm-up on the same prompt, then --repeats rounds over all backends in
turn, each a prompt of --prompt-tokens ids (prefill, whose end is the first token: TTFT) and
--new-tokens - 1 decode steps (tokens/s), greedy, never stopping at EOS; the best round of each is
kept (on a shared machine the others measure the neighbours). llama.cpp needs llama-cpp-python (pip install 'distill[gguf]'); without it only torch runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

SHAPES = {
    # 24 x (3.9 M attention + 13.3 M MLP) + 2 x 41 M embeddings/output = 0.50 B parameters.
    "0.5b": dict(
        hidden_size=1280,
        num_hidden_layers=24,
        num_attention_heads=20,
        num_key_value_heads=4,
        intermediate_size=3456,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),
}
GGUF_KINDS = ("f16", "q8_0", "q4_0")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def build_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval()
    return model


def save_tokenizer(path: Path) -> None:
    """A small byte-level BPE (the GGUF needs one); the embedding rows past it are unused."""
    from distill.config import DataSpec, TokenizerTrainSpec
    from distill.data.documents import load_documents
    from distill.data.tokenizer import train_tokenizer

    docs = load_documents(DataSpec(stdlib=True, max_documents=100))
    spec = TokenizerTrainSpec(vocab_size=512, max_chars=2_000_000)
    train_tokenizer([text for _, text in docs], spec).save_pretrained(path)


def time_torch(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s) of greedy generation with a KV cache."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft_s = time.perf_counter() - start
        cache = out.cache
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, cache=cache, use_cache=True)
            cache = out.cache
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - start
    return ttft_s, (new_tokens - 1) / decode_s


def time_llama_cpp(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s) of greedy generation in llama.cpp."""
    from distill.compress.export import llama_cpp_generation

    ttft_s, decode_s = llama_cpp_generation(llm, prompt, new_tokens)
    return ttft_s, (new_tokens - 1) / decode_s


def backends(args, prompt: list[int], tmp: Path) -> tuple[int, list[tuple]]:
    """(parameter count, [(name, size_bytes, measure, close)]) for every backend, all in memory,
    so the rounds can interleave them."""
    from distill.compress.export import llama_cpp_model
    from distill.compress.gguf_export import export_gguf

    start = time.perf_counter()
    fp32 = build_model(args.shape)
    params = sum(p.numel() for p in fp32.parameters())
    print(f"built a {params / 1e9:.3f} B-parameter Llama in {time.perf_counter() - start:.0f} s")
    out = []
    if not args.torch_only:
        for kind in GGUF_KINDS:
            start = time.perf_counter()
            path = export_gguf(fp32, tmp, tmp / f"model-{kind}.gguf", kind)
            print(f"exported GGUF {kind} in {time.perf_counter() - start:.0f} s")
            llm = llama_cpp_model(path, n_ctx=512, n_threads=args.threads)
            measure = partial(time_llama_cpp, llm, prompt, args.new_tokens)
            out.append((f"llama.cpp {kind.upper()}", path.stat().st_size, measure, llm.close))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    torch_rows = []
    for name, model in (("torch float32", fp32), ("torch bfloat16", bf16)):
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        measure = partial(time_torch, model, prompt, args.new_tokens)
        torch_rows.append((name, size, measure, None))
    return params, torch_rows + out


def run(args) -> dict:
    """Warm every backend up, then --repeats rounds over all of them (interleaved, so a busy spell
    on a shared machine does not fall on one backend only); the best round of each is kept."""
    torch.set_num_threads(args.threads)
    prompt = [(7 * i + 3) % 500 + 2 for i in range(args.prompt_tokens)]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        save_tokenizer(Path(tmp))
        params, todo = backends(args, prompt, Path(tmp))
        for _, _, measure, _ in todo:
            measure()
        best = {name: (float("inf"), 0.0) for name, *_ in todo}
        for round_ in range(args.repeats):
            for name, _, measure, _ in todo:
                ttft_s, tokens_per_s = measure()
                best[name] = (min(best[name][0], ttft_s), max(best[name][1], tokens_per_s))
                print(f"round {round_ + 1} {name}: {tokens_per_s:.2f} tok/s, TTFT {ttft_s:.2f} s")
        for *_, close in todo:
            if close is not None:
                close()
    rows = [
        dict(backend=name, size_bytes=size, ttft_s=best[name][0], tokens_per_s=best[name][1])
        for name, size, *_ in todo
    ]
    fp32 = rows[0]["tokens_per_s"]
    f16 = next((r["tokens_per_s"] for r in rows if r["backend"] == "llama.cpp F16"), None)
    for row in rows:
        row["x_torch_fp32"] = row["tokens_per_s"] / fp32
        row["x_llama_cpp_f16"] = row["tokens_per_s"] / f16 if f16 else None
    return {
        "machine": machine(),
        "shape": args.shape,
        "params": params,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"machine: {result['machine']}; {result['threads']} threads; load average "
        + ", ".join(f"{x:.2f}" for x in result["load_average"]),
        f"Llama {result['params'] / 1e9:.2f} B ({result['shape']}), prompt "
        f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, greedy, best of "
        f"{result['repeats']}",
        "",
        "| backend | size MB | TTFT s | tokens/s | x torch fp32 | x llama.cpp F16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        vs_f16 = f"{r['x_llama_cpp_f16']:.2f}" if r["x_llama_cpp_f16"] else "-"
        lines.append(
            f"| {r['backend']} | {r['size_bytes'] / 1e6:.0f} | {r['ttft_s']:.2f} | "
            f"{r['tokens_per_s']:.2f} | {r['x_torch_fp32']:.2f} | {vs_f16} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", dest="shape", action="store_const", const="tiny", default="0.5b")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--torch-only", action="store_true", help="skip llama.cpp")
    parser.add_argument("--workdir", help="where the temporary GGUF files go (default: $TMPDIR)")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args(argv)
    if not args.torch_only:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            print("llama-cpp-python is not installed: measuring torch only", file=sys.stderr)
            args.torch_only = True
    result = run(args)
    print(table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
