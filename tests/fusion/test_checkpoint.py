"""Model folders on disk (fusion's and Hugging Face's): a save over a folder is never a mix of two models, even
when it is cut short; a full disk is an OSError; damaged files are named; `~` is a home folder."""
import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import fusion
import fusion.checkpoint
from fusion.errors import CheckpointError
from tests.tiny_models import tiny_fusion_model
from tokenizer import FusionTokenizer

TEXTS = ["what color is the circle? red", "a blue square at the top left", "which way does it move? left"] * 40
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
HF_FILES = ("config.json", "model.safetensors")


def small_decoder(hidden_size=64, seed=0) -> fusion.Decoder:
    torch.manual_seed(seed)
    return fusion.Decoder(fusion.DecoderConfig(vocab_size=128, hidden_size=hidden_size, num_layers=2, num_heads=4,
                                               num_kv_heads=2, head_dim=16, intermediate_size=32, num_experts=4,
                                               floor_scale=8))


@pytest.fixture(scope="module")
def two_models():
    """Two models that differ in every file: their shapes, weights and tokenizers."""
    tok_a = FusionTokenizer.train(TEXTS, vocab_size=300)
    tok_b = FusionTokenizer.train(["zebra quokka xylophone jumps over the lazy dog"] * 100 + TEXTS[:3], vocab_size=300)
    return tiny_fusion_model(tok_a, 0), tiny_fusion_model(tok_b, 1, hidden_size=96)


def contents(folder, names) -> dict:
    """What each file holds (a safetensors file: its tensors, as its header's order may differ between saves)."""
    def content(file):
        if file.suffix == ".safetensors":
            return sorted((key, tensor.numpy().tobytes()) for key, tensor in load_file(file).items())
        return file.read_bytes()

    return {name: content(folder / name) for name in names}


class Killed(BaseException):
    """The process dies here (SIGKILL, a power cut): nothing after it runs, not even cleanup handlers."""


@contextlib.contextmanager
def cut_short_at(number: int, kill: bool, exchange: bool = True):
    """Interrupt a save at its `number`-th rename (os.replace, or the one-step swap of two folders where the
    system has it and `exchange`) or text file written (Path.write_text): with a KeyboardInterrupt (a second
    Ctrl-C; cleanup handlers run), or as if killed there (no rename or folder removal happens after it)."""
    replace, rmtree, write_text, done = os.replace, shutil.rmtree, Path.write_text, [0]
    exchange_paths = fusion.checkpoint.exchange_paths
    dead = []

    def cut_short_here():
        done[0] += 1
        if done[0] == number:
            if kill:
                dead.append(True)
                raise Killed()
            raise KeyboardInterrupt(f"interrupted at step {number}")

    def flaky_replace(src, dst):
        if dead:
            return None
        cut_short_here()
        return replace(src, dst)

    def flaky_exchange(a, b):
        if not exchange:
            return False
        if dead:
            return True
        cut_short_here()
        return exchange_paths(a, b)

    def flaky_write_text(self, *args, **kwargs):
        cut_short_here()
        return write_text(self, *args, **kwargs)

    def no_rmtree_once_dead(path, *args, **kwargs):
        return None if dead else rmtree(path, *args, **kwargs)

    os.replace, shutil.rmtree, Path.write_text = flaky_replace, no_rmtree_once_dead, flaky_write_text
    fusion.checkpoint.exchange_paths = flaky_exchange
    try:
        yield done
    finally:
        os.replace, shutil.rmtree, Path.write_text = replace, rmtree, write_text
        fusion.checkpoint.exchange_paths = exchange_paths


def save_cut_short(save, number: int, kill: bool, exchange: bool = True) -> bool:
    """Run `save()` cut short at its `number`-th rename or text write; False when it had fewer (it completed)."""
    with cut_short_at(number, kill, exchange) as done:
        try:
            save()
        except (KeyboardInterrupt, Killed):
            return True
    assert done[0] < number
    return False


