"""scripts/bench_serve.py runs end to end on a tiny Llama and reports every backend it can."""

import importlib.util
import json
import subprocess
import sys

from conftest import ROOT


def test_bench_serve_tiny(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--tiny", "--new-tokens", "4"]
        + ["--repeats", "1", "--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    backends = [row["backend"] for row in result["rows"]]
    expected = ["torch float32", "torch bfloat16"]
    if importlib.util.find_spec("llama_cpp") is not None:
        expected += ["llama.cpp F16", "llama.cpp Q8_0", "llama.cpp Q4_0"]
    assert backends == expected
    assert all(row["tokens_per_s"] > 0 and row["ttft_s"] > 0 for row in result["rows"])
    assert result["rows"][0]["x_torch_fp32"] == 1.0
    assert "| backend | size MB | TTFT s | tokens/s |" in proc.stdout
