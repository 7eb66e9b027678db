"""Raw text to a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``), in parallel.

The main process reads documents (``data_tools.readers``) and writes tokens with Megatron-Core's
``IndexedDatasetBuilder``; ``workers`` processes tokenize batches of documents, in order, so the
output does not depend on the number of workers. Everything is written under a temporary name and
renamed at the end (``.idx`` last: a dataset is present only once its index is), so a run killed
midway leaves no dataset under the final name. ``PREFIX.meta.json`` records the tokenizer and the
counts, so training can check the vocabulary and ``moue-data-info`` can report.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.readers import Bad, expand_inputs, read_records
from data_tools.tokenizer import Tokenizer, load_tokenizer, token_dtype
from parallel.errors import UserError

BATCH_DOCUMENTS = 64


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def lines(self) -> list[str]:
        out = [f"documents {self.documents:,}   tokens {self.tokens:,}   "
               f"input {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
               f"({self.documents / max(self.seconds, 1e-9):,.0f} docs/s, {self.mb_per_s:.2f} MB/s)"]
        out += [f"skipped {n:,}: {reason}" for reason, n in sorted(self.skipped.items())]
        return out


class BadInput(UserError):
    """A bad record without --skip-bad: names file:line and the reason."""


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(spec: str):
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: workers are the knob
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode_batch(texts: list[str]) -> list[tuple[np.ndarray, int]]:
    return [(_WORKER_TOKENIZER.encode(t), len(t.encode("utf-8"))) for t in texts]


def _batches(records: Iterator, skip_bad: bool, summary: Summary) -> Iterator[list[str]]:
    """Batches of document texts; bad records raise or are counted by reason."""
    def texts():
        for record in records:
            if isinstance(record, Bad):
                if not skip_bad:
                    raise BadInput(f"{record.source}: {record.reason} (pass --skip-bad to skip "
                                   "bad records and count them)")
                reason = record.reason.split(":")[0].split(" (")[0]
                summary.skipped[reason] = summary.skipped.get(reason, 0) + 1
            else:
                yield record.text

    stream = texts()
    while batch := list(islice(stream, BATCH_DOCUMENTS)):
        yield batch


def ensure_writable_dir(directory: Path, what: str) -> None:
    """Create ``directory`` if needed; a ``UserError`` naming ``what`` if it cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{what}: cannot write into {directory} ({err.strerror}); choose a "
                        "writable location") from None


def output_paths(prefix: str | Path) -> dict[str, Path]:
    prefix = str(prefix)
    return {"bin": Path(prefix + ".bin"), "idx": Path(prefix + ".idx"),
            "meta": Path(prefix + ".meta.json")}


def preprocess(inputs: list[str], output_prefix: str, tokenizer: str = "byte", *,
               workers: int = 1, json_key: str = "text", append_eod: bool = False,
               overwrite: bool = False, skip_bad: bool = False, progress: bool = True) -> Summary:
    """Tokenize ``inputs`` into ``output_prefix.{bin,idx,meta.json}``; returns the summary."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    final = output_paths(output_prefix)
    existing = [str(p) for p in final.values() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{', '.join(existing)} already exist(s); pass --overwrite to "
                        "replace the dataset, or choose another --output-prefix")
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    temp = output_paths(f"{output_prefix}.tmp-{os.getpid()}")
    ensure_writable_dir(final["bin"].parent, "--output-prefix")
    summary, start = Summary(), time.perf_counter()
    total_bytes = sum(f.stat().st_size for f in files)
    builder = IndexedDatasetBuilder(str(temp["bin"]), dtype=token_dtype(tok.vocab_size))
    pool = (multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer,))
            if workers > 1 else None)
    if pool is None:
        _init_worker(tokenizer)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress,
               desc=f"preprocess ({workers} worker{'s' * (workers > 1)})")
    try:
        batches = _batches(read_records(files, json_key), skip_bad, summary)
        encoded = pool.imap(_encode_batch, batches) if pool else map(_encode_batch, batches)
        for batch in encoded:
            for ids, nbytes in batch:
                if append_eod:
                    ids = np.append(ids, tok.eod)
                builder.add_document(ids, [len(ids)])
                summary.documents += 1
                summary.tokens += len(ids)
                summary.bytes += nbytes
                bar.update(nbytes)
            bar.set_postfix(docs=summary.documents, refresh=False)
        if not summary.documents:  # a dataset of nothing would fail later, far from the cause
            skipped = sum(summary.skipped.values())
            raise UserError(f"{', '.join(map(str, files))}: no documents"
                            + (f" ({skipped} bad records skipped)" if skipped else "")
                            + "; nothing was written: give input with at least one document")
        builder.finalize(str(temp["idx"]))
        summary.seconds = time.perf_counter() - start
        temp["meta"].write_text(json.dumps({
            "tokenizer": tok.describe(), "append_eod": append_eod, "json_key": json_key,
            "inputs": [str(f) for f in files], **asdict(summary)}, indent=2))
        for kind in ("bin", "meta", "idx"):  # the index last: it makes the dataset exist
            os.replace(temp[kind], final[kind])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        for path in temp.values():
            path.unlink(missing_ok=True)
    return summary