@pytest.mark.parametrize("swap", ["exchange", "renames"])
@pytest.mark.parametrize("kill", [False, True], ids=["interrupted", "killed"])
@pytest.mark.parametrize("kind", ["save_pretrained", "save_hf"])
def test_a_save_over_a_folder_cut_short_anywhere_leaves_the_old_or_the_new_model_whole(
        tmp_path, two_models, kind, kill, swap):
    """A save into an existing folder, interrupted (or killed) at each of its renames and writes in turn: it holds
    all of the old model's files or all of the new one's, never a mix (new weights with an old tokenizer load
    without a word); interrupted, the folder is whole and the user's own files in it are kept. The folders are
    swapped in one step where the system can (`swap` exchange: Linux), else by two renames (`renames`)."""
    if swap == "exchange" and fusion.checkpoint._renameat2() is None:
        pytest.skip("this system has no one-step exchange of two paths (renameat2)")
    if kind == "save_pretrained":
        old, new = two_models
        names = MODEL_FILES
        save = fusion.FusionModel.save_pretrained
    else:
        old, new = small_decoder(64), small_decoder(96, seed=1)
        names = HF_FILES
        save = fusion.Decoder.save_hf
    save(old, tmp_path / "old")
    save(new, tmp_path / "new")
    expected = [contents(tmp_path / "old", names), contents(tmp_path / "new", names)]
    folder = tmp_path / "model"
    number = 1
    while True:
        shutil.rmtree(folder, ignore_errors=True)
        for stale in tmp_path.glob(".model.*"):
            shutil.rmtree(stale)
        shutil.copytree(tmp_path / "old", folder)
        (folder / "README.md").write_text("my notes")
        if not save_cut_short(lambda: save(new, folder), number, kill, exchange=swap == "exchange"):
            break
        assert folder.exists() or swap == "renames" and kill, f"after step {number}"
        if not kill or folder.exists():
            found = contents(folder, names)
            origin = {name: "old" if found[name] == expected[0][name] else "new" if found[name] == expected[1][name]
                      else "neither" for name in names}
            assert len(set(origin.values())) == 1 and "neither" not in origin.values(), f"after step {number}: {origin}"
        else:  # killed between the two renames of the swap: the whole old folder is beside it, and named
            aside = list(tmp_path.glob(".model.old-*"))
            assert len(aside) == 1 and contents(aside[0], names) == expected[0]
            with pytest.raises(CheckpointError, match=r"does not exist .*cut short.*\.model\.old-.*rename"):
                fusion.FusionModel.from_pretrained(folder)
        if not kill:
            assert (folder / "README.md").read_text() == "my notes"
            assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new", "old"]  # nothing left behind
        number += 1
    assert number > 3  # the save has several steps: each was tried
    assert contents(folder, names) == expected[1] and (folder / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new", "old"]


def test_a_save_over_the_working_folder_or_a_link_keeps_them(tmp_path, two_models, monkeypatch):
    """The working folder cannot be swapped (the process would be left in the deleted old one): its files are
    replaced; a link to a folder stays a link, the folder it points to gets the new model."""
    old, new = two_models
    old.save_pretrained(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    new.save_pretrained(".")
    assert Path.cwd() == (tmp_path / "work").resolve() and Path.cwd().exists()
    assert fusion.FusionModel.from_pretrained(".").config.decoder.hidden_size == 96
    (tmp_path / "link").symlink_to(tmp_path / "work")
    old.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert fusion.FusionModel.from_pretrained(tmp_path / "work").config.decoder.hidden_size == 64


@pytest.mark.parametrize("refused", ["the folder", "an entry"])
def test_a_folder_the_system_will_not_move_gets_its_files_replaced(tmp_path, two_models, monkeypatch, refused):
    """A bind mount (EBUSY on moving it), a mount or a subfolder this process may not move inside it (EBUSY,
    EACCES on moving that): the swap is undone and the new files replace the old ones one by one, the folder's
    other entries kept where they are (an in-place save worked there before the swap existed)."""
    import errno

    old, new = two_models
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    (folder / "data").mkdir()
    (folder / "data" / "keep.txt").write_text("mine")
    folder.chmod(0o750)
    real_replace, real_exchange = os.replace, fusion.checkpoint.exchange_paths

    def replace(source, target):
        moving = Path(source) == folder if refused == "the folder" else Path(source) == folder / "data"
        if moving:
            raise OSError(errno.EBUSY if refused == "the folder" else errno.EACCES, "refused", str(source))
        return real_replace(source, target)

    def exchange(a, b):  # (the one-step swap moves the folder too)
        if refused == "the folder" and Path(b) == folder:
            raise OSError(errno.EBUSY, "refused", str(a), None, str(b))
        return real_exchange(a, b)

    monkeypatch.setattr(fusion.checkpoint.os, "replace", replace)
    monkeypatch.setattr(fusion.checkpoint, "exchange_paths", exchange)
    new.save_pretrained(folder)
    monkeypatch.undo()
    assert contents(folder, MODEL_FILES) == contents(_saved(new, tmp_path / "new"), MODEL_FILES)
    assert (folder / "data" / "keep.txt").read_text() == "mine" and (folder.stat().st_mode & 0o777) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]  # no temporary copy left


def test_a_save_over_a_folder_swaps_it_in_one_step_where_the_system_can(tmp_path, two_models, monkeypatch):
    """On Linux the new folder and the old one are exchanged in one step (renameat2): the folder is never absent,
    so a process loading it meanwhile finds the old model or the new one, never nothing; the old one is removed."""
    if fusion.checkpoint._renameat2() is None:
        pytest.skip("this system has no one-step exchange of two paths (renameat2)")
    old, new = two_models
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    real_replace = os.replace
    moved = []

    def replace(source, target):
        moved.append(Path(source))
        assert folder.is_dir()  # before each rename of the save, and after it below
        real_replace(source, target)
        assert folder.is_dir()

    monkeypatch.setattr(fusion.checkpoint.os, "replace", replace)
    new.save_pretrained(folder)
    monkeypatch.undo()
    assert folder not in moved
    assert contents(folder, MODEL_FILES) == contents(_saved(new, tmp_path / "new"), MODEL_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]
    with pytest.raises(FileNotFoundError):  # a path that is not there: an error, nothing changed
        fusion.checkpoint.exchange_paths(tmp_path / "nowhere", folder)
    assert contents(folder, MODEL_FILES) == contents(tmp_path / "new", MODEL_FILES)


@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_a_ctrl_c_just_after_the_swap_leaves_the_new_model_in_place_and_is_the_error_raised(
        tmp_path, two_models, monkeypatch, swap):
    """A KeyboardInterrupt landing just after the rename that put the new folder in place: the save is done (the
    new model, the user's own files, the folder's mode, no copy left beside it) and the interrupt is what the
    caller sees (the clean-up put the carried files 'back' into a folder that was gone: FileNotFoundError)."""
    if swap == "exchange" and fusion.checkpoint._renameat2() is None:
        pytest.skip("this system has no one-step exchange of two paths (renameat2)")
    old, new = two_models
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    (folder / "README.md").write_text("my notes")
    folder.chmod(0o750)
    real_replace, real_exchange = os.replace, fusion.checkpoint.exchange_paths

    def exchange_then_interrupt(a, b):
        if swap == "renames":
            return False
        assert real_exchange(a, b)
        raise KeyboardInterrupt

    def replace_then_interrupt(source, target):
        real_replace(source, target)
        if Path(target) == folder:  # the new folder moved into place
            raise KeyboardInterrupt

    monkeypatch.setattr(fusion.checkpoint, "exchange_paths", exchange_then_interrupt)
    monkeypatch.setattr(fusion.checkpoint.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)
    monkeypatch.undo()
    assert contents(folder, MODEL_FILES) == contents(_saved(new, tmp_path / "new"), MODEL_FILES)
    assert (folder / "README.md").read_text() == "my notes" and (folder.stat().st_mode & 0o777) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]


