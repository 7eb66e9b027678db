"""Bad input, class by class, as a new user meets it: every command answers with one message
naming the field or file, the value and the fix, and exit status 2 - never a traceback, never
silence. (Config values, overrides and layouts have their own tests in test_config.py,
test_layout.py and test_dry_run.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_tools.cli import data_info_main, preprocess_main
from data_tools.tokenizer import load_tokenizer
from moue.checkpoint import step_checkpoints
from moue.cli import pretrain
from moue.config import load_config
from moue.training.checkpoint import prune, set_aside_newer
from parallel.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = "examples/configs/tiny_cpu.yaml"


def _fails(capsys, main, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# --- config files and values ---------------------------------------------------------------

def test_config_file_errors(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  num_layers: 4\n moe: [\n")
    _fails(capsys, pretrain, ["--config", str(broken), "--dry-run"], "broken.yaml: not valid YAML",
           "line 3")
    _fails(capsys, pretrain, ["--config", str(tmp_path / "nope.yaml"), "--dry-run"],
           "nope.yaml: cannot read it")
    _fails(capsys, pretrain, ["--config", TINY, "train.lr=[1,", "--dry-run"],
           "override 'train.lr=[1,': not valid YAML")


@pytest.mark.parametrize("override,message", [
    ('data.mock="false"', "data.mock='false': must be true or false or null (write true or"),
    ("train.lr=[0.1, 0.2]", "train.lr=[0.1, 0.2]: must be a number"),
    ("model.num_layers=4.5", "model.num_layers=4.5: must be an integer"),
    ("moe.topology=3", "moe.topology=3: must be a string"),
    ("train.min_lr=0.01", "train.min_lr=0.01: must be between 0 and train.lr=0.003"),
    ("train.eval_iters=0", "train.eval_iters=0: must be at least 1 batch"),
    ("train.lr=0", "train.lr=0.0: must be a positive learning rate"),
    ("train.adam_beta2=1.5", "train.adam_beta2=1.5: must be in [0, 1)"),
    ("data.split=98,2", "data.split='98,2': must be three non-negative weights"),
    ("data.split=100,0,0", "data.split='100,0,0': leaves no validation split, which "
     "train.eval_interval=100 evaluates on: give it a share (e.g. 98,2,0) or set "
     "train.eval_interval=0"),
    ("data.blend=[data/a, 0.5]", "data.blend=['data/a', 0.5]: must alternate positive weights"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0: must be a positive integer"),
    ("checkpoint.init_optimizer=true", "checkpoint.init_optimizer=True: takes the optimizer "
     "state of checkpoint.init: set checkpoint.init too"),
    ("logging.ep_balance_ranks=3", "logging.ep_balance_ranks=3: must divide moe.num_experts=16"),
])
def test_config_values_are_checked_against_their_declared_type_and_range(override, message):
    with pytest.raises(UserError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)


def test_whole_numbers_in_exponent_notation_are_integers_and_world_sizes_are_positive(capsys):
    assert load_config(TINY, ["model.vocab_size=1e3"]).model.vocab_size == 1000
    with pytest.raises(SystemExit) as code:
        pretrain(["--config", TINY, "--dry-run", "--world-size", "0"])
    assert code.value.code == 2
    assert "--world-size: '0': give a number of processes" in capsys.readouterr().err


def test_a_blend_of_one_prefix_needs_no_weight():
    assert load_config(TINY, ["data.blend=[data/a]"]).data.blend == ["data/a"]


def test_eval_iters_zero_is_fine_when_evaluation_is_off():
    assert load_config(TINY, ["train.eval_iters=0", "train.eval_interval=0"]).train.eval_iters == 0


# --- datasets ----------------------------------------------------------------------------------

@pytest.fixture
def dataset(tmp_path):
    from data_tools.preprocess import preprocess

    (tmp_path / "in.txt").write_text("hello world, " * 200)
    preprocess([str(tmp_path / "in.txt")], str(tmp_path / "data"), "byte", progress=False)
    return tmp_path / "data"


def test_damaged_datasets_are_refused_by_data_info_and_training(dataset, capsys):
    from data_tools.megatron_data import check_dataset_tokenizer

    _fails(capsys, data_info_main, [f"{dataset}.bin"], f"prefix={dataset}.bin: give the dataset "
           f"prefix, without .bin (prefix={dataset})")
    _fails(capsys, data_info_main, [str(dataset.parent / "nothing")], "no dataset there")
    bin_ = Path(f"{dataset}.bin")
    bin_.write_bytes(bin_.read_bytes()[:100])  # truncated
    _fails(capsys, data_info_main, [str(dataset)], "data.bin: truncated (100 bytes",
           "run moue-preprocess again")
    with pytest.raises(UserError, match="truncated"):
        check_dataset_tokenizer(str(dataset), load_tokenizer("byte"))
    Path(f"{dataset}.idx").write_bytes(b"garbage, not an index" * 4)
    _fails(capsys, data_info_main, [str(dataset)], "data.idx: not a readable Megatron index")


def test_tokens_beyond_the_vocabulary_without_a_meta_file_are_refused(dataset):
    from data_tools.megatron_data import check_dataset_tokenizer

    Path(f"{dataset}.meta.json").unlink()  # a dataset made by another tool
    check_dataset_tokenizer(str(dataset), load_tokenizer("byte"), vocab_size=256)  # bytes < 256
    with pytest.raises(UserError, match=r"holds token id 119, beyond model.vocab_size=100"):
        check_dataset_tokenizer(str(dataset), load_tokenizer("byte"), vocab_size=100)


def test_damaged_meta_file_is_named(dataset, capsys):
    from data_tools.megatron_data import check_dataset_tokenizer

    Path(f"{dataset}.meta.json").write_text("{not json")
    with pytest.raises(UserError, match=r"data.meta.json: damaged"):
        check_dataset_tokenizer(str(dataset), load_tokenizer("byte"))
    _fails(capsys, data_info_main, [str(dataset)], "data.meta.json: damaged (JSONDecodeError)")


def test_garbage_tokenizer_files_are_named(tmp_path):
    for name in ("tok.json", "tok.model"):
        (tmp_path / name).write_bytes(b"\x00garbage")
        with pytest.raises(UserError, match=rf"tokenizer '.*{name}': cannot read it"):
            load_tokenizer(str(tmp_path / name))


def test_bad_records_name_file_and_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    _fails(capsys, preprocess_main, ["--input", str(tmp_path / "bad.jsonl"), "--output-prefix",
                                     str(tmp_path / "out"), "--quiet"],
           "bad.jsonl:2: malformed JSON", "--skip-bad")
    assert not list(tmp_path.glob("out*"))  # nothing half-written


def test_unwritable_outputs_are_named(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("hello")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _fails(capsys, preprocess_main, ["--input", str(tmp_path / "in.txt"), "--output-prefix",
                                     str(blocker / "data"), "--quiet"],
           "--output-prefix: cannot write into", "choose a writable location")


# --- checkpoints -------------------------------------------------------------------------------

def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / "trainer.pt").write_bytes(b"x")
    return path


def test_pruning_never_deletes_what_latest_names_after_an_interrupted_publish(tmp_path):
    """Killed between renaming step_8 and updating latest (still step_6), the run resumes from
    step_6, then saves step_7 (a SIGTERM save) with keep_last=1: step_7 must survive."""
    for step in (4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("step_0000006\n")
    moved = set_aside_newer(tmp_path, tmp_path / "step_0000006")  # what resuming does
    assert [p.name for p in moved] == ["step_0000008.abandoned"]
    _fake_checkpoint(tmp_path, 7)
    (tmp_path / "latest").write_text("step_0000007\n")
    prune(tmp_path, 7, keep_last=1)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_0000007"]
    assert (tmp_path / "step_0000008.abandoned" / "trainer.pt").exists()  # kept, not resumed
    _fake_checkpoint(tmp_path, 8)  # the run saves step 8 itself later
    assert set_aside_newer(tmp_path, tmp_path / "step_0000007")[0].name == "step_0000008.abandoned.2"


def test_pruning_keeps_the_newest_up_to_the_saved_step(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    assert [p.name for p in prune(tmp_path, 8, keep_last=2)] == ["step_0000002", "step_0000004"]
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_0000006", "step_0000008"]


PRETRAIN = ["--config", TINY, "parallel.ep=1", "train.warmup_steps=1", "train.eval_interval=0",
            "model.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2"]


def _pretrain(capsys, tmp_path, *extra, process: bool = False):
    """moue-pretrain on one process: its ``main`` in this process (a process start and Megatron's
    import saved, about 7 s each), or with ``process`` a real one; returns the exit status and
    stderr."""
    argv = [*PRETRAIN, f"logging.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}",
            *extra]
    if not process:
        capsys.readouterr()
        code = pretrain(argv)
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "moue.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _checkpoint_init_is_checked_before_any_build(capsys, tmp_path, trained):
    """checkpoint.init naming no checkpoint, one of another model, or (with init_optimizer) a
    model-only one: named with the fix, exit status 2, nothing saved; a good one starts the run
    at step 0 and says where the data of the run behind it stopped."""
    fresh = tmp_path / "fresh"
    missing = _pretrain(capsys, tmp_path, f"checkpoint.dir={fresh}",
                        f"checkpoint.init={tmp_path / 'nope'}")
    assert missing.returncode == 2
    assert f"checkpoint.init={tmp_path / 'nope'}: not a checkpoint" in missing.stderr
    other = _pretrain(capsys, tmp_path, f"checkpoint.dir={fresh}", f"checkpoint.init={trained}",
                      "moe.window=4")
    assert other.returncode == 2 and "moe.window: checkpoint 8, now 4" in other.stderr
    assert "or another checkpoint.init" in other.stderr
    model_only = tmp_path / "model_only" / "step_0000000"
    model_only.mkdir(parents=True)
    torch.save({"config": {}, "model_only": True}, model_only / "trainer.pt")
    adam = _pretrain(capsys, tmp_path, f"checkpoint.dir={fresh}",
                     f"checkpoint.init={model_only}", "checkpoint.init_optimizer=true")
    assert adam.returncode == 2 and "is a model-only checkpoint" in adam.stderr
    assert "set checkpoint.init_optimizer=false" in adam.stderr
    assert not list(fresh.glob("step_*")) and "Traceback" not in adam.stderr + other.stderr
    good = _pretrain(capsys, tmp_path, f"checkpoint.dir={fresh}", f"checkpoint.init={trained}",
                     "checkpoint.init_optimizer=true", "train.steps=2",
                     f"logging.dir={tmp_path / 'fresh_run'}")
    assert good.returncode == 0, good.stderr[-2000:]
    assert "starting at step 0 from the weights and optimizer state of" in good.stderr
    assert "data.start_sample=" in good.stderr  # the run behind it read 3 steps' samples
    assert [p.name for p in fresh.glob("step_*")] == ["step_0000002"]


def test_checkpoints_resume_with_new_training_knobs_and_damaged_ones_are_named(tmp_path, capsys):
    first = _pretrain(capsys, tmp_path, "train.steps=2", "checkpoint.interval=1")
    assert first.returncode == 0, first.stderr[-2000:]
    # Training knobs may change on resume; the architecture may not.
    knobs = _pretrain(capsys, tmp_path, "train.steps=3", "moe.balance_coeff=0.02",
                      "moe.dispatcher=allgather", "train.lr=0.002", "train.min_lr=0.0002",
                      "model.seq_length=16")  # RoPE: the context length may change too
    assert knobs.returncode == 0, knobs.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The schedule's shape is the resumed run's: step 3 of 3 ends at its min_lr, not the old one.
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["lr"] == pytest.approx(2e-4)
    _checkpoint_init_is_checked_before_any_build(capsys, tmp_path, tmp_path / "ckpt")
    other = _pretrain(capsys, tmp_path, "train.steps=4", "moe.window=4")
    assert other.returncode == 2 and "is of another model" in other.stderr
    assert "moe.window: checkpoint 8, now 4" in other.stderr
    (tmp_path / "ckpt" / "step_0000003" / "trainer.pt").write_bytes(b"garbage")
    damaged = _pretrain(capsys, tmp_path, "train.steps=4", process=True)
    assert damaged.returncode == 2, damaged.stderr[-2000:]
    assert "step_0000003: cannot load trainer.pt" in damaged.stderr
    assert "point " in damaged.stderr and "step_0000002" in damaged.stderr
    assert "Traceback" not in damaged.stderr
    (tmp_path / "ckpt" / "latest").write_text("step_0000002\n")  # as the message suggests
    for shard in (tmp_path / "ckpt" / "step_0000002").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:64])  # truncated shards
    shards = _pretrain(capsys, tmp_path, "train.steps=4")
    assert shards.returncode == 2, shards.stderr[-2000:]
    assert "step_0000002: cannot load the model and optimizer shards" in shards.stderr
    # Pointing latest back (a roll-back) set the newer step_3 aside, kept and never resumed.
    assert (tmp_path / "ckpt" / "step_0000003.abandoned" / "trainer.pt").exists()
    assert "Traceback" not in shards.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    as_file = _pretrain(capsys, tmp_path, "train.steps=2", f"checkpoint.dir={blocker}")
    assert as_file.returncode == 2 and f"checkpoint.dir={blocker}: is a file" in as_file.stderr
    no_log = _pretrain(capsys, tmp_path, "train.steps=2", f"logging.dir={blocker / 'run'}")
    assert no_log.returncode == 2 and "logging.dir=" in no_log.stderr
    assert "cannot write there" in no_log.stderr
