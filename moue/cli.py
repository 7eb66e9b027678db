"""Command-line entry points (installed as console scripts)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from moue.config import load_config
from parallel.errors import UserError
from parallel.launch import global_rank_from_env

# Megatron-Core announces its fallbacks when Transformer Engine / apex are absent (CPU machines).
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
# Deprecation notices from inside torch / Megatron-Core that a user cannot act on.
warnings.filterwarnings("ignore", message=".*(reduce_scatter_tensor|all_gather_into_tensor|"
                        "is deprecated|non-leaf Tensor|sequence_parallel. is set to .True.).*")

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
            from moue.dry_run import report

            world = args.world_size
            if world is None and os.environ.get("WORLD_SIZE", "").isdigit():
                world = int(os.environ["WORLD_SIZE"])
            print(json.dumps(report(cfg, world), indent=2))
            return 0
        from moue.training.trainer import run

        run(cfg)
    except UserError as err:
        return report_user_error("moue-pretrain", err)
    return 0


if __name__ == "__main__":
    sys.exit(pretrain())
