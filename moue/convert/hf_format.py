"""Hugging Face model directories on disk: ``config.json``, safetensors shards, tokenizer files.

Read and written with ``safetensors`` and ``json`` alone (no ``transformers``). Weights are one
``model.safetensors`` or shards listed by ``model.safetensors.index.json`` (its ``weight_map``:
tensor name -> shard file), the layout ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from parallel.errors import UserError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Copied beside the weights on import and export; tokenizer.json (or tokenizer.model) is the one
# moue reads (data.tokenizer), the others serve Hugging Face's own loaders.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
SHARD_BYTES = 4 * 2**30
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_config(directory: Path) -> dict:
    """``config.json`` of a Hugging Face directory, or a ``UserError`` naming what is wrong."""
    if not directory.is_dir():
        raise UserError(f"--hf {directory}: no such directory; give a Hugging Face model "
                        "directory (config.json, *.safetensors, tokenizer.json)")
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--hf {directory}: no {CONFIG}; give the directory save_pretrained "
                        "wrote (or a downloaded snapshot), which holds it") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); download it again") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: holds {type(config).__name__}, not a JSON object; download it "
                        "again")
    return config


class Tensors:
    """The tensors of a Hugging Face directory, read one at a time, in their stored dtype, on
    demand. Each read opens its shard and closes it again: safetensors maps the file, and a
    mapping kept open would keep every page read so far resident (host memory the size of the
    files, beside the model being filled)."""

    def __init__(self, directory: Path):
        self.directory = directory
        index, single = directory / INDEX, directory / SINGLE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{index}: no readable weight_map ({err!r}); download it "
                                "again") from None
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif single.exists():
            self.files = {name: single for name in self._names_in(single)}
        else:
            pytorch_bins = sorted(p.name for p in directory.glob("*.bin"))
            hint = (f" (it has {', '.join(pytorch_bins[:3])}: PyTorch pickles, which moue does "
                    "not read; save the model again with save_pretrained(..., "
                    "safe_serialization=True))" if pytorch_bins else "")
            raise UserError(f"--hf {directory}: no {SINGLE} nor {INDEX}{hint}")
        missing = sorted({f.name for f in self.files.values() if not f.exists()})
        if missing:
            raise UserError(f"{index}: lists shard(s) {', '.join(missing)} that are not in "
                            f"{directory}; download the missing files")

    @staticmethod
    def _names_in(path: Path) -> list[str]:
        try:
            with safe_open(path, "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: cannot read it as safetensors ({err}); the file is "
                            "damaged or incomplete: download it again") from None

    def names(self) -> set[str]:
        return set(self.files)

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise UserError(f"--hf {self.directory}: has no tensor {name!r}, which this "
                            "architecture's config.json requires; the weights and config.json do "
                            "not belong together (or the download is incomplete)",
                            every_rank=False)  # under torchrun: maybe one process's expert
        return self.files[name]

    def _read(self, name: str, what):
        """``what(open shard)`` for tensor ``name``'s shard, or a ``UserError`` naming it."""
        path = self._file(name)
        try:
            with safe_open(path, "pt") as f:
                return what(f)
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: cannot read tensor {name!r} ({err}); the file is damaged "
                            "or incomplete: download it again",
                            every_rank=False) from None  # under torchrun: maybe one process's

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``, from its shard's header (no data read)."""
        stored = self._read(name, lambda f: f.get_slice(name).get_dtype())
        if stored not in STORED_DTYPES:
            raise UserError(f"--hf {self.directory}: tensor {name!r} is stored as {stored}; moue "
                            f"reads {', '.join(STORED_DTYPES)} weights: save the model in one of "
                            "them (save_pretrained after model.to(torch.bfloat16))")
        return STORED_DTYPES[stored]

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor ``name``, or only its row ``index`` on the first axis (one expert of a fused
        experts tensor: only that row's bytes are read)."""
        if index is None:
            return self._read(name, lambda f: f.get_tensor(name))
        return self._read(name, lambda f: f.get_slice(name)[index:index + 1])[0]


def _plan_shards(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None,
                 shard_bytes: int) -> list[list[str]]:
    """``tensors``' names in shards of at most ``shard_bytes`` (in ``dtype``; None: their own),
    in order, as ``save_pretrained`` cuts them (a larger tensor is a shard alone)."""
    shards: list[list[str]] = []
    size = 0
    for name, tensor in tensors.items():
        if not shards or size + _nbytes(tensor, dtype) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(tensor, dtype)
    return shards


def _nbytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return tensor.numel() * (dtype or tensor.dtype).itemsize


def _in_world() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _gathered(value) -> list:
    """``value`` of every process of the world, by rank (``[value]`` outside a world of
    several processes)."""
    if not _in_world():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor],
                  dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES) -> None:
    """``tensors`` (in ``dtype``; None: their own) as ``save_pretrained`` lays them out: one
    file, or shards and an index. Every process of a world calls it with the tensors it holds
    (processes may hold the same names): each tensor is written by the first process holding
    it, each process writes its own shards, numbered after those of the processes before it,
    and the first process the index.

    Converted and made contiguous one shard at a time, so only that shard's copies exist beside
    the tensors given (safetensors writes from the tensors' memory without a copy); a tensor that
    is the same memory as one already in the shard (a pool expert that several layers hold) is
    copied, as safetensors refuses shared memory."""
    rank = torch.distributed.get_rank() if _in_world() else 0
    owner: dict[str, int] = {}
    for r, names in enumerate(_gathered(list(tensors))):
        for name in names:
            owner.setdefault(name, r)
    mine = {n: t for n, t in tensors.items() if owner[n] == rank}
    shards = _plan_shards(mine, dtype, shard_bytes)
    counts = _gathered((len(shards), sum(_nbytes(t, dtype) for t in mine.values())))
    total = sum(c for c, _ in counts)
    files = ([SINGLE] if total == 1 else
             [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)])
    start = sum(c for c, _ in counts[:rank])
    own_files = files[start:start + len(shards)]
    for file, names in zip(own_files, shards, strict=True):
        shard, seen = {}, set()
        for name in names:
            t = mine[name].detach().to(dtype or mine[name].dtype).contiguous()
            span = (t.data_ptr(), _nbytes(t))  # to_hf's views are equal or disjoint, never partial
            shard[name] = t.clone() if span in seen else t
            seen.add(span)
        save_file(shard, directory / file, metadata={"format": "pt"})
        del shard
    maps = _gathered({n: f for f, names in zip(own_files, shards, strict=True) for n in names})
    if rank == 0 and total > 1:
        (directory / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": sum(b for _, b in counts)},
             "weight_map": {n: m[n] for m in maps for n in m}}, indent=2) + "\n")


def tokenizer_file(directory: Path) -> Path | None:
    """The tokenizer moue reads from a directory: tokenizer.json, else tokenizer.model."""
    return next((directory / n for n in TOKENIZER_FILES[:2] if (directory / n).exists()), None)


def tokenizer_files(directory: Path) -> list[str]:
    """The names of the tokenizer files present in ``directory``."""
    return [n for n in TOKENIZER_FILES if (directory / n).is_file()]
