"""The benches in bench/: each imports (so a library change that breaks one fails here), and each refuses bad
command-line values at once, with a message naming the option. Nothing is timed and no bench runs."""
from __future__ import annotations

import importlib
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
# the benches import each other by module name, their folder on sys.path (as running one as a script puts it)
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

BENCHES = sorted(name[:-3] for name in os.listdir(BENCH) if name.endswith(".py"))
# the scripts (those with a command line); the others are helpers they import
SCRIPTS = ["attention_backends", "branch_attention", "compiled_step", "experts_kernels", "recipe_step", "row_split",
           "sample_cache", "starting_memory", "supervised_logits", "torchrun_exit", "train_step"]
HELPERS = ["arguments", "rounds"]


def test_the_lists_name_every_bench():
    assert sorted(SCRIPTS + HELPERS) == BENCHES


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_module_imports(name):
    importlib.import_module(name)


BAD_VALUES = [  # (argv, the option the message must name)
    (["--rounds", "0"], "--rounds"),
    (["--rounds", "-3"], "--rounds"),
    (["--rounds", "two"], "--rounds"),
    (["--json", "/nonexistent/dir/out.json"], "--json"),
]
RECIPE_BAD_VALUES = [(["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size")]
TRAIN_STEP_BAD_VALUES = [(["--threads", "0"], "--threads"), (["--warmup", "-1"], "--warmup"),
                         (["--experts", "4", "0"], "--experts"), (["--vocab", "0"], "--vocab"),
                         (["--profile", "0"], "--profile")]
STARTING_MEMORY_BAD_VALUES = [(["--hidden-size", "100"], "--hidden-size"), (["--hidden-size", "0"], "--hidden-size"),
                           (["--layers", "0"], "--layers"), (["--experts", "0"], "--experts")]
RECIPE_BENCHES = [name for name in SCRIPTS
                  if name not in ("attention_backends", "experts_kernels", "train_step", "starting_memory",
                                  "torchrun_exit")]


def cases():
    for name in SCRIPTS:
        extra = (RECIPE_BAD_VALUES if name in RECIPE_BENCHES else
                 TRAIN_STEP_BAD_VALUES if name == "train_step" else
                 STARTING_MEMORY_BAD_VALUES if name == "starting_memory" else [])
        for argv, option in BAD_VALUES + extra:
            yield pytest.param(name, argv, option, id=f"{name}:{' '.join(argv)}")


@pytest.mark.parametrize("name, argv, option", list(cases()))
def test_bad_arguments_stop_with_a_message_naming_the_option(name, argv, option, capsys):
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(name).parse_arguments(argv)
    assert stopped.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_default_arguments_parse(name):
    args = importlib.import_module(name).parse_arguments([])
    assert args.rounds >= 1 and args.json is None


@pytest.mark.parametrize("name", RECIPE_BENCHES)
def test_a_model_folder_without_evaluation_json_is_refused_before_loading(name, tmp_path, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(name).parse_arguments(["--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert "argument --model" in err and "evaluation.json" in err and "publish_default_model.py" in err


def test_json_output_path_takes_a_writable_folder_and_refuses_a_folder_as_the_file(tmp_path):
    import argparse

    from arguments import json_output_path

    assert json_output_path(str(tmp_path / "out.json")) == str(tmp_path / "out.json")
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        json_output_path(str(tmp_path))


def test_a_batch_larger_than_the_samples_stops_with_a_message_naming_batch_size():
    from arguments import draw_batches

    assert [len(b) for b in draw_batches(range(5), 5, 3)] == [5, 5, 5]
    with pytest.raises(SystemExit, match=r"--batch-size 6 is more than the 5 samples .* --batch-size 5 or less"):
        draw_batches(range(5), 6, 1)
