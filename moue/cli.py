"""Command-line entry points (installed as console scripts): the parsers, and bad input reported
once with exit status 2. What each command does lives in ``moue.commands`` (and
``moue.convert``), imported only once the arguments are parsed, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from moue.config import load_config
from parallel.errors import UserError
from parallel.launch import (
    global_rank_from_env,
    run_on_cpu_only,
    set_cuda_device_max_connections,
)

# Megatron-Core announces its fallbacks when Transformer Engine / apex are absent (CPU machines).
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
# Deprecation notices from inside torch / Megatron-Core that a user cannot act on.
warnings.filterwarnings("ignore", message=".*(reduce_scatter_tensor|all_gather_into_tensor|"
                        "is deprecated|non-leaf Tensor|sequence_parallel. is set to .True.|"
                        "Please use DTensor instead).*")

PRETRAIN_EPILOG = """\
examples:
  moue-pretrain --config examples/configs/tiny_cpu.yaml --dry-run
  moue-pretrain --config examples/configs/tiny_cpu.yaml moe.window=4 parallel.ep=4 \\
      --dry-run --world-size 4
  torchrun --nproc_per_node=2 -m moue.cli --config examples/configs/tiny_cpu.yaml train.steps=50

Bad input (a config value, a file, a layout) is reported once, naming the field and the fix,
with exit status 2.
"""


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of processes, e.g. 8")
    return int(text)


def pretrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moue-pretrain", description="Pretrain a Mixture-of-Universal-Experts model.",
        epilog=PRETRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (sections model, moe, parallel, "
                        "train, data, checkpoint, logging); defaults apply to what it leaves out")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides, e.g. moe.window=8 parallel.ep=2 train.steps=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="build nothing heavy: print one JSON object with parameter counts, "
                        "exposure per expert, virtual width, reuse factor, the layout and memory "
                        "estimates, then exit")
    parser.add_argument("--world-size", type=_positive_int, default=None,
                        help="with --dry-run: check the layout for this many processes "
                        "(default: $WORLD_SIZE, else the smallest world the layout needs)")
    return parser


REPORT_GRACE_S = 3.0


def report_user_error(prog: str, err: UserError) -> int:
    """Print a user error once per job and return the exit status 2: by global rank 0 when every
    rank meets the same input, else by the rank that met it."""
    rank = global_rank_from_env()
    if rank == 0 or not err.every_rank:
        where = f" (rank {rank})" if rank else ""
        print(f"{prog}: error{where}: {err}", file=sys.stderr, flush=True)
    else:  # the first exit makes torchrun stop the job: let rank 0 print its message first
        time.sleep(REPORT_GRACE_S)
    return 2


def pretrain(argv: list[str] | None = None) -> int:
    args = pretrain_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from moue.commands.pretrain import dry_run

            dry_run(cfg, args.world_size)
            return 0
        warning = set_cuda_device_max_connections(cfg.parallel.tp)  # before any CUDA call
        if warning and global_rank_from_env() == 0:
            print(f"moue-pretrain: warning: {warning}", file=sys.stderr)
        from moue.commands.pretrain import run

        run(cfg)
    except UserError as err:
        return report_user_error("moue-pretrain", err)
    return 0


EVAL_EPILOG = """\
examples:
  moue-eval --load runs/demo/checkpoints --family
  moue-eval --load runs/demo/checkpoints --submodel layers=3,experts=8,topk=1 --json eval.json
  torchrun --nproc_per_node=2 -m moue.cli eval --load runs/demo/checkpoints --family parallel.ep=2
  moue-eval --load runs/demo/checkpoints --tokens tokens.npy   # [batch, seq] int array

A sub-model is layers=L,experts=M,topk=K; an axis left out keeps its full value.
"""

EXPORT_EPILOG = """\
examples:
  moue-export --load runs/demo/checkpoints --submodel layers=3,experts=8,topk=1 --output runs/small
  moue-pretrain --config runs/small/config.yaml train.steps=100    # continue training it
  moue-eval --load runs/small
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, metavar="CKPT",
                        help="a checkpoint.dir (its 'latest' is used) or one step_N directory")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides of the checkpoint's config, e.g. "
                        "train.eval_iters=8 parallel.ep=2")


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moue-eval", description="Held-out loss and perplexity of a checkpoint: the full "
        "model, elastic sub-models, or the whole family, as a Markdown table.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser)
    parser.add_argument("--family", action="store_true", help="every combination of the "
                        "configured elastic choices (elastic.layers, .experts, .topk)")
    parser.add_argument("--submodel", action="append", default=[], metavar="SPEC",
                        help="a sub-model, e.g. layers=3,experts=8,topk=1 (repeatable)")
    parser.add_argument("--tokens", metavar="FILE.npy", help="instead: the full model's mean "
                        "next-token loss over a [batch, seq] integer array (numpy.save), to "
                        "compare with another implementation on the same tokens")
    parser.add_argument("--logits", metavar="OUT.npy", help="with --tokens: also save the "
                        "logits [batch, seq-1, vocab] (float32) there")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return parser


