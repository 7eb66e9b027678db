"""Peak host memory and time of ``moue-convert import --hf`` and ``export`` beside
``transformers``' own ``from_pretrained`` + ``save_pretrained`` of the same directory.

Per size: a random Mixtral-style model built by ``transformers`` here and saved in bf16
(safetensors shards of at most 1 GB), then, each in its own process, measured one after the
other (never two at once):
  transformers    AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16).save_pretrained(out)
  moue import     moue-convert import --hf dir --output ckpt --tokenizer byte
  moue export     moue-convert export --load ckpt --hf-output out
  ... 2 procs     the same two under ``torchrun --nproc_per_node=2``: each process holds half
                  of the experts and the rest of the model
The exported tensors are compared with the original ones (bit for bit; a mismatch fails the
benchmark). Peak RSS is the kernel's ``ru_maxrss`` of the process (its largest descendant if
larger: the checkpoint writer forks; under torchrun, the largest of its processes), against the
model's bytes in bf16; "beyond fixed" takes away what the same tool needs for the tiny model
(the interpreter and its libraries).

    python benchmarks/conversion_memory.py --preset cpu     # tiny, 0.5B and 1.5B, about 3 minutes
    python benchmarks/conversion_memory.py --preset smoke   # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TORCHDYNAMO_DISABLE": "1"}
# name: (hidden, layers, heads, kv heads, experts, expert ffn, vocab)
SIZES = {"tiny": (64, 2, 4, 2, 4, 128, 512),
         "0.5B": (1024, 8, 16, 4, 8, 2048, 32000),
         "1.5B": (1536, 12, 16, 4, 8, 3072, 32000)}
# The tiny model first: its peak is each tool's fixed cost (the interpreter, torch, Megatron-Core
# or transformers imported), which the larger sizes' "beyond fixed" column takes away.
PRESETS = {"smoke": ["tiny"], "cpu": ["tiny", "0.5B", "1.5B"]}

BUILD = """
import sys, torch, transformers
hidden, layers, heads, kv, experts, ffn, vocab = map(int, sys.argv[2:9])
config = transformers.MixtralConfig(
    vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
    num_key_value_heads=kv, num_local_experts=experts, num_experts_per_tok=2,
    intermediate_size=ffn, max_position_embeddings=4096, dtype="bfloat16")
torch.manual_seed(0)
model = transformers.MixtralForCausalLM._from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1], max_shard_size="1GB")
print(sum(p.numel() for p in model.parameters()))
"""
HF_ROUND_TRIP = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
"""
COMPARE = """
import sys, json, torch
from moue.convert.hf_format import Tensors
a, b = Tensors(__import__("pathlib").Path(sys.argv[1])), Tensors(__import__("pathlib").Path(sys.argv[2]))
assert a.names() == b.names(), sorted(a.names() ^ b.names())[:4]
bad = [n for n in sorted(a.names()) if not torch.equal(a.get(n), b.get(n))]
assert not bad, bad[:4]
print(len(a.names()))
"""


def measured(argv: list[str]) -> tuple[float, int]:
    """Run ``argv``; returns its seconds and peak RSS in bytes (exits on its failure)."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        # wait4's rusage of the reaped child: ru_maxrss is the largest of it and its descendants
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv[:6])} failed ({proc.returncode}):\n"
                             f"{err.read()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def weight_bytes(directory: Path) -> int:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["metadata"]["total_size"]
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run_size(name: str, work: Path) -> list[dict]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hf = work / "hf"
    built = subprocess.run([sys.executable, "-c", BUILD, str(hf), *map(str, SIZES[name])],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    params, nbytes = int(built.stdout.split()[-1]), weight_bytes(hf)
    cli = [sys.executable, "-m", "moue.cli", "convert"]
    spread = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "moue.cli", "convert"]
    steps = {
        "transformers": [sys.executable, "-c", HF_ROUND_TRIP, str(hf), str(work / "hf-saved")],
        "moue import": [*cli, "import", "--hf", str(hf), "--output", str(work / "ckpt"),
                        "--tokenizer", "byte"],
        "moue export": [*cli, "export", "--load", str(work / "ckpt"), "--hf-output",
                        str(work / "exported")],
        "import 2 procs": [*spread, "import", "--hf", str(hf), "--output", str(work / "ckpt2"),
                           "--tokenizer", "byte"],
        "export 2 procs": [*spread, "export", "--load", str(work / "ckpt2"), "--hf-output",
                           str(work / "exported2")],
    }
    rows = []
    for tool, argv in steps.items():
        seconds, peak = measured(argv)
        rows.append({"size": name, "params": params, "model_bytes": nbytes, "tool": tool,
                     "seconds": round(seconds, 1), "peak_rss": peak,
                     "peak_over_model": round(peak / nbytes, 2)})
    for exported in ("exported", "exported2"):
        subprocess.run([sys.executable, "-c", COMPARE, str(hf), str(work / exported)], cwd=ROOT,
                       env=ENV, check=True, capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def with_fixed_cost(rows: list[dict]) -> list[dict]:
    """Each row with ``beyond_fixed``: (peak - the tool's peak on the tiny model) / model bytes."""
    fixed = {r["tool"]: r["peak_rss"] for r in rows if r["size"] == "tiny"}
    return [{**r, "beyond_fixed": round((r["peak_rss"] - fixed[r["tool"]]) / r["model_bytes"], 2)
             if r["tool"] in fixed and r["size"] != "tiny" else None} for r in rows]


def table(rows: list[dict]) -> str:
    lines = [f"{'size':>5} {'params':>8} {'bf16 GB':>8}  {'tool':<13} {'seconds':>8} "
             f"{'peak RSS GB':>11} {'x model':>8} {'beyond fixed':>12}"]
    for r in rows:
        beyond = "" if r.get("beyond_fixed") is None else f"{r['beyond_fixed']:.2f}"
        lines.append(f"{r['size']:>5} {r['params'] / 1e9:>7.3f}B {r['model_bytes'] / 1e9:>8.3f}  "
                     f"{r['tool']:<13} {r['seconds']:>8.1f} {r['peak_rss'] / 1e9:>11.2f} "
                     f"{r['peak_over_model']:>8.2f} {beyond:>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--work-dir", default="/tmp/moue-conversion-memory",
                        help="where the models are written (removed after each size)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for name in PRESETS[args.preset]:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows = with_fixed_cost(rows + run_size(name, Path(args.work_dir) / name))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"preset": args.preset, "machine": f"{platform.node()} {os.cpu_count()} CPUs",
             "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
