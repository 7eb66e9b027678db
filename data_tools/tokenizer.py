"""Tokenizers behind one interface: ``byte``, a Hugging Face ``tokenizer.json``, SentencePiece.

``load_tokenizer(spec)``:
- ``"byte"``: UTF-8 bytes 0-255 and an end-of-document token 256 (vocabulary 257); no files.
- a path ending in ``.json``: a Hugging Face ``tokenizers`` file (``moue-train-tokenizer``
  writes one); the end-of-document token is ``<|endoftext|>`` (or ``</s>``, ``<eos>``).
- a path ending in ``.model``: a SentencePiece model; end of document is its EOS id.

Every tokenizer ``describe()``s itself (kind, vocabulary size, end-of-document id, file); the
description is stored next to a preprocessed dataset so training can check it matches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from parallel.errors import UserError

EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")


class Tokenizer(ABC):
    kind = "abstract"
    path: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eod(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (no end-of-document token)."""

    @abstractmethod
    def decode(self, ids) -> str: ...

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eod": self.eod,
                "path": self.path}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: lossless on any text, and needs no file."""

    kind = "byte"
    vocab_size = 257
    eod = 256

    def encode(self, text):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids):
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HuggingFaceTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = str(path)
        self._tok = HFTokenizer.from_file(self.path)
        self._eod = next((self._tok.token_to_id(n) for n in EOD_NAMES
                          if self._tok.token_to_id(n) is not None), None)
        if self._eod is None:
            raise UserError(f"{path}: no end-of-document token among {', '.join(EOD_NAMES)}; "
                            "add one to the tokenizer (moue-train-tokenizer adds <|endoftext|>)")

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self):
        return self._eod

    def encode(self, text):
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece

        self.path = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        if self._sp.eos_id() < 0:
            raise UserError(f"{path}: the SentencePiece model has no EOS id; train it with one")

    @property
    def vocab_size(self):
        return self._sp.get_piece_size()

    @property
    def eod(self):
        return self._sp.eos_id()

    def encode(self, text):
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids):
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
    """``byte``, a ``tokenizer.json`` path, or a SentencePiece ``.model`` path."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise UserError(f"tokenizer {spec!r}: no such file; use 'byte', a Hugging Face "
                         "tokenizer.json (moue-train-tokenizer makes one) or a SentencePiece .model")
    kinds = {".json": HuggingFaceTokenizer, ".model": SentencePieceTokenizer}
    if path.suffix in kinds:
        try:
            return kinds[path.suffix](path)
        except UserError:
            raise
        except Exception as err:  # the libraries raise their own types on a damaged file
            raise UserError(f"tokenizer {spec!r}: cannot read it ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:120] if str(err) else 'no detail'}); "
                            "it is damaged or not a tokenizer file: use 'byte', or train one "
                            "with moue-train-tokenizer") from None
    raise UserError(f"tokenizer {spec!r}: unknown kind; expected 'byte', *.json or *.model")


def token_dtype(vocab_size: int):
    """The smallest numpy dtype that holds every id (what the .bin file stores)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
