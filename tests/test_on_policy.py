"""On-policy distillation: which steps are on-policy, the prompt masked out of every loss, the
student's samples drawn from the step's seed alone, every loss kind on generated sequences against
plain softmax formulas, the errors a recipe can cause, and a resume that is bitwise."""

import json

import pytest
import torch
import yaml
from test_bad_input import assets, fails, recipe  # noqa: F401 (the fixture is used by name)
from test_loop import VOCAB, Crash, tiny_llama

from distill.config import TrainSpec
from distill.data.prompts import BlockPrompts, TokenPrompts, build_prompt_sets, left_padded
from distill.errors import RecipeError
from distill.objective.losses import IGNORE_INDEX
from distill.objective.module import DistillModule, teacher_forward
from distill.objective.on_policy import (
    GeneratedBatch,
    completion_labels,
    is_on_policy_step,
    label_logprob_sum,
    on_policy_steps_before,
    sampling_seed,
)
from distill.prompts_spec import PromptsSpec
from distill.recipe_file import load_recipe
from distill.runtime.distributed import make_accelerator
from distill.runtime.generate import HFGenerator
from distill.runtime.loop import TrainJob, _inputs, train
from distill.runtime.on_policy import OnPolicy
from distill.specs import LOGIT_LOSS_KINDS, LogitTerm, ObjectiveSpec, OnPolicySpec
from distill.tracking import Tracker

from conftest import tiny_recipe

PROMPT, NEW = 6, 8


def test_lambda_schedule_is_an_even_pure_function_of_the_step():
    assert [s for s in range(8) if is_on_policy_step(s, 0.5)] == [1, 3, 5, 7]
    assert not any(is_on_policy_step(s, 0.0) for s in range(50))
    assert all(is_on_policy_step(s, 1.0) for s in range(50))
    for fraction in (0.1, 0.25, 1 / 3, 0.7):
        on = [is_on_policy_step(s, fraction) for s in range(300)]
        for n in (10, 99, 300):  # every prefix holds floor(n * lambda) on-policy steps
            assert sum(on[:n]) == on_policy_steps_before(n, fraction)
            assert abs(sum(on[:n]) - n * fraction) < 1
    assert sum(is_on_policy_step(s, 0.1) for s in range(10)) == 1  # exact, not 0.999...
    with pytest.raises(ValueError):
        OnPolicySpec(fraction=1.5)
    with pytest.raises(ValueError):
        OnPolicySpec(fraction=float("nan"))


