"""Elastic training's commands as a user runs them: a checkpoint trained with elastic on under
EP=2, its family table from moue-eval on one process and under PP=2, a moue-export of one
sub-model that evaluates to the same loss, is smaller on disk and trains on under PP=2; and the
bad inputs of both commands."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core import dist_checkpointing

from moue.config import load_config
from moue.model.size import param_counts
from tests.commands import ran, refused
from tests.distributed import max_rel

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "moue.cli"]
SMALL = "layers=2,experts=8,topk=1"


def _run(cmd, expect=0):
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _cli(command, *args, expect=0):
    return _run([sys.executable, "-m", "moue.cli", command, *args], expect)


def _rows(path) -> dict:
    return {r["submodel"]: r for r in json.loads(Path(path).read_text())["rows"]}


TRAINED = ["train.steps=6", "train.warmup_steps=1", "train.eval_interval=6", "train.eval_iters=2",
           "elastic.enabled=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("elastic")
    _run([*TORCHRUN, "--config", "examples/configs/tiny_cpu.yaml", *TRAINED,
          "model.seq_length=64", f"logging.dir={base / 'run'}",
          f"checkpoint.dir={base / 'ckpt'}"])
    return base


@pytest.fixture(scope="module")
def family(trained):
    _cli("eval", "--load", str(trained / "ckpt"), "--family", "--submodel", SMALL,
         "--json", str(trained / "family.json"))
    return _rows(trained / "family.json")


def test_family_table_covers_every_combination_with_its_sizes(trained, family):
    assert list(family)[:2] == ["layers=4,experts=16,topk=2", "layers=4,experts=16,topk=1"]
    assert len(family) == 2 * 2 * 2 + 1  # layers {4,3} x experts {16,8} x k {2,1}, and SMALL
    cfg = load_config("examples/configs/tiny_cpu.yaml", ["model.seq_length=64"])
    assert family["layers=4,experts=16,topk=2"]["params_total"] == sum(
        param_counts(cfg.model, cfg.moe, cfg.topology()).values())
    small = family[SMALL]
    assert small["params_total"] < family["layers=3,experts=8,topk=1"]["params_total"]
    assert small["params_active"] < small["params_total"]
    # the full model's loss is the last validation loss of training (saved under EP=2)
    rows = [json.loads(x) for x in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
    full = family["layers=4,experts=16,topk=2"]
    assert abs(full["loss"] - rows[-1]["val_loss"]) / rows[-1]["val_loss"] < 1e-5
    assert all(abs(r["ppl"] - 2.718281828 ** r["loss"]) < 1e-6 * r["ppl"] for r in family.values())


def test_family_losses_are_the_same_under_pp2(trained, family):
    out = trained / "family_pp2.json"
    proc = _run([*TORCHRUN, "eval", "--load", str(trained / "ckpt"), "--family", "--submodel", SMALL,
                 "parallel.pp=2", "--json", str(out)])
    assert proc.stdout.count("| layers=") == len(family)  # one table, from rank 0
    pp2 = _rows(out)
    assert list(pp2) == list(family)
    assert max_rel([r["loss"] for r in pp2.values()], [r["loss"] for r in family.values()]) < 1e-5


@pytest.fixture(scope="module")
def exported(trained):
    out = trained / "small"
    ran("export", "--load", str(trained / "ckpt"), "--submodel", SMALL, "--output", str(out))
    return out


def test_export_evaluates_to_the_submodels_loss_and_is_smaller(trained, family, exported):
    ran("eval", "--load", str(exported), "--json", str(trained / "small.json"))
    # layers 0 and 3 keep 8 experts, of which 6 are in their windows: the export has those
    alone = _rows(trained / "small.json")["layers=2,experts=6,topk=1"]
    assert abs(alone["loss"] - family[SMALL]["loss"]) / family[SMALL]["loss"] <= 1e-5
    assert alone["params_total"] == family[SMALL]["params_total"]
    # the sub-model's weights alone: its parameters (and the balance's buffers), no optimizer
    stored = dist_checkpointing.load_tensors_metadata(str(exported / "step_0000000"))
    weights = {k: math.prod(t.global_shape) for k, t in stored.items()
               if not k.startswith("decoder.pool_balance.")}
    assert sum(weights.values()) == alone["params_total"], weights
    written = json.loads((exported / "submodel.json").read_text())
    assert written["layers"] == [0, 3] and written["experts"] == [0, 1, 4, 5, 12, 13]
    # trained on from where the full model stopped: 6 steps of 16 samples
    assert "start_sample: 96" in (exported / "config.yaml").read_text()


def test_export_trains_on_under_another_layout(trained, family, exported):
    run = trained / "small_run"
    _run([*TORCHRUN, "--config", str(exported / "config.yaml"), "parallel.pp=2", "parallel.ep=1",
          "train.steps=2", "train.eval_interval=2", f"logging.dir={run}"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert abs(rows[0]["val_loss"] - family[SMALL]["loss"]) / family[SMALL]["loss"] <= 1e-5
    assert (exported / "latest").read_text().strip() == "step_0000002"


@pytest.mark.parametrize("args,message", [
    (["--submodel", "layers=3", "parallel.pp=2"],
     "the exported sub-model (layers=3,experts=16,topk=2): parallel.pp=2 does not divide "
     "model.num_layers=3"),
    (["--submodel", "depth=3"], "unknown axis 'depth'"),
    (["--submodel", "topk=1", "moe.topk=1"], "the model and moe sections of the export come"),
])
def test_bad_export_names_the_problem_and_writes_nothing(trained, capsys, args, message):
    out = trained / "refused"
    err = refused(capsys, "export", "--load", str(trained / "ckpt"), "--output", str(out), *args)
    assert message in err, err
    assert not out.exists() and not list(trained.glob(".refused*"))


def test_bad_eval_and_export_paths(trained, exported, capsys):
    proc = _cli("eval", "--load", str(trained / "run"), expect=2)  # a real process's status
    assert "not a checkpoint; give a checkpoint.dir" in proc.stderr
    err = refused(capsys, "eval", "--load", str(trained / "ckpt"), "--submodel", "width=3")
    assert "unknown axis 'width'" in err
    err = refused(capsys, "eval", "--load", str(trained / "ckpt"), "data.split=100,0,0",
                  "train.eval_interval=0")
    assert "data.split=100,0,0 leaves no validation split, which moue-eval scores" in err
    err = refused(capsys, "export", "--load", str(trained / "ckpt"), "--submodel", SMALL,
                  "--output", str(exported))
    assert "exists; give a new directory" in err
    # Under a file: refused before the checkpoint is loaded, naming the file.
    a_file = exported / "config.yaml"
    err = refused(capsys, "export", "--load", str(trained / "ckpt"), "--submodel", SMALL,
                  "--output", str(a_file / "new" / "dir"))
    assert f"{a_file} is a file, not a directory; give a path in a directory" in err


def _validation_rows(path: Path) -> None:
    """The validation batches moue-eval scores (train.eval_iters global batches of the mock
    data the run was configured with), as a [batch, seq + 1] token array."""
    from data_tools.megatron_data import gpt_datasets

    cfg = load_config("examples/configs/tiny_cpu.yaml", [*TRAINED, "model.seq_length=64"])
    t = cfg.train
    _, valid, _ = gpt_datasets(seq_length=64, seed=cfg.data_seed, split=cfg.data.split,
                               num_samples=(t.steps * t.global_batch_size,
                                            t.eval_iters * t.global_batch_size, 0),
                               vocab_size=cfg.model.vocab_size)
    samples = [valid[i] for i in range(t.eval_iters * t.global_batch_size)]
    assert all(float(s["loss_mask"].min()) == 1.0 for s in samples)  # every position scored
    np.save(path, np.stack([np.append(np.asarray(s["tokens"]), np.asarray(s["labels"])[-1])
                            for s in samples]).astype(np.int32))


def test_tokens_loss_is_the_tables_loss_on_the_same_tokens_under_any_layout(
        trained, family, tmp_path, capsys):
    """--tokens on the validation batches' tokens gives the family table's full-model loss, in
    one process and under EP=2; a random array scores far worse than those (trained) batches."""
    tokens = tmp_path / "valid.npy"
    _validation_rows(tokens)
    full = family["layers=4,experts=16,topk=2"]["loss"]
    out = ran("eval", "--load", str(trained / "ckpt"), "--tokens", str(tokens), "--json",
              str(tmp_path / "one.json"), capsys=capsys)
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["rows"] == 2 * 16 and one["positions"] == 32 * 64, one
    assert abs(one["loss"] - full) / full < 1e-6, (one, full)
    assert f"mean next-token loss over 32 x 64 positions: {one['loss']:.6f}" in out
    _run([*TORCHRUN, "eval", "--load", str(trained / "ckpt"), "--tokens", str(tokens),
          "parallel.ep=2", "--json", str(tmp_path / "ep2.json")])
    ep2 = json.loads((tmp_path / "ep2.json").read_text())
    assert abs(ep2["loss"] - full) / full < 1e-5, (ep2, full)


@pytest.mark.parametrize("array,message", [
    (np.zeros(8, dtype=np.int64), "shape [8]; give a [batch, seq] array with seq >= 2"),
    (np.zeros((2, 8), dtype=np.float32), "dtype float32; give integer token ids"),
    (np.full((2, 8), 384), "token ids span 384..384, outside the model's vocabulary 0..383"),
    (np.zeros((3, 8), dtype=np.int64), "the data-parallel size must divide its 3 rows"),
])
def test_bad_token_arrays_name_the_problem(trained, tmp_path, capsys, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    if "rows" in message:  # 3 rows over 2 data-parallel ranks; torchrun itself then exits 1
        proc = _run([*TORCHRUN, "eval", "--load", str(trained / "ckpt"), "--tokens", str(path)],
                    expect=1)
        assert proc.stderr.count(message) == 1, proc.stderr[-2000:]  # said once, by rank 0
        return
    err = refused(capsys, "eval", "--load", str(trained / "ckpt"), "--tokens", str(path))
    assert message in err, err[-2000:]
