"""Preprocessing throughput with 1 and 2 worker processes, side by side in one run.

Corpus: the built-in standard-library corpus (tens of MB). Tokenizers: ``byte`` and a byte-level
BPE trained here on the corpus. Prints a Markdown table of MB/s (input text) per worker count;
``--json PATH`` writes the figures.

    python benchmarks/preprocess_workers.py [--workers 1 2] [--bpe-vocab 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)

    from data_tools.corpus import build_stdlib_corpus
    from data_tools.preprocess import preprocess
    from data_tools.train_tokenizer import train_bpe

    work = Path(tempfile.mkdtemp(prefix="moue-bench-"))
    corpus = build_stdlib_corpus(work / "corpus")
    bpe = train_bpe([str(corpus.train)], work / "bpe.json", args.bpe_vocab, progress=False)
    rows = []
    for name, spec in (("byte", "byte"), (f"BPE {args.bpe_vocab}", str(bpe))):
        for workers in args.workers:
            summary = preprocess([str(corpus.train)], str(work / f"{name[:4]}_{workers}"), spec,
                                 workers=workers, append_eod=True, progress=False)
            rows.append({"tokenizer": name, "workers": workers, "mb": summary.bytes / 1e6,
                         "seconds": summary.seconds, "mb_per_s": summary.mb_per_s,
                         "documents": summary.documents, "tokens": summary.tokens})
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"Preprocessing {rows[0]['mb']:.1f} MB ({rows[0]['documents']:,} documents) - {machine}\n")
    print("| tokenizer | workers | seconds | MB/s | speed-up vs 1 worker |")
    print("|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["tokenizer"] == row["tokenizer"] and r["workers"] == 1)
        print(f"| {row['tokenizer']} | {row['workers']} | {row['seconds']:.2f} | "
              f"{row['mb_per_s']:.2f} | {row['mb_per_s'] / base['mb_per_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