def test_completion_labels_mask_the_prompt_and_what_follows_eos():
    seqs = torch.tensor([[5, 6, 7, 1, 2, 0, 9], [5, 6, 7, 3, 4, 8, 2]])
    labels = completion_labels(seqs, 3, eos_id=0, vocab_size=10)
    assert labels.tolist() == [[-100, -100, -100, 1, 2, 0, -100], [-100, -100, -100, 3, 4, 8, 2]]
    prompts = left_padded([[4, 5], [1, 2, 3, 4]], 3, pad_id=0)
    assert prompts.ids.tolist() == [[0, 4, 5], [2, 3, 4]]
    assert prompts.mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def _generated(student, teacher, seed=1):
    """A generated on-policy batch of the tiny models: prompts, completions, labels, mask."""
    prompts = torch.randint(1, VOCAB, (3, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0  # one left-padded prompt
    seqs = HFGenerator(student, None, 0, VOCAB).generate(prompts, mask, NEW, seed=seed)
    full = torch.ones_like(seqs)
    full[:, :PROMPT] = mask
    return seqs, completion_labels(seqs, PROMPT, None, VOCAB), full


@pytest.mark.parametrize("kind", LOGIT_LOSS_KINDS)
def test_each_loss_kind_on_generated_sequences_matches_plain_formulas(kind):
    """DistillModule's (chunked) loss on a generated batch against softmax formulas written out
    over the completion positions; and no gradient reaches a logit whose label is a prompt token."""
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48)
    seqs, labels, full = _generated(student, teacher)
    positions = (full.cumsum(1) - 1).clamp_min(0)
    term = LogitTerm(kind, temperature=2.0, beta=0.3, alpha=0.2)
    module = DistillModule(student, ObjectiveSpec(ce_weight=0.7, terms=[term]), VOCAB)
    seen = []  # the student's final hidden states in the module's forward, to read their gradient
    hook = student.model.register_forward_hook(
        lambda mod, args, out: (
            seen.append(out.last_hidden_state) or out.last_hidden_state.retain_grad()
        )
    )
    t_out = teacher_forward(
        teacher, seqs, False, torch.autocast("cpu", enabled=False), full, positions
    )
    total, parts, _ = module(seqs, t_out, labels, full, positions)
    hook.remove()

    logits = student(input_ids=seqs, attention_mask=full, position_ids=positions).logits
    t_logits = teacher(input_ids=seqs, attention_mask=full, position_ids=positions).logits.detach()
    keep = labels[:, 1:] != IGNORE_INDEX
    s, t = logits[:, :-1][keep] / 2.0, t_logits[:, :-1][keep] / 2.0
    p, q = t.softmax(-1), s.softmax(-1)
    log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)

    def kl(a, log_a, log_b):
        return (a * (log_a - log_b)).sum(-1)

    m = 0.3 * p + 0.7 * q
    want = {
        "forward_kl": kl(p, log_p, log_q),
        "reverse_kl": kl(q, log_q, log_p),
        "jsd": 0.3 * kl(p, log_p, m.log()) + 0.7 * kl(q, log_q, m.log()),
        "skew_kl": kl(p, log_p, (0.2 * p + 0.8 * q).log()),
        "skew_reverse_kl": kl(q, log_q, (0.2 * q + 0.8 * p).log()),
        "tv": 0.5 * (p - q).abs().sum(-1),
        "logit_mse": (s - t).square().mean(-1),
    }[kind].sum()
    torch.testing.assert_close(parts[kind], want.detach(), rtol=1e-4, atol=1e-5)
    # CE is logged but not trained on: the labels are the student's own samples
    torch.testing.assert_close(total, 4.0 * want, rtol=1e-4, atol=1e-5)
    total.backward()
    # logits = hidden @ head row by row: a zero gradient at a position's hidden state is a zero
    # gradient at its logits. Positions predicting a prompt token (or padding) get none.
    grad = seen[0].grad[:, :-1]
    assert torch.count_nonzero(grad[~keep]) == 0
    assert torch.count_nonzero(grad[keep]) > 0