def _saved(model, path):
    model.save_pretrained(path)
    return path


def disk_full(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_while_saving_leaves_the_folder_as_it_was_and_is_an_oserror(tmp_path, two_models, monkeypatch):
    """safetensors reports a failed write with its own error type: it is the OSError it is (the trainer's message
    naming the intact checkpoint catches OSErrors), and save_hf names the folder."""
    import errno

    old, new = two_models
    old.save_pretrained(tmp_path / "model")
    small_decoder(64).save_hf(tmp_path / "hf")
    before = contents(tmp_path / "model", MODEL_FILES), contents(tmp_path / "hf", HF_FILES)
    monkeypatch.setattr(fusion.checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        new.save_pretrained(tmp_path / "model")
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(CheckpointError, match=rf"could not write the Hugging Face folder {tmp_path / 'hf'} .*No space "
                                              r"left on device.*nothing in it changed"):
        small_decoder(96).save_hf(tmp_path / "hf")
    assert (contents(tmp_path / "model", MODEL_FILES), contents(tmp_path / "hf", HF_FILES)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model"]


def test_a_file_size_limit_makes_both_checkpoint_writers_raise_oserrors(tmp_path):
    """A real failed write (RLIMIT_FSIZE, as a quota): safetensors and torch.save each raise their own error types
    (SafetensorError, RuntimeError); the checkpoint writers raise OSErrors (the streamed one too)."""
    import resource

    from fusion.checkpoint import write_safetensors, write_safetensors_streamed, write_torch_file

    state = {"w": torch.zeros(50_000)}
    writes = {"w.safetensors": write_safetensors, "s.pt": write_torch_file,
              "streamed.safetensors": lambda state, path: write_safetensors_streamed(streamed(state), path)}
    raised = {}
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))  # (Python ignores SIGXFSZ: writes fail instead)
    try:
        for name, write in writes.items():
            try:
                write(state, tmp_path / name)
            except BaseException as err:  # noqa: B036 (what each raises is the point)
                raised[name] = err
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert set(raised) == set(writes) and all(isinstance(err, OSError) for err in raised.values()), raised
    assert "File too large" in str(raised["w.safetensors"]) and "w.safetensors" in str(raised["w.safetensors"])
    assert "s.pt" in str(raised["s.pt"])


def streamed(state: dict, full_disk_at: str | None = None):
    """`state` as a `StreamedState` that notes which tensors it has made; making `full_disk_at` raises ENOSPC."""
    from fusion.checkpoint import StreamedState

    made = []

    def make(name):
        if name == full_disk_at:
            raise OSError(28, "No space left on device")
        made.append(name)
        return state[name]

    result = StreamedState([(name, t.dtype, tuple(t.shape)) for name, t in state.items()], make)
    result.made = made
    return result


def test_a_streamed_weights_file_holds_what_safetensors_writes_and_makes_each_tensor_once(tmp_path):
    """The weights file written one tensor at a time (as FSDP2 runs write their models) reads back with safetensors
    exactly as its own `save_file` writes it: every dtype a model holds, a scalar, an empty tensor, the metadata;
    each tensor is made once, in order, and `drain()` makes the rest where a write stopped early."""
    from safetensors import safe_open

    from fusion.checkpoint import write_safetensors_streamed

    state = {"decoder.w": torch.randn(3, 5), "b16": torch.randn(7).to(torch.bfloat16), "h": torch.randn(2).half(),
             "scalar": torch.tensor(3.5), "ids": torch.arange(4), "mask": torch.tensor([[True, False, True]]),
             "empty": torch.zeros(0, 4), "bytes": torch.arange(5, dtype=torch.uint8)}
    state["strided"] = torch.randn(4, 6)[:, ::2]  # not contiguous
    stream = streamed(state)
    write_safetensors_streamed(stream, tmp_path / "streamed.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "reference.safetensors")
    for name in ("streamed", "reference"):
        loaded = load_file(tmp_path / f"{name}.safetensors")
        assert sorted(loaded) == sorted(state)
        for key, tensor in state.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), (name, key)
    with safe_open(str(tmp_path / "streamed.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert stream.made == list(state)
    stopped = streamed(state, full_disk_at="ids")  # the write stops there; drain() makes the rest
    with pytest.raises(OSError, match="No space"):
        write_safetensors_streamed(stopped, tmp_path / "stopped.safetensors")
    stopped.drain()
    assert stopped.made == [name for name in state if name != "ids"]


def test_an_fsdp2_model_written_a_tensor_at_a_time_loads_as_the_model(tmp_path):
    """`streamed_model_state` in one process (plain tensors; under FSDP2 each is gathered as the file reaches it):
    the model folder it writes loads with the model's weights."""
    from fusion.checkpoint import save_model_folder
    from fusion.distributed import streamed_model_state

    model = tiny_fusion_model(FusionTokenizer.train(["a red circle", "a blue square"] * 20, vocab_size=280))
    save_model_folder(model, tmp_path / "m", state=streamed_model_state(model))
    loaded = fusion.FusionModel.from_pretrained(tmp_path / "m")
    reference = model.state_dict()
    assert sorted(loaded.state_dict()) == sorted(reference)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def sharded_hf_folder(folder: Path) -> list[Path]:
    """A Hugging Face folder whose weights are in three shards and an index (as transformers writes large models)."""
    small_decoder().save_hf(folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names, weight_map = sorted(state), {}
    for i in range(3):
        shard = f"model-0000{i + 1}-of-00003.safetensors"
        save_file({k: state[k] for k in names[i::3]}, folder / shard)
        weight_map.update({k: shard for k in names[i::3]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    fusion.Decoder.from_hf(folder)  # intact, it loads
    return [folder / f"model-0000{i + 1}-of-00003.safetensors" for i in range(3)]


@pytest.mark.parametrize("damage", ["shard cut short", "shard cut to its first bytes", "index cut short",
                                    "index without weight_map"])
def test_a_damaged_hugging_face_file_is_named(tmp_path, damage):
    """An interrupted download: from_hf names the file, says it is damaged and what to do (not a bare
    SafetensorError, JSONDecodeError or KeyError)."""
    shards = sharded_hf_folder(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    damaged = {"shard cut short": (shards[1], shards[1].read_bytes()[:shards[1].stat().st_size // 2]),
               "shard cut to its first bytes": (shards[1], shards[1].read_bytes()[:5]),
               "index cut short": (index, index.read_bytes()[:20]),
               "index without weight_map": (index, b'{"metadata": {}}')}
    file, text = damaged[damage]
    file.write_bytes(text)
    with pytest.raises(CheckpointError, match=rf"{file} cannot be read .*damaged or incomplete: download it again"):
        fusion.Decoder.from_hf(tmp_path)


def test_a_home_folder_path_is_the_same_folder_to_save_and_to_load(tmp_path, two_models, monkeypatch):
    """`~/x` is the home folder's x, as loading reads it (not ./~/x) for fusion and Hugging Face folders."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    model, _ = two_models
    model.save_pretrained("~/my-model")
    small_decoder().save_hf("~/my-decoder")
    assert (home / "my-model" / "model.safetensors").is_file() and (home / "my-decoder" / "config.json").is_file()
    assert not (tmp_path / "~").exists()
    assert fusion.FusionModel.from_pretrained("~/my-model").config.decoder.hidden_size == 64
    assert fusion.Decoder.from_hf("~/my-decoder").config.hidden_size == 64


def test_a_long_file_name_is_written_and_a_failed_write_raises_its_own_error(tmp_path):
    from fusion.checkpoint import write_text_atomically

    long_name = tmp_path / ("r" * 245 + ".json")  # a valid name: its temporary one must be too
    write_text_atomically(long_name, "{}")
    assert long_name.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [long_name.name]
    with pytest.raises(FileNotFoundError, match="no_such_folder"):  # not an error of the clean-up
        write_text_atomically(tmp_path / "no_such_folder" / "r.json", "{}")


def test_a_run_folder_or_a_checkpoint_given_as_the_model_says_where_its_model_is(tmp_path, two_models):
    from fusion import FusionModel

    model = two_models[0]
    model.save_pretrained(tmp_path / "run" / "checkpoints" / "step-0000002" / "model")
    with pytest.raises(CheckpointError, match=r"without a final model yet: its latest checkpoint's model is "
                                              r"'.*run/checkpoints/step-0000002/model'"):
        FusionModel.from_pretrained(tmp_path / "run")
    model.save_pretrained(tmp_path / "run" / "final")
    with pytest.raises(CheckpointError, match=r"incomplete.*a training run's folder: its final model is '.*run/final'"):
        FusionModel.from_pretrained(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"a training checkpoint: its model is '.*step-0000002/model'"):
        FusionModel.from_pretrained(tmp_path / "run" / "checkpoints" / "step-0000002")
    # a file of the folder, or any other file, is named as a file (not as a folder that does not exist)
    with pytest.raises(CheckpointError, match=r"'.*final/model.safetensors' is a file, not a model folder: pass "
                                              r"the folder that holds it, '.*run/final'"):
        FusionModel.from_pretrained(tmp_path / "run" / "final" / "model.safetensors")
    (tmp_path / "cat.png").write_bytes(b"png")
    with pytest.raises(CheckpointError, match=r"'.*cat.png' is a file, not a model folder: pass a folder written"):
        FusionModel.from_pretrained(tmp_path / "cat.png")


def test_from_hf_on_a_folder_that_does_not_exist_says_so(tmp_path):
    from fusion import Decoder

    with pytest.raises(CheckpointError, match=r"folder '.*no-such-model' does not exist \(working directory"):
        Decoder.from_hf(tmp_path / "no-such-model")


def test_a_model_folder_loads_exactly_and_weights_that_do_not_fit_its_config_are_named(tmp_path):
    """`from_pretrained` (the model built empty and read tensor by tensor) gives exactly the saved tensors, in
    float32 or the dtype asked for; a tensor of another shape (the decoder's, the tower's), a missing one or one
    too many is a CheckpointError naming the tensor and the files."""
    shutil.copytree(fusion.checkpoint.model_folder("default"), tmp_path / "m")
    saved = load_file(tmp_path / "m" / "model.safetensors")
    model = fusion.FusionModel.from_pretrained(tmp_path / "m")
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in saved.items())
    half = fusion.FusionModel.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert all(torch.equal(half.state_dict()[k], v.to(torch.bfloat16)) for k, v in saved.items()
               if not k.endswith("expert_bias"))  # (the experts' balancing bias stays in float32)
    name = next(k for k in saved if k.startswith("decoder.layers.0."))
    tower = next(k for k in saved if k.startswith("vision."))
    for change, message in (({name: torch.zeros(3, 3)}, rf"{name} has shape \(3, 3\) but .*config.json gives"),
                            ({tower: torch.zeros(2)}, rf"{tower} has shape \(2,\) but .*config.json gives"),
                            ({name: None}, rf"does not match its config: missing \['{name}'\]"),
                            ({"decoder.extra.weight": torch.zeros(2)}, r"unexpected \['decoder.extra.weight'\]")):
        weights = {k: v for k, v in {**saved, **change}.items() if v is not None}
        save_file(weights, tmp_path / "m" / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            fusion.FusionModel.from_pretrained(tmp_path / "m")


def test_default_beside_a_folder_called_default_says_which_model_it_loads(tmp_path, monkeypatch):
    """`default` is the model that ships with fusion (to `from_pretrained`, to a pipeline) even where the working
    folder holds a model folder called `default` (as `save_pretrained("default")` writes): a warning names that
    folder and how to load it, and `./default` loads it."""
    import warnings

    monkeypatch.chdir(tmp_path)
    mine = tiny_fusion_model(FusionTokenizer.train(["a red circle", "a blue square"] * 20, vocab_size=280))
    mine.save_pretrained("default")
    with pytest.warns(UserWarning, match=r"'default' names the model that ships with fusion, not the model folder "
                                         r"'.*default'; to use that folder, name it './default'"):
        shipped = fusion.FusionModel.from_pretrained("default")
    assert shipped.config.decoder.hidden_size != mine.config.decoder.hidden_size
    with pytest.warns(UserWarning, match=r"'default' names the model that ships with fusion"):
        assert fusion.pipeline("vqa", model="default").model.config == shipped.config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = fusion.FusionModel.from_pretrained("./default")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in mine.state_dict().items())


def test_a_hugging_face_llama4_folder_or_hub_name_says_how_fusion_takes_it(tmp_path, monkeypatch):
    """A Hugging Face Llama 4 folder given where a fusion model folder is asked for is named as such (before the
    files a fusion folder has and it lacks), with the two ways fusion reads one; a Hub name given to
    `Decoder.from_hf` says that nothing is downloaded."""
    hf = tmp_path / "Llama-4-Scout"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": {}}))
    (hf / "model-00001-of-00050.safetensors").write_bytes(b"")
    for load in (fusion.FusionModel.from_pretrained, lambda folder: fusion.pipeline("vqa", model=folder)):
        with pytest.raises(CheckpointError, match=r"holds a 'llama4' model, not a fusion model: a Hugging Face "
                                                  r"Llama 4 folder; load its text decoder with fusion.Decoder."
                                                  r"from_hf\(folder\), or train a fusion model on it with "
                                                  r"`model: \{trunk: FOLDER\}`"):
            load(str(hf))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"'meta-llama/Llama-4-Scout-17B-16E' is a name on the Hugging Face "
                                              r"Hub: fusion never downloads anything, download the folder once"):
        fusion.Decoder.from_hf("meta-llama/Llama-4-Scout-17B-16E")


def test_a_tokenizer_of_another_model_or_an_unknown_chat_format_is_refused_by_name(tmp_path):
    """A folder whose tokenizer.json has other special-token ids than its config.json saved (the files of two
    folders mixed), or whose config names a chat format this version does not know, is a CheckpointError
    naming the file and what to do, not a model that answers wrongly."""
    shutil.copytree(fusion.checkpoint.model_folder("default"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    mixed = {**config, "special_tokens": {**config["special_tokens"], "pad": config["special_tokens"]["pad"] + 1}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(mixed))
    pad = config["special_tokens"]["pad"]
    with pytest.raises(CheckpointError, match=rf"tokenizer.json is not the tokenizer the model was saved with "
                                              rf"\(special token ids: pad {pad + 1} in config.json but {pad} in "
                                              rf"tokenizer.json\); .*copy all three files of one model folder"):
        fusion.FusionModel.from_pretrained(tmp_path / "m")
    other = {**config, "preprocessing": {**config["preprocessing"], "chat_format": "chatml"}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match=r"saved with the chat format 'chatml', which this version of fusion "
                                              r"does not know \(it knows 'llama4'\); update fusion"):
        fusion.FusionModel.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))  # (as saved: loads)
    assert fusion.FusionModel.from_pretrained(tmp_path / "m").tokenizer.pad_id == pad
