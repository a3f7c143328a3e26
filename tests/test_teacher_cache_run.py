"""The offline teacher through the real CLI: a `cache-teacher` stage writes the cache, `distill` and
`qat` stages train from it without loading the teacher, a killed write or training resumes exactly,
two processes write and read their own rows, and every mismatch or corruption is a clear error
(exit 2, no traceback)."""

import json
import shutil

import pytest
import yaml

from conftest import cli_here, losses_by_step, run_cli, same_weights, tiny_recipe

CACHE = {"k": 16, "tail_samples": 4, "hidden_layers": [1], "shard_blocks": 16, "blocks": 48}
STAGES = [
    {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 4}},
    {"name": "tcache", "kind": "cache-teacher", "model": "teacher", "cache": CACHE},
    {
        "name": "offline",
        "kind": "distill",
        "model": "student",
        "teacher": {"cache": "tcache"},
        "objective": {
            "ce_weight": 0.2,
            "terms": [{"kind": "forward_kl", "weight": 0.5}, {"kind": "jsd", "weight": 0.3}],
            "hidden": {"kind": "mse", "layer_map": [[1, 1]]},
        },
        "train": {"max_steps": 6, "grad_accum": 2, "save_every": 2},
    },
    {
        "name": "qat",
        "kind": "qat",
        "model": "offline",
        "teacher": {"cache": "tcache"},
        "quant": {"bits": 4, "group_size": 32},
        "train": {"max_steps": 2},
    },
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    cli_here("run", tiny_recipe(base / "recipe.yaml", STAGES))
    return base


