"""Command-line entry points of the data tools (installed as console scripts)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from parallel.errors import UserError

# Megatron-Core announces its fallbacks when Transformer Engine / apex are absent (CPU machines).
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")


def _fail(prog: str, err: UserError) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def preprocess_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moue-preprocess",
        description="Tokenize raw text (JSONL, .jsonl.gz, plain text files, or directories of "
        "them) into a Megatron indexed dataset PREFIX.bin/.idx (+ PREFIX.meta.json).",
        epilog="example: moue-preprocess --input data/corpus/train.jsonl --output-prefix "
        "data/corpus_train --tokenizer byte --workers 2 --append-eod")
    parser.add_argument("--input", nargs="+", required=True, help="files or directories")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte', a tokenizer.json (Hugging Face) or a SentencePiece .model")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--json-key", default="text", help="field of a JSONL record to read")
    parser.add_argument("--append-eod", action="store_true",
                        help="end every document with the end-of-document token (recommended "
                        "for pretraining: documents are concatenated into sequences)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip and count bad records instead of stopping at the first")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from data_tools.preprocess import preprocess

    try:
        summary = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                             json_key=args.json_key, append_eod=args.append_eod,
                             overwrite=args.overwrite, skip_bad=args.skip_bad,
                             progress=not args.quiet)
    except UserError as err:
        return _fail("moue-preprocess", err)
    for line in summary.lines():
        print(line)
    print(f"wrote {args.output_prefix}.bin / .idx / .meta.json")
    return 0


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moue-train-tokenizer",
        description="Train a byte-level BPE tokenizer on a corpus and write tokenizer.json.",
        epilog="example: moue-train-tokenizer --input data/corpus/train.jsonl --vocab-size 8192 "
        "--output data/tokenizer.json")
    parser.add_argument("--input", nargs="+", required=True, help="files or directories")
    parser.add_argument("--output", required=True, help="the tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args(argv)
    from data_tools.train_tokenizer import train_bpe

    try:
        path = train_bpe(args.input, args.output, args.vocab_size, json_key=args.json_key,
                         min_frequency=args.min_frequency)
    except UserError as err:
        return _fail("moue-train-tokenizer", err)
    print(f"wrote {path}")
    return 0


def data_info_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moue-data-info",
        description="Documents, tokens, length histogram and tokenizer of a preprocessed dataset.")
    parser.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from data_tools.info import dataset_info

    try:
        info = dataset_info(args.prefix)
    except UserError as err:
        return _fail("moue-data-info", err)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    tok = info["tokenizer"] or {}
    print(f"{info['prefix']}: {info['documents']:,} documents, {info['tokens']:,} tokens "
          f"({info['dtype']}), mean {info['tokens_per_document']['mean']:.0f} tokens/document")
    print(f"tokenizer: {tok.get('kind', 'unknown')} (vocab {tok.get('vocab_size')}, "
          f"eod {tok.get('eod')}{', ' + tok['path'] if tok.get('path') else ''})")
    print("tokens per document:")
    peak = max(info["length_histogram"].values()) or 1
    for bucket, count in info["length_histogram"].items():
        print(f"  {bucket:>9} {count:>8,} {'#' * round(40 * count / peak)}")
    return 0


def build_corpus_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moue-build-corpus",
        description="Gather this Python's standard library sources into train.jsonl / "
        "valid.jsonl (one document per file): a real corpus every machine has.")
    parser.add_argument("--output", required=True, help="directory to write into")
    parser.add_argument("--valid-percent", type=float, default=2.0)
    parser.add_argument("--limit-mb", type=float, default=None, help="use only the first N MB")
    args = parser.parse_args(argv)
    from data_tools.corpus import build_stdlib_corpus

    limit = int(args.limit_mb * 1e6) if args.limit_mb else None
    try:
        files = build_stdlib_corpus(args.output, args.valid_percent, limit)
    except UserError as err:
        return _fail("moue-build-corpus", err)
    print(f"wrote {files.train} ({files.train_documents:,} documents) and {files.valid} "
          f"({files.valid_documents:,}); {files.bytes / 1e6:.1f} MB of text")
    return 0