def evaluate(argv: list[str] | None = None) -> int:
    parser = eval_parser()
    args = parser.parse_args(argv)
    if args.tokens and (args.family or args.submodel):
        parser.error("--tokens evaluates the full model: leave out --family and --submodel")
    if args.logits and not args.tokens:
        parser.error("--logits saves the logits of --tokens FILE.npy: give that too")
    try:
        from moue.commands.evaluate import evaluate as run_eval
        from moue.commands.evaluate import evaluate_tokens, markdown, write_json

        if args.tokens:
            result = evaluate_tokens(args.load, args.tokens, args.overrides, args.logits)
            seq = result["positions"] // result["rows"]
            text = (f"mean next-token loss over {result['rows']} x {seq} positions: "
                    f"{result['loss']:.6f} (ppl {result['ppl']:.3f})")
        else:
            result = run_eval(args.load, args.submodel, args.family, args.overrides)
            text = markdown(result)
        if global_rank_from_env() == 0:
            print(text, flush=True)
            if args.json:
                write_json(result, args.json, args.load)
    except UserError as err:
        return report_user_error("moue-eval", err)
    return 0


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moue-export", description="Write a standalone, smaller checkpoint of one elastic "
        "sub-model (kept layers renumbered, kept experts re-indexed, explicit eligibility).",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser)
    parser.add_argument("--submodel", required=True, metavar="SPEC",
                        help="the sub-model, e.g. layers=3,experts=8,topk=1")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="a new directory: the checkpoint, config.yaml and submodel.json")
    return parser


def _say_cpu(prog: str) -> None:
    """Conversion and export run on the CPU on any node; on a GPU node, say so (once a job)."""
    if run_on_cpu_only() and global_rank_from_env() == 0:
        print(f"{prog}: running on the CPU (this node's GPUs are hidden from it: the weights are "
              "held in host memory)", file=sys.stderr)