def copy_upto_teacher(reference, tmp_path, stages=STAGES):
    """A run dir with the finished teacher (and tokenizer and data) of the reference run."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    for part in ("tokenizer", "data", "teacher"):
        shutil.copytree(reference / "run" / part, run / part)
    return run, tiny_recipe(tmp_path / "recipe.yaml", stages)


def test_cache_stage_summary_and_students_trained_from_it(reference):
    summary = {
        e["name"]: e for e in json.loads((reference / "run" / "summary.json").read_text())["stages"]
    }
    cache = summary["tcache"]
    assert cache["kind"] == "cache-teacher" and cache["k"] == 16 and cache["tail_samples"] == 4
    for key in ("bytes_per_token", "tokens", "wall_s", "tokens_per_s"):
        assert cache[key] > 0
    # 16 uint16 ids + 16 codes + 4 bytes + 4 uint16 tail samples + their entropy (float16), plus
    # one bf16 layer of 64 over 32 / 31 positions
    assert cache["bytes_per_token"] == pytest.approx(52 + 10 + 64 * 2 * 32 / 31)
    assert (
        summary["offline"]["teacher_cache"] == "tcache"
        and "teacher_agreement" not in summary["offline"]
    )
    assert summary["qat"]["teacher_cache"] == "tcache"
    rows = [
        json.loads(line)
        for line in (reference / "run/offline/metrics.jsonl").read_text().splitlines()
    ]
    assert {"loss_forward_kl", "loss_jsd", "loss_hidden"} <= set(rows[0])
    report = (reference / "run" / "report.md").read_text()
    assert "teacher tokens computed once" in report and "reused by 2 stages" in report


def test_killed_training_from_a_cache_resumes_bitwise(reference, tmp_path):
    run, recipe = copy_upto_teacher(reference, tmp_path)
    shutil.copytree(reference / "run" / "tcache", run / "tcache")
    killed = run_cli("run", recipe, env={"DISTILL_FAULT": "kill_at_micro=3.1"}, check=False)
    assert killed.returncode < 0
    assert "resumed from" in cli_here("run", recipe).stderr
    a, b = reference / "run" / "offline", run / "offline"
    assert losses_by_step(b / "metrics.jsonl") == losses_by_step(a / "metrics.jsonl")
    assert same_weights(a / "model", b / "model")


def test_interrupted_cache_write_resumes_at_the_last_whole_shard(reference, tmp_path):
    stages = STAGES[:2]
    run, recipe = copy_upto_teacher(reference, tmp_path, stages)
    killed = run_cli("run", recipe, env={"DISTILL_FAULT": "kill_after_cache_shard=1"}, check=False)
    assert killed.returncode < 0
    cache = run / "tcache" / "cache"
    assert not (cache / "MANIFEST.json").exists()
    assert sorted(p.name for p in cache.glob("shard-*.json")) == [
        "shard-00000.json",
        "shard-00001.json",
    ]
    resumed = cli_here("cache-teacher", recipe)
    assert "resuming after 2 whole shards" in resumed.stderr
    manifest = json.loads((cache / "MANIFEST.json").read_text())
    expected = json.loads((reference / "run/tcache/cache/MANIFEST.json").read_text())
    assert manifest["shards"] == expected["shards"]  # every file's sha256 equal


def _expect_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-3000:]


def _reader(cache_path, **objective):
    return [
        {
            "name": "reader",
            "kind": "distill",
            "model": "student",
            "teacher": {"cache": str(cache_path)},
            "train": {"max_steps": 2},
            **({"objective": objective} if objective else {}),
        }
    ]


def _recipe_in(folder, stages):
    folder.mkdir(parents=True, exist_ok=True)
    return tiny_recipe(folder / "recipe.yaml", stages)


def test_mismatches_and_corruption_are_clear_errors(reference, tmp_path):
    cache = reference / "run" / "tcache" / "cache"
    recipe = _recipe_in(tmp_path / "a", _reader(cache))
    shutil.copytree(reference / "run" / "tokenizer", tmp_path / "a" / "run" / "tokenizer")
    shutil.copytree(reference / "run" / "data", tmp_path / "a" / "run" / "data")
    _expect_error(
        cli_here("run", recipe, "data.seq_len=16", check=False), "seq_len: cache 32", "16"
    )
    _expect_error(
        cli_here("run", recipe, "tokenizer.train.vocab_size=300", check=False),
        "tokenizer: cache",
        "vocab_size: cache 320, stage 'reader' 300",
    )
    _expect_error(
        cli_here("run", recipe, "stages.reader.train.max_steps=20", check=False),
        "visit",
        "raise the cache stage's `cache.blocks`",
    )
    logit_mse = _recipe_in(tmp_path / "b", _reader(cache, terms=[{"kind": "logit_mse"}]))
    _expect_error(
        cli_here("run", logit_mse, check=False), "logit_mse needs the teacher's full logits"
    )
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    shard = broken / "shard-00001.topk"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    corrupt = _recipe_in(tmp_path / "c", _reader(broken))
    _expect_error(cli_here("run", corrupt, check=False), f"shard {shard} is corrupt")
    _expect_error(
        cli_here("run", _recipe_in(tmp_path / "d", _reader(tmp_path)), check=False),
        "is not a finished teacher cache",
    )


@pytest.mark.distributed
def test_two_processes_write_and_read_their_own_rows(reference, tmp_path):
    """Two DDP processes write half the shards each (the same bytes as one process) and each
    trains on its own rows of the cache: the losses equal one process with grad_accum 2."""
    from test_distributed import launch

    stages = [*STAGES[:2], {**STAGES[2], "train": {"max_steps": 6, "save_every": 2}}]
    run, recipe = copy_upto_teacher(reference, tmp_path, stages)
    launch("launch/cpu_ddp.yaml", recipe)
    manifest = json.loads((run / "tcache/cache/MANIFEST.json").read_text())
    expected = json.loads((reference / "run/tcache/cache/MANIFEST.json").read_text())
    assert manifest["shards"] == expected["shards"]
    one, two = (
        losses_by_step(reference / "run/offline/metrics.jsonl"),
        losses_by_step(run / "offline" / "metrics.jsonl"),
    )
    assert sorted(one) == sorted(two)
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5


def test_recipe_validation_of_cache_references(tmp_path):
    bad = [*STAGES[:1], {**STAGES[2], "teacher": {"cache": "teacher"}}]
    proc = cli_here("check", tiny_recipe(tmp_path / "r.yaml", bad), check=False)
    _expect_error(proc, "'teacher' is a `train` stage, not a `cache-teacher` stage")
    both = [*STAGES[:2], {**STAGES[2], "teacher": {"cache": "tcache", "model": "teacher"}}]
    proc = cli_here("check", tiny_recipe(tmp_path / "s.yaml", both), check=False)
    _expect_error(proc, "give exactly one of `model`")
    raw = yaml.safe_load(tiny_recipe(tmp_path / "t.yaml", STAGES[:2]).read_text())
    assert raw["stages"][1]["kind"] == "cache-teacher"


def test_bench_measures_cache_online_and_ce_only_in_one_run(reference, tmp_path):
    out = tmp_path / "bench.json"
    recipe = reference / "recipe.yaml"
    proc = cli_here("bench", recipe, "--stage", "offline", "--steps", "1", "--warmup", "0",
                   "--json", out)  # fmt: skip
    assert "cache tokens/s:" in proc.stdout
    result = json.loads(out.read_text())
    assert list(result["paths"]) == ["cache", "online", "ce_only"]
    for path in result["paths"].values():
        assert path["tokens_per_s"] > 0
    assert set(result["ratios_cache"]) == {"to_online", "to_ce_only"}
    assert result["shapes"]["teacher"] is not None  # the online path's teacher
