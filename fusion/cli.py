"""The `fusion` command.

    fusion train CONFIG.yaml [--resume | --overwrite]   staged training (torchrun --nproc_per_node N -m fusion.cli
                                                        train ...); a new run refuses a folder holding a run
    fusion train CONFIG.yaml --check                    what it would train (each stage's plan), checked, untrained
    fusion eval MODEL_DIR DATA.jsonl [--out F]     accuracy / BLEU-4 / CIDEr on a dataset file
    fusion shapes-world OUT_DIR [--seed S ...]     write a synthetic shapes-world dataset
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import warnings


def whole_number(minimum: int):
    """An argparse type: an int >= `minimum` (argparse names the option in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


@contextlib.contextmanager
def dataset_warnings_as_lines():
    """Within it, a skipped sample's warning shows as one line ("fusion: DatasetWarning: ..."), not as
    Python's file, line number and source line of the library code that warned."""
    from .data.datasets import DatasetWarning

    python_format = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, DatasetWarning):
            return f"fusion: {category.__name__}: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusion", description="Llama-4-style early-fusion multimodal models")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run a training config (YAML)")
    train.add_argument("config", help="the training config, e.g. examples/recipes/shapes-tiny.yaml")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="start again in an output_dir that holds a run, deleting that run's files")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--check", action="store_true",
                       help="check the config, its files and model folders and print each stage's plan (samples, "
                            "steps, epochs, what it trains), without training or writing anything")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="change one setting of the config for this run, e.g. --set stages.relation.steps=500, "
                            "--set model.decoder.hidden_size=192 --set output_dir=runs/h192 (KEY: a dotted path, "
                            "a stage by its name or index; VALUE: YAML); repeatable; --resume needs the same ones")

    from .evaluation.evaluate import add_eval_arguments

    evaluate = commands.add_parser("eval", help="evaluate a model folder on a dataset file")
    add_eval_arguments(evaluate)

    commands.add_parser("shapes-world", help="write a shapes-world dataset", add_help=False)

    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "shapes-world":  # its own argument parser
        from .data.shapes_world import main as shapes_main

        shapes_main(argv[1:], prog="fusion shapes-world")
        return 0
    args = parser.parse_args(argv)
    with dataset_warnings_as_lines():
        code = run_command(args)
    if args.command == "train":  # under torchrun the process ends here, past the teardown where gloo can abort it
        from .distributed import end_torchrun_process

        end_torchrun_process(code)
    return code


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues the run `fusion train` was started with: its config and `--set` changes
    (an output_dir among them names the run), with --resume."""
    words = ["fusion", "train", args.config, *(word for change in args.set for word in ("--set", change)), "--resume"]
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return shlex.join(words) + (" (under torchrun, as this run was started)" if under_torchrun else "")


def run_command(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .errors import CheckpointError, ConfigError, DatasetError, TrainingError, TrainingStopped, WeightsError
        from .train_config import load_train_config
        from .trainer import check as check_training
        from .trainer import train as run_training

        try:
            config = load_train_config(args.config, overrides=args.set)
            if args.check:
                print(check_training(config, resume=args.resume, overwrite=args.overwrite))
                print("checked: nothing was trained or written")
                return 0
            final = run_training(config, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
        except (ConfigError, DatasetError, CheckpointError, WeightsError, TrainingError) as err:  # no traceback
            print(f"fusion train: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        except TrainingStopped as stop:  # SIGTERM / Ctrl-C, after a checkpoint: the signal's exit code
            print(f"fusion train: {stop}", file=sys.stderr)
            print(f"fusion train: to continue this run: {resume_command(args)}", file=sys.stderr)
            return 128 + (stop.signum or 0)
        finally:  # under torchrun: the process group this command made goes with it
            from .distributed import shutdown_distributed

            shutdown_distributed()
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
            print(f"final model: {final}")
        return 0
    if args.command == "eval":
        from .evaluation.evaluate import run_eval

        return run_eval(args) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
