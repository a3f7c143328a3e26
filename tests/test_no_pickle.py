"""Nothing distill loads can run code: a pickle payload planted in each kind of file it reads (a
checkpoint's weights, optimizer and RNG states, DeepSpeed's model and ZeRO optimizer states, a
`path:` model's `.bin` weights, the teacher cache's index) is refused with exit 2 and a message
naming the file, and the payload never runs.

Each payload is planted as an attacker with write access to the folder would: into a real file
that keeps everything it held, with the checkpoint's MANIFEST.json recomputed to match."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.errors import EXIT_BAD_INPUT, UnsafeFileError
from distill.runtime.checkpoint import write_manifest

from conftest import ROOT, run_cli, tiny_recipe

# killed after the checkpoint of step 2, so running the same command again resumes from it
STAGES = [{"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 4}}]
KILLED = {"DISTILL_FAULT": "kill_at_micro=3.0"}
CHECKPOINT = Path("teacher/checkpoints/step_00000002")


class Payload:
    """Unpickling this writes `marker`: any code could run in its place."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def plant(file: Path, marker: Path) -> None:
    """Add a payload to a torch file, keeping all it held, and recompute its checkpoint's
    manifest (a checksum anyone can recompute)."""
    content = torch.load(file, weights_only=False)  # the test's own file, just written
    content["payload"] = Payload(marker)
    torch.save(content, file)
    write_manifest(next(p for p in file.parents if p.name.startswith("step_")))


def assert_refused(stderr: str, file: Path, marker: Path) -> None:
    assert not marker.exists(), "the planted payload ran"
    assert f"{file} holds more than tensors" in stderr, stderr[-3000:]
    assert "distill refuses to load it" in stderr


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("no_pickle") / "recipe.yaml"
    train = {"batch_size": 4, "lr": 3e-3, "log_every": 1, "save_every": 2, "precision": "fp32"}
    return tiny_recipe(path, STAGES, train=train)


def killed_copy(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


@pytest.fixture(scope="module")
def one_process_run(recipe):
    out = recipe.parent / "one_process"
    proc = run_cli("run", recipe, f"output_dir={out}", env=KILLED, check=False)
    assert (out / CHECKPOINT / "MANIFEST.json").is_file(), proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", ["pytorch_model.bin", "optimizer.bin", "random_states_0.pkl"])
def test_a_payload_in_a_checkpoint_is_refused(recipe, one_process_run, tmp_path, capsys, name):
    from distill.cli import main

    out = killed_copy(one_process_run, tmp_path)
    file, marker = out / CHECKPOINT / name, tmp_path / "ran"
    plant(file, marker)
    assert main(["run", str(recipe), f"output_dir={out}"]) == EXIT_BAD_INPUT
    assert_refused(capsys.readouterr().err, file, marker)


def launch_zero2(recipe, out: Path, env=None):
    """One process under `accelerate launch` with DeepSpeed ZeRO-2 on the CPU."""
    from test_distributed import launch

    config = ROOT / "launch" / "cpu_zero2.yaml"
    return launch(config, recipe, f"output_dir={out}", env=env, check=False, num_processes=1)


@pytest.fixture(scope="module")
def deepspeed_run(recipe):
    out = recipe.parent / "deepspeed"
    proc = launch_zero2(recipe, out, env=KILLED)
    assert (out / CHECKPOINT / "MANIFEST.json").is_file(), proc.stderr[-3000:]
    return out


@pytest.mark.distributed
def test_a_payload_in_a_deepspeed_checkpoint_is_refused(recipe, deepspeed_run, tmp_path):
    """DeepSpeed itself loads its states with `weights_only=False`."""
    out = killed_copy(deepspeed_run, tmp_path)
    file, marker = out / CHECKPOINT / "pytorch_model/mp_rank_00_model_states.pt", tmp_path / "ran"
    plant(file, marker)
    proc = launch_zero2(recipe, out)
    assert_refused(proc.stderr, file, marker)
    assert "exitcode: 2" in proc.stderr, proc.stderr[-3000:]  # the launcher itself exits 1


@pytest.mark.distributed
def test_a_payload_in_zero_optimizer_states_is_refused(deepspeed_run, tmp_path):
    """The optimizer states go through the same DeepSpeed checkpoint engine as the model states
    (tested through a launch above); here the engine's load itself, without a second launch."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from distill.safe_load import load_tensors, weights_only

    clean = deepspeed_run / CHECKPOINT / "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with weights_only(clean, "FIX"):  # nested as in a resume, which reads the RNG state first
        load_tensors(deepspeed_run / CHECKPOINT / "random_states_0.pkl", "FIX")
        # still allowed after the nested load: the classes DeepSpeed's own states hold
        content = TorchCheckpointEngine().load(str(clean), map_location="cpu")
    file, marker = tmp_path / clean.name, tmp_path / "ran"
    torch.save({**content, "payload": Payload(marker)}, file)
    with pytest.raises(UnsafeFileError) as refused, weights_only(file, "FIX"):
        TorchCheckpointEngine().load(str(file), map_location="cpu")
    assert_refused(str(refused.value), file, marker)


def test_a_payload_in_a_models_bin_weights_is_refused(tmp_path, capsys):
    """`distill prune` loads a model directory the way a `path:` model loads (load_pretrained)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from distill.cli import main

    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=64,
    )
    model_dir, marker = tmp_path / "model", tmp_path / "ran"
    config.save_pretrained(model_dir)
    weights = AutoModelForCausalLM.from_config(config).state_dict()
    torch.save({**weights, "payload": Payload(marker)}, model_dir / "pytorch_model.bin")
    args = ["prune", str(model_dir), "--out", str(tmp_path / "out"), "--method", "magnitude"]
    assert main([*args, "--heads-fraction", "0.5"]) == EXIT_BAD_INPUT
    assert_refused(capsys.readouterr().err, model_dir / "pytorch_model.bin", marker)


