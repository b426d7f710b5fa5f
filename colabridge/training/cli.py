"""``colabridge train vae|joint|lora --config FILE.json``: the command-line front of :mod:`.trainer`.

Multi-process: ``accelerate launch --multi_gpu --num_processes N -m colabridge.training.cli joint
--config FILE`` (on CPU-only machines too; ``--cpu`` would start one process), or ``torchrun``.
"""

from __future__ import annotations

import argparse
import json


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``train`` subcommand on a ``colabridge`` argparse ``subparsers`` object."""
    p = subparsers.add_parser("train", help="train a Cola VAE (stage 1) or the joint VAE+DiT stage (stage 2)")
    _add_arguments(p)
    p.set_defaults(func=cmd_train)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=("vae", "joint", "lora"), help="vae = stage 1; joint = stage 2 (add --freeze-vae for DiT only); lora = adapter on a pipeline's DiT")
    p.add_argument("--config", required=True, help="JSON file with TrainConfig fields (see colabridge.training.trainer)")
    p.add_argument("--output-dir", help="override the config's output_dir")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in output_dir")
    p.add_argument("--max-steps", type=int, help="override the config's max_steps (the LR schedule horizon)")
    p.add_argument("--stop-at-step", type=int, help="end this invocation after this step (checkpointed); resume later")
    p.add_argument("--export", metavar="FOLDER", help="do not train: export the latest checkpoint's models to FOLDER")
    p.add_argument("--raw-weights", action="store_true", help="with --export: the trained weights, not the EMA (runs with an ema config)")
    p.add_argument("--freeze-vae", action="store_true", help="official DiT-only recipe: VAE frozen, only flow matching")


def config_from_args(args):
    from .trainer import TrainConfig

    raw = json.loads(open(args.config).read())
    raw["stage"] = args.stage
    if args.output_dir:
        raw["output_dir"] = args.output_dir
    if args.max_steps:
        raw["max_steps"] = args.max_steps
    if args.freeze_vae:
        if args.stage == "vae":
            raise SystemExit("--freeze-vae applies to the joint and lora stages only")
        raw.setdefault("loss", {})["freeze_vae"] = True
    return TrainConfig(**raw)


def cmd_train(args) -> None:
    from .trainer import export_checkpoint, train

    if args.export:
        print(f"exported {export_checkpoint(config_from_args(args), args.export, ema=not args.raw_weights)}")
        return
    train(config_from_args(args), resume=args.resume, stop_at_step=args.stop_at_step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="colabridge-train", description=__doc__)
    _add_arguments(parser)
    cmd_train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