def test_training_forward_of_a_generated_batch_sees_what_generation_saw():
    """An on-policy batch reaches the loss aligned with its generation: with left-padded prompts,
    the training forward (the batch's mask and position ids, logits at t against the label at
    t + 1) gives greedy decoding's own choices back at every completion position, and the teacher's
    scored log-likelihood is that of the completion tokens only."""
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48)
    prompts = torch.randint(1, VOCAB, (3, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    mask[1, :4] = 0  # two left-padded prompts, of different lengths
    seqs = HFGenerator(student, None, 0, VOCAB).generate(prompts, mask, NEW)
    full = torch.ones_like(seqs)
    full[:, :PROMPT] = mask
    batch = GeneratedBatch(seqs, completion_labels(seqs, PROMPT, None, VOCAB), full)
    assert batch.label_count() == 3 * NEW  # every completion token, no prompt token
    ids, _, labels, attention, positions = _inputs(batch, None)  # what train_step passes
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    keep = labels[:, 1:] != IGNORE_INDEX
    assert torch.equal(logits[:, :-1].argmax(-1)[keep], labels[:, 1:][keep])
    t_out = teacher_forward(
        teacher, seqs, False, torch.autocast("cpu", enabled=False), full, batch.position_ids
    )
    logp, count = label_logprob_sum(t_out.hidden, t_out.head_weight, batch.labels, VOCAB)
    t_logits = teacher(input_ids=seqs, attention_mask=full, position_ids=batch.position_ids).logits
    want = t_logits[:, PROMPT - 1 : -1].log_softmax(-1).gather(-1, seqs[:, PROMPT:, None]).sum()
    assert int(count) == 3 * NEW
    torch.testing.assert_close(logp.float(), want, rtol=1e-5, atol=1e-4)


def test_generation_is_determined_by_the_step_seed_and_leaves_the_global_rng():
    student = tiny_llama(0)
    gen = HFGenerator(student, None, 0, VOCAB)
    prompts = torch.randint(1, VOCAB, (4, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    before = torch.get_rng_state()
    a = gen.generate(prompts, mask, NEW, temperature=1.5, top_p=0.9, seed=sampling_seed(0, 7, 0))
    b = gen.generate(prompts, mask, NEW, temperature=1.5, top_p=0.9, seed=sampling_seed(0, 7, 0))
    c = gen.generate(prompts, mask, NEW, temperature=1.5, top_p=0.9, seed=sampling_seed(0, 7, 1))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, PROMPT + NEW) and torch.equal(a[:, :PROMPT], prompts)
    assert (
        len({sampling_seed(s, st, r) for s in range(3) for st in range(3) for r in range(3)}) == 27
    )
    greedy = gen.generate(prompts, mask, NEW)
    assert torch.equal(greedy, gen.generate(prompts, mask, NEW))
    assert student.training  # put back in training mode


def _job(tmp_path, steps: int) -> TrainJob:
    blocks = torch.randint(1, VOCAB, (24, 16), generator=torch.Generator().manual_seed(1))
    spec = OnPolicySpec(fraction=0.5, max_new_tokens=NEW, temperature=1.0)
    objective = ObjectiveSpec(ce_weight=0.5, terms=[LogitTerm("jsd")], on_policy=spec)
    module = DistillModule(tiny_llama(0), objective, VOCAB)
    train_spec = TrainSpec(max_steps=steps, batch_size=4, grad_accum=2, log_every=1, save_every=3)
    generator = HFGenerator(module.student, None, 0, VOCAB)
    return TrainJob(
        accelerator=make_accelerator(train_spec.grad_accum),
        module=module,
        teacher=tiny_llama(1, hidden=48),
        train_blocks=blocks,
        eval_blocks=blocks[:4],
        spec=train_spec,
        seed=0,
        stage_dir=tmp_path,
        tracker=Tracker(tmp_path / "metrics.jsonl"),
        fingerprint="test",
        eval_batch_size=4,
        log=lambda message: None,
        on_policy=OnPolicy(spec, BlockPrompts(blocks, PROMPT), generator, None, VOCAB),
    )


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def test_on_policy_resume_is_bitwise_and_steps_are_logged(tmp_path):
    straight = _job(tmp_path / "a", 6)
    result = train(straight)
    crashing = _job(tmp_path / "b", 6)
    steps = []

    def crash_in_step_5(model):  # after step 3's checkpoint; steps 3 and 5 are on-policy
        steps.append(1)
        if len(steps) == 5:
            raise Crash

    crashing.hooks.after_optimizer_step = crash_in_step_5
    with pytest.raises(Crash):
        train(crashing)
    resumed = _job(tmp_path / "b", 6)  # fresh weights, then the step-3 checkpoint
    again = train(resumed)
    a, b = straight.module.student.state_dict(), resumed.module.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = (
        _rows(tmp_path / "a" / "metrics.jsonl"),
        _rows(tmp_path / "b" / "metrics.jsonl"),
    )
    by_step = {r["step"]: r for r in rows_a}
    for r in rows_b:  # every logged step, generation included, is what the straight run logged
        assert r["loss"] == by_step[r["step"]]["loss"]
        assert r.get("teacher_logp") == by_step[r["step"]].get("teacher_logp")
    on = [r for r in rows_a if "teacher_logp" in r]
    assert [r["step"] for r in on] == [2, 4, 6]  # steps 1, 3, 5 (0-based) are on-policy
    assert all(r["gen_tokens"] == 8 * NEW and r["mean_completion_len"] == NEW for r in on)
    assert all(r["gen_s"] > 0 and r["train_s"] > 0 and r["teacher_logp"] < 0 for r in on)
    assert rows_a[-1]["on_policy_fraction"] == 0.5
    assert [r["on_policy_step"] for r in rows_a] == [0, 1, 0, 1, 0, 1]
    assert result.on_policy["on_policy_steps"] == 3
    assert result.on_policy["generated_tokens"] == again.on_policy["generated_tokens"] == 24 * NEW


class _Tok:
    pad_token_id, eos_token_id = 0, 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + len(t) % 7, 2] for t in texts]}


