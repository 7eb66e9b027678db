"""Command-line entry points (installed as console scripts)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from moue.config import load_config

# Megatron-Core announces its fallbacks when Transformer Engine / apex are absent (CPU machines).
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
# Deprecation notices from inside torch / Megatron-Core that a user cannot act on.
warnings.filterwarnings("ignore", message=".*(reduce_scatter_tensor|all_gather_into_tensor|"
                        "is deprecated|non-leaf Tensor|sequence_parallel. is set to .True.).*")

PRETRAIN_EPILOG = """\
examples:
  moue-pretrain --config examples/configs/tiny_cpu.yaml --dry-run
  moue-pretrain --config examples/configs/tiny_cpu.yaml moe.window=8 parallel.ep=2 \\
      --dry-run --world-size 2
  torchrun --nproc_per_node=2 -m moue.cli --config examples/configs/tiny_cpu.yaml train.steps=50
"""


def pretrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moue-pretrain", description="Pretrain a Mixture-of-Universal-Experts model.",
        epilog=PRETRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (sections model, moe, parallel, "
                        "train, data); defaults apply to what it leaves out")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides, e.g. moe.window=8 parallel.ep=2 train.steps=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="build nothing heavy: print one JSON object with parameter counts, "
                        "exposure per expert, virtual width, reuse factor, the layout and memory "
                        "estimates, then exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: validate the layout for this many processes "
                        "(default: $WORLD_SIZE, else 1)")
    return parser


def pretrain(argv: list[str] | None = None) -> int:
    args = pretrain_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from moue.dry_run import report

            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            print(json.dumps(report(cfg, world), indent=2))
            return 0
    except (ValueError, FileNotFoundError) as err:
        hint = ("\n(a dry run checks the layout for --world-size N processes; default 1)"
                if args.dry_run and args.world_size is None and "world size" in str(err) else "")
        print(f"moue-pretrain: error: {err}{hint}", file=sys.stderr)
        return 2
    from moue.training import NonFiniteLoss, run

    try:
        run(cfg)
    except (ValueError, NonFiniteLoss) as err:
        print(f"moue-pretrain: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(pretrain())