def export(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    _say_cpu("moue-export")
    try:
        from moue.commands.export import export as run_export

        out = run_export(args.load, args.submodel, args.output, args.overrides)
        print(f"moue-export: wrote {out} ({args.submodel}); continue training with "
              f"moue-pretrain --config {out / 'config.yaml'}, evaluate with moue-eval --load {out}")
    except UserError as err:
        return report_user_error("moue-export", err)
    return 0


CONVERT_EPILOG = """\
examples:
  moue-convert import --hf ~/models/Qwen3-30B-A3B --output runs/qwen3
  moue-convert import --megatron ~/megatron/checkpoints/moe --output runs/moe \\
      --tokenizer ~/tokenizers/tokenizer.json
  moue-pretrain --config runs/qwen3/config.yaml data.mock=false data.path=data/web   # continue
  moue-eval --load runs/qwen3 --tokens tokens.npy --logits logits.npy
  moue-convert export --load runs/qwen3 --hf-output runs/qwen3-hf
  moue-convert export --load runs/moue --hf-output runs/moue-hf --family mixtral
  moue-convert widen --load runs/qwen3 --output runs/qwen3-moue --window 256 --steps 1000
  torchrun --nproc_per_node=8 -m moue.cli convert import --hf ~/models/Qwen3-30B-A3B \\
      --output runs/qwen3            # each process holds 1/8 of the experts

Supported: Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE; Megatron-LM torch_dist MoE checkpoints
(docs/conversion.md). Each command runs on the CPU, on any node (where GPUs are visible, they
are hidden from it), with the weights in their own dtype (--dtype converts). One process holds
the whole model; Hugging Face import and export also run under torchrun on N processes (N
dividing the pool's experts), each holding its N-th of the experts and the rest of the model.
"""


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moue-convert", description="Convert checkpoints: a Hugging Face or Megatron-LM MoE "
        "model into a moue checkpoint (standard topology), a moue checkpoint into a Hugging Face "
        "model, or a standard one into a widened MoUE.",
        epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="import|export|widen")
    imp = commands.add_parser("import", help="a Hugging Face or Megatron-LM MoE -> a moue "
                              "checkpoint", description="A Hugging Face directory (config.json, "
                              "*.safetensors, tokenizer) or a Megatron-LM torch_dist checkpoint "
                              "-> a moue checkpoint directory with config.yaml.")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="the Hugging Face directory")
    source.add_argument("--megatron", metavar="DIR", help="Megatron-LM's --save directory "
                        "(latest_checkpointed_iteration.txt names the iteration) or one iter_N")
    imp.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json or .model, or "
                     "'byte': with --megatron, the run's (default: its tokenizer_model when it "
                     "is such a file here); with --hf, instead of the directory's own (needed "
                     "when it has none)")
    imp.add_argument("--output", required=True, metavar="CKPT", help="a new directory")
    imp.add_argument("--dtype", choices=("bf16", "fp32"), help="the dtype the weights are "
                     "written in (default: the source's own; fp16 as fp32)")
    imp.add_argument("overrides", nargs="*", metavar="section.key=value",
                     help="settings of the written config.yaml, e.g. model.seq_length=2048 "
                     "parallel.ep=8 train.lr=1e-4 (the architecture comes from the source)")
    exp = commands.add_parser("export", help="a moue checkpoint -> a Hugging Face directory",
                              description="A moue checkpoint whose routers have no trajectory "
                              "state -> a Hugging Face directory (safetensors, config.json, "
                              "tokenizer); each MoE layer gets copies of its window's experts.")
    exp.add_argument("--load", required=True, metavar="CKPT",
                     help="a checkpoint.dir (its 'latest' is used) or one step_N directory")
    exp.add_argument("--hf-output", required=True, metavar="DIR", help="a new directory")
    exp.add_argument("--family", metavar="NAME", help="mixtral, qwen2_moe or qwen3_moe "
                     "(default: the first that can hold the model)")
    exp.add_argument("--dtype", choices=("bf16", "fp32"), help="the dtype the weights are "
                     "written in (default: the checkpoint's: bf16 from a bf16 run, fp32 from "
                     "an fp32 one)")
    wid = commands.add_parser("widen", help="a standard-topology checkpoint -> a progressively "
                              "widened MoUE", description="A standard-topology moue checkpoint "
                              "-> a rotational MoUE whose layers open the rest of their window "
                              "over --steps steps (the same outputs at step 0).")
    wid.add_argument("--load", required=True, metavar="CKPT",
                     help="a checkpoint.dir (its 'latest' is used) or one step_N directory")
    wid.add_argument("--output", required=True, metavar="CKPT", help="a new directory")
    wid.add_argument("--window", required=True, type=int, metavar="W",
                     help="experts per layer's window after widening (> experts per layer now)")
    wid.add_argument("--steps", required=True, type=int, metavar="R",
                     help="training steps over which the new experts open")
    wid.add_argument("overrides", nargs="*", metavar="section.key=value",
                     help="settings of the written config.yaml (layout, train, data, ...), and "
                     "moe.router_state_dim=D to add the trajectory state")
    return parser


def convert(argv: list[str] | None = None) -> int:
    args = convert_parser().parse_args(argv)
    _say_cpu("moue-convert")
    say = print if global_rank_from_env() == 0 else (lambda *_: None)  # once a job
    try:
        from moue.convert.huggingface import export_hf, import_hf

        if args.command == "widen":
            from moue.convert.widen import widen

            out = widen(args.load, args.output, args.window, args.steps, args.overrides)
            say(f"moue-convert: wrote {out}; train it with moue-pretrain --config "
                  f"{out / 'config.yaml'}")
        elif args.command == "import":
            if args.megatron:
                from moue.convert.megatron_lm import import_megatron

                out = import_megatron(args.megatron, args.output, args.overrides, args.tokenizer,
                                      args.dtype)
            else:
                out = import_hf(args.hf, args.output, args.overrides, args.tokenizer, args.dtype)
            say(f"moue-convert: wrote {out}; continue training with moue-pretrain --config "
                  f"{out / 'config.yaml'}, evaluate with moue-eval --load {out}")
        else:
            out, family = export_hf(args.load, args.hf_output, args.family, args.dtype)
            say(f"moue-convert: wrote {out} ({family}); load it with "
                  f"transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    except UserError as err:
        return report_user_error("moue-convert", err)
    return 0


COMMANDS = {"pretrain": pretrain, "eval": evaluate, "export": export, "convert": convert}


def main(argv: list[str] | None = None) -> int:
    """``python -m moue.cli [pretrain|eval|export|convert] ...`` (torchrun's ``-m moue.cli``): pretrain
    unless the first argument names another command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return pretrain(argv)


if __name__ == "__main__":
    sys.exit(main())