def test_empty_prompt_sets_are_refused(tmp_path):
    from distill.config import DataSpec

    data = DataSpec(stdlib=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(RecipeError, match="data.prompts.files.*no non-empty text"):
        build_prompt_sets(PromptsSpec(files=[str(empty)]), data, None, _Tok())
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "def f():"}) + "\n")
    with pytest.raises(RecipeError, match="prompt set is empty"):
        build_prompt_sets(PromptsSpec(files=[str(one)], eval_fraction=0.01), data, None, _Tok())
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(60)))
    sets = build_prompt_sets(PromptsSpec(files=[str(many)], prompt_tokens=3), data, None, _Tok())
    assert isinstance(sets.train, TokenPrompts) and len(sets.train) + len(sets.heldout) == 60
    assert sets.train.ids.shape[1] == 3 and sets.train.mask[:, 0].sum() == 0  # left-padded


def test_recipe_errors_lambda_and_teacher_cache(tmp_path):
    path = tiny_recipe(tmp_path / "r.yaml")
    stage = "stages.1.objective.on_policy"
    with pytest.raises(RecipeError, match="fraction"):
        load_recipe(path, [f"{stage}.fraction=1.5"])
    with pytest.raises(RecipeError, match="max_new_tokens"):
        load_recipe(path, [f"{stage}.max_new_tokens=0"])
    from distill.run.on_policy_stage import build_on_policy

    raw = yaml.safe_load(path.read_text())
    raw["stages"].insert(1, {"name": "cache", "kind": "cache-teacher", "model": "teacher"})
    raw["stages"][2]["teacher"] = {"cache": "cache"}
    raw["stages"][2]["objective"] = {"terms": [{"kind": "reverse_kl"}], "on_policy": {}}
    recipe_ = load_recipe(None, raw=raw)
    with pytest.raises(RecipeError, match="needs the live teacher|offline teacher cache"):
        build_on_policy(None, recipe_.stages[2], None, None)


def test_prompts_longer_than_the_context_exit_2(tmp_path, assets):  # noqa: F811
    on_policy = {"objective": {"terms": [{"kind": "reverse_kl"}], "on_policy": {}}}
    path = recipe(tmp_path, assets, stage_changes=on_policy)
    err = fails(
        tmp_path, "run", path, "data.prompts.prompt_tokens=16", f"{_STAGE}.max_new_tokens=20"
    )
    assert "plus max_new_tokens=20 make 36 tokens, longer than data.seq_len=32" in err


def test_teacher_with_another_tokenizer_cannot_score(tmp_path, assets):  # noqa: F811
    import shutil

    from distill.config import TokenizerTrainSpec
    from distill.data.tokenizer import train_tokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(assets / "teacher", other)
    train_tokenizer(
        ["some other text entirely " * 40] * 20, TokenizerTrainSpec(vocab_size=290, min_frequency=1)
    ).save_pretrained(other)
    on_policy = {"objective": {"terms": [{"kind": "jsd"}], "on_policy": {"max_new_tokens": 8}}}
    path = recipe(tmp_path, assets, stage_changes=on_policy)
    err = fails(
        tmp_path, "run", path, f"models.teacher.path={other}", "data.prompts.prompt_tokens=8"
    )
    assert "tokenizer mismatch" in err


_STAGE = "stages.0.objective.on_policy"


def test_bench_splits_an_on_policy_step_into_generation_and_the_rest(tmp_path):
    from distill.bench.run import format_table, run_bench

    stages = [
        {"name": "teacher", "kind": "train", "model": "teacher"},
        {
            "name": "onpol",
            "kind": "distill",
            "model": "student",
            "teacher": "teacher",
            "objective": {"terms": [{"kind": "jsd"}], "on_policy": {"max_new_tokens": 8}},
        },
    ]
    path = tiny_recipe(tmp_path / "r.yaml", stages)
    bench_recipe = load_recipe(path, ["data.prompts.prompt_tokens=8", "train.batch_size=2"])
    device = torch.device("cpu")
    result = run_bench(bench_recipe, "onpol", ("chunked",), 1, 0, device, log=lambda m: None)
    split = result["on_policy"]
    assert split["generation_ms"] > 0 and split["scoring_and_training_ms"] > 0
    assert split["generated_tokens_per_step"] == 2 * 8  # batch 2; the bench tokenizer has no EOS
    assert 0 < split["generation_share_of_stage"] < split["generation_share_of_on_policy_step"] < 1
    assert "generation is" in format_table(result)
