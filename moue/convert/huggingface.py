"""``moue-convert import --hf`` and ``moue-convert export --hf-output``.

Import: a Hugging Face directory (``config.json``, safetensors, tokenizer) becomes a moue
checkpoint directory with the standard topology (layer ``l``'s ``N`` experts are pool experts
``l*N .. l*N+N-1``, each router scores its own block): ``step_0000000`` (the weights alone, in
their stored dtype), ``config.yaml`` (``checkpoint.dir`` is the output, ``data.mock=true`` until a dataset
is given), the tokenizer files and ``source.json``. ``moue-pretrain --config OUT/config.yaml``
continues training it under any layout; ``moue-eval --load OUT`` evaluates it.

Export: a moue checkpoint whose routers have no trajectory state becomes a Hugging Face
directory of one family; each MoE layer gets private copies of its window's experts (for the
standard topology, exactly its own), so the outputs are the same.

Both hold the model once, in the dtype of the weights they read (``--dtype`` converts), with
no optimizer: import copies the tensors into it one at a time and writes a model-only
checkpoint, export writes the Hugging Face shards one at a time from views of it
(docs/conversion.md has the memory measured). Both run as one CPU process or under torchrun,
where each process holds, reads and writes its share of the pool's experts and the rest of the
model (``moue.commands.standalone``): an import's processes write their own checkpoint shards,
an export's the safetensors files of the tensors each is the first to hold
(``hf_format.write_tensors``), and the first process the index. Outputs appear under their final name only once complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from moue import checkpoint
from moue.commands.standalone import (
    DTYPES,
    loaded_chunk,
    one_process_state,
    standalone_config,
    standalone_world,
    together,
)
from moue.convert.families import export_family, family_of, hf_config, moue_sections, to_hf, to_moue
from moue.convert.hf_format import (
    CONFIG,
    Tensors,
    read_config,
    tokenizer_file,
    tokenizer_files,
    write_tensors,
)
from moue.convert.importing import check_overrides, check_tokenizer, new_output, write_imported
from parallel.errors import UserError

DEFAULT_SEQ_LENGTH = 4096  # of the written config, at most max_position_embeddings
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


def import_hf(hf_dir: str, output: str, overrides: list[str], tokenizer: str | None = None,
              dtype: str | None = None) -> Path:
    """Convert the Hugging Face directory ``hf_dir`` into the moue checkpoint ``output``, with
    ``tokenizer`` (a tokenizer.json or .model, or 'byte') instead of the directory's own, its
    weights in ``dtype`` (``bf16`` or ``fp32``; None: the directory's own, fp16 as fp32)."""
    source = Path(hf_dir)
    out, tmp = new_output(output, "--output", spread=True)
    check_overrides(overrides, "config.json")
    hf = read_config(source)
    where = str(source / CONFIG)
    family = family_of(hf, where)
    tree = moue_sections(hf, family, where)
    tree["model"]["seq_length"] = min(int(hf.get("max_position_embeddings") or DEFAULT_SEQ_LENGTH),
                                      DEFAULT_SEQ_LENGTH)
    tok = tokenizer or tokenizer_file(source)
    if tok is None:
        raise UserError(f"--hf {source}: no tokenizer.json nor tokenizer.model; pass the model's "
                        "tokenizer with --tokenizer FILE, or copy its tokenizer files into the "
                        "directory (moue tokenizes training data with it)")
    check_tokenizer(str(tok), tree["model"]["vocab_size"], where)
    tensors = Tensors(source)
    stored = tensors.dtype("model.embed_tokens.weight")
    return write_imported(
        out, tmp, tree, str(tok), overrides,
        lambda cfg, module: to_moue(tensors, cfg, family, module),
        {"huggingface": str(source.resolve()), "family": family.model_type, "config": hf},
        dtype=DTYPES[dtype] if dtype else stored, spread=True)


def _with_source_fields(path: Path, hf: dict) -> dict:
    """``hf`` over the imported config.json's other fields (token ids, ...) when the checkpoint
    came from ``import`` of the same family (its ``source.json``, beside ``latest``)."""
    source = next((p / "source.json" for p in (path, path.parent) if (p / "source.json").exists()),
                  None)
    if source is None:
        return hf
    original = json.loads(source.read_text())
    if original.get("family") != hf["model_type"]:
        return hf
    kept = {k: v for k, v in original["config"].items()
            if k not in hf and k not in ("num_experts", "num_local_experts", "rope_scaling",
                                         "transformers_version", "torch_dtype")}
    return {**kept, **hf}


def export_hf(load: str, output: str, family_name: str | None,
              dtype: str | None = None) -> tuple[Path, str]:
    """Write checkpoint ``load`` as a Hugging Face directory ``output`` with weights in
    ``dtype`` (``bf16`` or ``fp32``; None: the dtype the checkpoint's weights are stored in);
    returns it and the family written."""
    out, tmp = new_output(output, "--hf-output", spread=True)
    path = checkpoint.resolve(load)
    meta = checkpoint.saved_config(path)
    stored = checkpoint.stored_dtype(path)
    cfg = standalone_config(meta["config"], stored, spread=True)
    family = export_family(cfg, family_name)
    step = meta.get("state", {}).get("step", 0)
    with standalone_world(cfg, "moue-convert") as pg:
        with together():  # a damaged shard is met by the process that reads it
            module = loaded_chunk(path, cfg, pg)
        if cfg.moe.widen_block and step < cfg.moe.widen_steps:
            raise UserError(f"--load {load}: step {step} of a widening ramp of "
                            f"{cfg.moe.widen_steps} steps: the new experts are only partly open, "
                            "which no Hugging Face router expresses; export once the ramp is over")
        bias = module.decoder.pool_balance.largest_selection_bias()
        if bias:
            raise UserError(f"--load {load}: the selection bias of moe.balance=aux_free or "
                            f"moe.ep_balance_rate is non-zero (up to {bias:.3g}); Hugging Face's "
                            "routers have no such bias, so the exported model would route "
                            "differently")
        written = DTYPES[dtype] if dtype else stored
        first = torch.distributed.get_rank() == 0
        if first:
            tmp.mkdir(parents=True)
        checkpoint.barrier()
        held = set(module.decoder.expert_pool.pool_ids())
        write_tensors(tmp, to_hf(one_process_state(module), cfg, family, held), written)
    if first:
        hf = {**hf_config(cfg, family), "dtype": DTYPE_NAMES[written]}
        (tmp / CONFIG).write_text(json.dumps(_with_source_fields(path, hf), indent=2) + "\n")
        tok = Path(cfg.data.tokenizer)
        if tok.is_file():
            for name in tokenizer_files(tok.parent):
                shutil.copyfile(tok.parent / name, tmp / name)
        tmp.rename(out)
    return out, family.model_type

