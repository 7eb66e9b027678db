"""data_tools: readers, tokenizers, preprocessing to Megatron indexed datasets, blends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_tools.cli import data_info_main, preprocess_main
from data_tools.corpus import build_stdlib_corpus
from data_tools.megatron_data import gpt_datasets
from data_tools.preprocess import BadInput, preprocess
from data_tools.tokenizer import load_tokenizer
from data_tools.train_tokenizer import train_bpe
from parallel.errors import UserError

pytestmark = pytest.mark.compat

TEXTS = ["Hello, world!", "ünïcödé — 数据 🚀\nsecond line\n", "def f(x):\n    return x**2\n",
         "  leading and trailing spaces  ", "tabs\tand\r\nCRLF", "x" * 5000]


def _jsonl(path: Path, texts, key="text") -> Path:
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


def _documents(prefix) -> list[np.ndarray]:
    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: ds[i] views an mmap


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first ~3 MB of the built-in standard-library corpus."""
    return build_stdlib_corpus(tmp_path_factory.mktemp("corpus"), limit_bytes=3_000_000)


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    return train_bpe([str(corpus.train)], tmp_path_factory.mktemp("tok") / "tokenizer.json",
                     vocab_size=600, progress=False)


def test_byte_round_trip_one_document_per_line(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", TEXTS)
    summary = preprocess([str(src)], str(tmp_path / "out"), "byte", append_eod=True, progress=False)
    docs = _documents(tmp_path / "out")
    tok = load_tokenizer("byte")
    assert summary.documents == len(docs) == len(TEXTS)
    for text, ids in zip(TEXTS, docs, strict=True):
        assert ids[-1] == tok.eod and tok.decode(ids[:-1]) == text


def test_trained_bpe_round_trip_with_two_workers_equals_one_worker(tmp_path, corpus, bpe):
    tok = load_tokenizer(str(bpe))
    assert tok.vocab_size == 600 and tok.decode([tok.eod]) == "<|endoftext|>"
    for workers in (1, 2):
        preprocess([str(corpus.valid), str(_jsonl(tmp_path / "x.jsonl", TEXTS))],
                   str(tmp_path / f"w{workers}"), str(bpe), workers=workers, progress=False)
    texts = [json.loads(line)["text"] for line in corpus.valid.read_text().splitlines()] + TEXTS
    docs = _documents(tmp_path / "w2")
    assert len(docs) == len(texts)
    assert all(tok.decode(ids) == text for text, ids in zip(texts, docs, strict=True))
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    assert sum(len(d) for d in docs) < 0.6 * sum(len(t.encode()) for t in texts)  # BPE compresses


def test_plain_text_files_and_directories(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first file")
    (tmp_path / "docs" / "sub" / "b.md").write_text("# second")
    (tmp_path / "docs" / "ignored.bin").write_bytes(b"\x00\x01")
    preprocess([str(tmp_path / "docs")], str(tmp_path / "out"), "byte", progress=False)
    assert [load_tokenizer("byte").decode(d) for d in _documents(tmp_path / "out")] == [
        "first file", "# second"]


@pytest.mark.parametrize("line,reason", [
    ('{"text": "ok", broken\n', "malformed JSON"),
    ('{"body": "no text key"}\n', "no key 'text' (found: body); choose it with --json-key"),
    ('{"text": "   "}\n', "empty document"),
    ('{"text": 42}\n', "'text' is int, not text"),
])
def test_bad_record_stops_with_file_line_and_reason_or_is_counted(tmp_path, line, reason):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n' + line)
    with pytest.raises(BadInput) as err:
        preprocess([str(src)], str(tmp_path / "out"), "byte", progress=False)
    assert f"{src}:3: " in str(err.value) and reason in str(err.value)
    assert "--skip-bad" in str(err.value) and not (tmp_path / "out.idx").exists()
    summary = preprocess([str(src)], str(tmp_path / "out"), "byte", skip_bad=True, progress=False)
    assert summary.documents == 2 and sum(summary.skipped.values()) == 1


def test_input_without_documents_is_refused_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match=r"empty.jsonl: no documents; nothing was written"):
        preprocess([str(empty)], str(tmp_path / "out"), "byte", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "  "}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: no documents \(1 bad records skipped\)"):
        preprocess([str(bad)], str(tmp_path / "out"), "byte", skip_bad=True, progress=False)
    assert list(tmp_path.glob("out*")) == []


def test_invalid_utf8_is_reported(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n')
    with pytest.raises(BadInput, match=r"in.jsonl:2: invalid UTF-8 at byte 14"):
        preprocess([str(src)], str(tmp_path / "out"), "byte", progress=False)


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", TEXTS)
    args = ["--input", str(src), "--output-prefix", str(tmp_path / "out"), "--quiet"]
    assert preprocess_main(args) == 0
    assert preprocess_main(args) == 2
    assert "already exist(s); pass --overwrite" in capsys.readouterr().err
    assert preprocess_main([*args, "--overwrite"]) == 0


def test_unknown_tokenizer_and_missing_input_are_clear(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", TEXTS)
    with pytest.raises(ValueError, match="tokenizer 'gpt9': no such file"):
        preprocess([str(src)], str(tmp_path / "o"), "gpt9", progress=False)
    with pytest.raises(ValueError, match="--input .*nope: no such file or directory"):
        preprocess([str(tmp_path / "nope")], str(tmp_path / "o"), "byte", progress=False)


def test_a_run_killed_midway_leaves_no_dataset_under_the_final_name(tmp_path, corpus, bpe):
    prefix = tmp_path / "killed"
    cmd = [str(Path(sys.executable).parent / "moue-preprocess"), "--input",
           *[str(corpus.train)] * 4, "--output-prefix", str(prefix), "--tokenizer", str(bpe),
           "--quiet"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob("killed.tmp-*.bin")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed: give it more input"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("killed.tmp-*.bin"))  # it was killed while writing aside
    assert not any(Path(f"{prefix}{ext}").exists() for ext in (".bin", ".idx", ".meta.json"))


def test_data_info_reports_documents_tokens_and_tokenizer(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", TEXTS)
    preprocess([str(src)], str(tmp_path / "out"), "byte", append_eod=True, progress=False)
    assert data_info_main([str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == len(TEXTS)
    assert info["tokens"] == sum(len(t.encode()) + 1 for t in TEXTS)
    assert info["tokenizer"]["kind"] == "byte" and sum(info["length_histogram"].values()) == 6
    assert data_info_main([str(tmp_path / "missing")]) == 2


def test_blend_of_two_datasets_feeds_megatron_gpt_dataset(tmp_path, corpus, bpe):
    tok = load_tokenizer(str(bpe))
    # Two halves of the training file: the valid file's few documents depend on which standard
    # library this Python has (Debian's has fewer modules), too few on some for a 10% split.
    lines = corpus.train.read_text().splitlines(keepends=True)
    for name, half in (("a", lines[::2]), ("b", lines[1::2])):
        (tmp_path / f"{name}.jsonl").write_text("".join(half))
        preprocess([str(tmp_path / f"{name}.jsonl")], str(tmp_path / name), str(bpe),
                   append_eod=True, progress=False)
    train, valid, _ = gpt_datasets(seq_length=64, seed=1, num_samples=(32, 8, 0), split="90,10,0",
                                   tokenizer=tok, blend=[0.7, str(tmp_path / "a"),
                                                         0.3, str(tmp_path / "b")])
    assert len(train) >= 32 and len(valid) >= 8
    sample = train[0]
    assert sample["tokens"].shape == (64,) and int(sample["tokens"].max()) < tok.vocab_size
    with pytest.raises(ValueError, match="was tokenized with huggingface .* data.tokenizer is byte"):
        gpt_datasets(seq_length=64, seed=1, num_samples=(8, 0, 0), tokenizer=load_tokenizer("byte"),
                     blend=[str(tmp_path / "a")])
    with pytest.raises(ValueError, match="weights come first"):
        gpt_datasets(seq_length=64, seed=1, num_samples=(8, 0, 0), tokenizer=tok,
                     blend=[str(tmp_path / "a"), 0.5])
