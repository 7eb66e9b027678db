"""Train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) and write ``tokenizer.json``.

Byte-level: every text round-trips exactly (no unknown characters, no normalisation), as the
preprocessing round-trip test requires. ``<|endoftext|>`` is added as the end-of-document token.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from data_tools.preprocess import ensure_writable_dir
from data_tools.readers import Document, read_records
from parallel.errors import UserError

EOD = "<|endoftext|>"


def train_bpe(inputs: list[str], output: str | Path, vocab_size: int = 8192, *,
              json_key: str = "text", min_frequency: int = 2, progress: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    ensure_writable_dir(Path(output).parent, "--output")  # before the work, not after
    if vocab_size < 257 + 1:
        raise UserError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 258 "
                        "(256 bytes, the end-of-document token and one merge)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    texts = (r.text for r in tqdm(read_records(inputs, json_key), disable=not progress,
                                  desc="reading", unit=" docs") if isinstance(r, Document))
    tokenizer.train_from_iterator(texts, trainer)
    output = Path(output)
    ensure_writable_dir(output.parent, "--output")
    temp = output.with_suffix(f".tmp-{os.getpid()}")
    tokenizer.save(str(temp))
    os.replace(temp, output)
    return output