def test_a_payload_in_the_teacher_cache_is_refused(tmp_path):
    """The shards are raw records read through np.memmap; the block index is the one file numpy
    could unpickle."""
    from distill.teacher_cache.encoding import record_dtype
    from distill.teacher_cache.store import BLOCKS, finished_shard, open_cache, write_shard
    from distill.teacher_cache.store import write_manifest as write_cache_manifest

    identity = {"tokenizer": "t", "data": "d", "seq_len": 5, "vocab_size": 50, "k": 2}
    identity |= {"hidden_layers": [], "num_train_blocks": 4, "shard_blocks": 4}
    root, marker = tmp_path / "cache", tmp_path / "ran"
    root.mkdir()
    write_shard(root, 0, 0, np.zeros((4, 4), dtype=record_dtype(2, 50)), None)
    write_cache_manifest(root, identity, np.arange(4), [finished_shard(root, 0)])
    assert open_cache(root, identity, "test").manifest["rows"] == 4

    blocks = np.array([0, 1, 2, Payload(marker)], dtype=object)
    np.save(root / BLOCKS, blocks, allow_pickle=True)
    with pytest.raises(UnsafeFileError) as refused:
        open_cache(root, identity, "test")
    assert refused.value.exit_code == EXIT_BAD_INPUT
    assert_refused(str(refused.value), root / BLOCKS, marker)


def test_a_payload_in_an_eval_set_is_refused(tmp_path):
    """Eval sets (`eval/<name>-<fingerprint>.pt`, a tensor of token ids) load through
    load_tensors, the helper the resume's RNG check uses too."""
    from distill.safe_load import load_tensors

    file, marker = tmp_path / "code-0123.pt", tmp_path / "ran"
    torch.save(torch.arange(6).view(2, 3), file)
    assert load_tensors(file, "FIX").tolist() == [[0, 1, 2], [3, 4, 5]]
    torch.save({"blocks": torch.arange(6), "payload": Payload(marker)}, file)
    with pytest.raises(UnsafeFileError) as refused:
        load_tensors(file, "FIX")
    assert_refused(str(refused.value), file, marker)
