"""The FLOP model of a training step and the peaks MFU is quoted against.

N = weights of every matmul (the lm_head counted even when tied, the embedding lookup not),
A = heads x head_dim, L = layers, S = sequence length; student F_s = 6 N_s + 12 L_s A_s S, teacher
F_t = 2 N_t + 4 L_t A_t S, per token (attention counted non-causal, as PaLM and torchtitan do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from distill.models import causal_lm_of

SPEC_BF16_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def matmul_params(model: nn.Module) -> int:
    """Weights of every nn.Linear, the lm_head counted even when tied; embedding lookups are not."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@dataclass
class ModelShape:
    """What the FLOP model needs to know about one model."""

    matmul_params: int
    layers: int
    heads: int
    head_dim: int
    hidden: int
    vocab_rows: int

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim


def model_shape(model: nn.Module, extra_matmul_params: int = 0) -> ModelShape:

    config = causal_lm_of(model).config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        matmul_params=matmul_params(model) + extra_matmul_params,
        layers=config.num_hidden_layers,
        heads=heads,
        head_dim=head_dim,
        hidden=config.hidden_size,
        vocab_rows=causal_lm_of(model).get_output_embeddings().weight.shape[0],
    )


def student_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Forward + backward of the trained model: 6 N + 12 L A S."""
    return 6 * shape.matmul_params + 12 * shape.layers * shape.attention_width * seq_len


def teacher_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Forward only: 2 N + 4 L A S."""
    return 2 * shape.matmul_params + 4 * shape.layers * shape.attention_width * seq_len


def spec_peak_flops(device: torch.device, precision: str) -> float | None:
    """The spec sheet's dense bf16 peak for a known CUDA card, else None (CPU, fp32, unknown)."""
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in SPEC_BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """(FLOP/s, n): the best of a few timed rounds of an n x n x n matmul in `dtype`."""
    n, calls = (8192, 20) if device.type == "cuda" else (1024, 4)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    for round_index in range(6):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        _sync(device)
        if round_index > 0:  # the first round warms up kernels and clocks
            best = max(best, 2 * n**3 * calls / (time.perf_counter() - t0))
    return best, n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
