"""`eval.gates`: conditions stages must meet before a model ships. A gate that fails ends the run
(after the report is written) with exit code 3, naming the stage, metric, value and threshold."""

from __future__ import annotations

from distill.config import GateSpec
from distill.errors import GateFailed
from distill.run.results import StageResult


def _set_perplexity(result: StageResult, set_name: str) -> float | None:
    sets = (result.metrics or {}).get("sets") or {}
    return (sets.get(set_name) or {}).get("perplexity")


def _lm_eval_failures(gate: GateSpec, result: StageResult) -> list[str]:
    scores = (result.metrics or {}).get("lm_eval") or {}
    out = []
    for key, bound in gate.lm_eval.items():
        value = scores.get(key)
        if value is None:
            out.append(f"lm_eval {key} was not measured (measured: {sorted(scores) or 'none'})")
        elif bound.min is not None and value < bound.min:
            out.append(f"lm_eval {key} = {value:.4g}, below the minimum {bound.min:g}")
        elif bound.max is not None and value > bound.max:
            out.append(f"lm_eval {key} = {value:.4g}, above the maximum {bound.max:g}")
    return out


def gate_failures(gate: GateSpec, by_name: dict[str, StageResult]) -> list[str]:
    """What `gate` finds wrong with the finished stages (empty when it holds)."""
    result = by_name[gate.stage]
    out = []
    if gate.max_perplexity_increase is not None:
        mine = _set_perplexity(result, gate.set)
        theirs = _set_perplexity(by_name[gate.against], gate.set)
        if mine is None or theirs is None:
            out.append(f"perplexity on eval set {gate.set!r} was not measured")
        elif mine / theirs - 1 > gate.max_perplexity_increase:
            out.append(
                f"{gate.set} perplexity {mine:.4g} is {(mine / theirs - 1) * 100:+.2f} % against "
                f"{gate.against!r} ({theirs:.4g}), above the allowed "
                f"{gate.max_perplexity_increase * 100:+.2f} % (max_perplexity_increase "
                f"{gate.max_perplexity_increase:g})"
            )
    if gate.min_teacher_agreement is not None:
        agreement = ((result.metrics or {}).get("teacher") or {}).get("top1_agreement")
        if agreement is None:
            out.append(
                "teacher agreement was not measured (the stage has no teacher: set `eval.teacher`)"
            )
        elif agreement < gate.min_teacher_agreement:
            out.append(
                f"top-1 teacher agreement {agreement:.4g}, below min_teacher_agreement "
                f"{gate.min_teacher_agreement:g}"
            )
    return out + _lm_eval_failures(gate, result)


def check_gates(gates: list[GateSpec], results: list[StageResult]) -> None:
    """Raise GateFailed naming every failure of every gate; return when all hold."""
    by_name = {r.name: r for r in results}
    failures = [
        f"eval.gates.{i} (stage {gate.stage!r}): {problem}"
        for i, gate in enumerate(gates)
        for problem in gate_failures(gate, by_name)
    ]
    if failures:
        raise GateFailed(
            f"{len(failures)} gate check(s) failed; the model should not ship:\n  "
            + "\n  ".join(failures)
        )
