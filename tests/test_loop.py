"""The training loop in-process on a tiny model (no subprocess, no recipe): it trains, logs every
term, saves, and a run stopped after some steps and resumed from its checkpoint ends bitwise where
an uninterrupted run ends. Cheap enough to run on every change to the loop."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.config import TrainSpec
from distill.errors import TrainingDiverged
from distill.objective.module import DistillModule
from distill.runtime.distributed import make_accelerator
from distill.runtime.loop import TrainJob, train
from distill.specs import LogitTerm, ObjectiveSpec
from distill.tracking import Tracker

VOCAB, SEQ = 64, 16


def tiny_llama(seed: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


def job(tmp_path, steps: int, teacher=None, **spec) -> TrainJob:
    blocks = torch.randint(0, VOCAB, (24, SEQ), generator=torch.Generator().manual_seed(1))
    objective = None
    if teacher is not None:
        objective = ObjectiveSpec(ce_weight=0.5, terms=[LogitTerm("forward_kl", weight=0.5)])
    module = DistillModule(tiny_llama(0), objective, VOCAB)
    train_spec = TrainSpec(max_steps=steps, batch_size=4, grad_accum=2, log_every=1, **spec)
    return TrainJob(
        accelerator=make_accelerator(train_spec.grad_accum),
        module=module,
        teacher=teacher,
        train_blocks=blocks,
        eval_blocks=blocks[:4],
        spec=train_spec,
        seed=0,
        stage_dir=tmp_path,
        tracker=Tracker(tmp_path / "metrics.jsonl"),
        fingerprint="test",
        eval_batch_size=4,
        log=lambda message: None,
    )


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_loop_trains_logs_every_term_and_saves(tmp_path):
    teacher = tiny_llama(1, hidden=48).eval()
    result = train(job(tmp_path, 6, teacher=teacher))
    logged = [r for r in rows(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    for r in logged:  # the total is the weighted sum of the logged terms
        assert r["loss"] == pytest.approx(0.5 * r["loss_ce"] + 0.5 * r["loss_forward_kl"], rel=1e-5)
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert result.steps == 6 and result.tokens == 6 * 2 * 4 * (SEQ - 1)
    assert "perplexity" in result.eval
    assert (tmp_path / "checkpoints" / "step_00000006" / "MANIFEST.json").is_file()


class Crash(Exception):
    pass


def test_a_resumed_run_ends_bitwise_where_an_uninterrupted_one_ends(tmp_path):
    straight = job(tmp_path / "a", 6, save_every=3)
    train(straight)
    crashing = job(tmp_path / "b", 6, save_every=3)
    steps = []

    def crash_in_step_5(model):  # after step 3's checkpoint, mid-way through the next save period
        steps.append(1)
        if len(steps) == 5:
            raise Crash

    crashing.hooks.after_optimizer_step = crash_in_step_5
    with pytest.raises(Crash):
        train(crashing)
    resumed = job(tmp_path / "b", 6, save_every=3)  # a new process: fresh weights, then resume
    train(resumed)
    a = straight.module.student.state_dict()
    b = resumed.module.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["step"]: r["loss"] for r in rows(tmp_path / "a" / "metrics.jsonl") if "loss" in r}
    again = {r["step"]: r["loss"] for r in rows(tmp_path / "b" / "metrics.jsonl") if "loss" in r}
    assert losses == again


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_FAULT", "nan_at=0-9")
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        train(job(tmp_path, 6, max_bad_steps=3))
    skipped = [r for r in rows(tmp_path / "metrics.jsonl") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [1, 2]  # the third bad step stops before logging
