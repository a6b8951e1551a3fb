"""The tokenizer a training config builds: trained on the conversations training reads, with its keys checked."""
import json

import pytest

from fusion.data.datasets import DatasetWarning
from fusion.errors import ConfigError, DatasetError
from fusion.stage_setup import build_model, build_tokenizer
from fusion.trainer import TrainConfig


def config_in(folder, tokenizer=None):
    stages = [{"name": "s", "data": "train.jsonl", "lr": {"decoder": 1e-3}, "steps": 1}]
    return TrainConfig.from_dict({"model": {"tokenizer": tokenizer or {}}, "stages": stages}, base_dir=folder)


def conversation(question, answer):
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_the_tokenizer_learns_from_every_record_training_reads_and_skips_a_malformed_line(tmp_path):
    """Typed content parts and the `messages` spelling of the turns are read as training reads them (their
    words become tokens of their own), and a truncated line is skipped with a warning naming the file and
    the line, not a JSONDecodeError."""
    typed = {"images": ["a.png"], "conversations": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "zephyrine " * 5}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}
    messages = {"messages": [{"role": "user", "content": "quokkaroo " * 5}, {"role": "assistant", "content": "ok"}]}
    good = [conversation(f"<image>\nWhat color is shape {i}?", "red") for i in range(8)]
    data = write_jsonl(tmp_path / "train.jsonl", [*good[:4], '{"conversations": [{"role": "us', typed, messages,
                                                  *good[4:]])
    spec = {"train_on": ["train.jsonl"], "vocab_size": 1024}

    with pytest.warns(DatasetWarning, match=r"train\.jsonl.*line 5.*malformed json"):
        tok = build_tokenizer(spec, config_in(tmp_path))

    assert [len(tok.encode(word)) for word in (" zephyrine", " quokkaroo")] == [1, 1]
    assert [len(tok.encode(word)) for word in ("assistant", "user", "\n\n")] == [1, 1, 1]
    # the same file without those two records: their words are spelled out piece by piece
    write_jsonl(data, good)
    without = build_tokenizer(spec, config_in(tmp_path))
    assert min(len(without.encode(word)) for word in (" zephyrine", " quokkaroo")) > 1


def test_a_file_that_is_mostly_malformed_fails_as_training_would_fail(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [conversation("hi", "red")] * 5 + ['{"conversations": ['] * 20)
    with pytest.warns(DatasetWarning), pytest.raises(DatasetError, match=r"train\.jsonl.*20 of its 25 records"):
        build_tokenizer({"train_on": "train.jsonl"}, config_in(tmp_path))


def test_a_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere\.jsonl.*does not exist"):
        build_tokenizer({"train_on": ["nowhere.jsonl"]}, config_in(tmp_path))


def test_a_misspelt_tokenizer_key_is_refused_with_the_key_it_means(tmp_path):
    """`vocab_sise: 300` is not silently the default vocabulary size of 1024."""
    write_jsonl(tmp_path / "train.jsonl", [conversation("hi", "red")] * 5)
    config = config_in(tmp_path, {"train_on": ["train.jsonl"], "vocab_sise": 300})
    with pytest.raises(ConfigError, match=r"model\.tokenizer: unknown key 'vocab_sise' \(did you mean 'vocab_size'\?\)"
                                          r".*known keys are \['min_frequency', 'path', 'train_on', 'vocab_size'\]"):
        build_model(config)


def test_weight_decay_applies_to_the_matrices_of_the_trained_parts_only(tmp_path):
    """AdamW's weight decay is the stage's `weight_decay` for every trained weight matrix (ndim >= 2: linear,
    embedding, expert and patch weights) and 0 for norm weights, biases and other vectors; a frozen part (rate
    0) is not in the optimizer at all, and each group has its part's rate."""
    from fusion.stage_setup import build_optimizer
    from tests.tiny_models import tiny_fusion_model
    from tokenizer import FusionTokenizer

    model = tiny_fusion_model(FusionTokenizer.train(["a red circle", "a blue square"] * 20, vocab_size=300))
    stage = TrainConfig.from_dict({"stages": [{"name": "s", "data": "train.jsonl", "steps": 1, "weight_decay": 0.05,
                                               "lr": {"vision": 2e-4, "decoder": 1e-3}}]},
                                  base_dir=tmp_path).stages[0]
    groups = build_optimizer(model, stage).param_groups
    placed = {}  # parameter -> (its group's weight decay, lr, part)
    for group in groups:
        for p in group["params"]:
            assert id(p) not in placed, "a parameter in two groups"
            placed[id(p)] = (group["weight_decay"], group["lr"], group["part"])
    rates = {"vision": 2e-4, "decoder": 1e-3}
    for part, rate in rates.items():
        parameters = list(getattr(model, part).parameters())
        assert any(p.ndim >= 2 for p in parameters) and any(p.ndim < 2 for p in parameters), part
        for p in parameters:
            assert placed[id(p)] == ((0.05 if p.ndim >= 2 else 0.0), rate, part), (part, tuple(p.shape))
    assert not any(id(p) in placed for p in model.adapter.parameters())  # frozen: not in the optimizer
    assert len(placed) == sum(1 for part in rates for _ in getattr(model, part).parameters())


def test_vision_weights_are_read_into_the_tower_with_the_reading_options_the_config_gives(tmp_path):
    """`model.vision_weights` reads an open_clip weight file into the new model's tower. A file the QuickGELU
    guard refuses (a MetaCLIP name on a GELU tower) says how the config overrides that, and
    `{path: FILE, quickgelu_check: false}` does; a misspelt key or an option that is not true / false in that
    mapping is a ConfigError."""
    import torch
    from safetensors.torch import save_file

    from vision.encoder import VisionEncoder, VisionEncoderConfig
    from vision.errors import WeightsError

    tower = dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, act="gelu")
    torch.manual_seed(1)
    saved = {k: v.clone() for k, v in VisionEncoder(VisionEncoderConfig(**tower)).visual.state_dict().items()}
    save_file(saved, tmp_path / "my_metaclip_finetune.safetensors")
    write_jsonl(tmp_path / "train.jsonl", [conversation("<image>\nWhat color?", "red")] * 4)

    def model_with(vision_weights):
        model = {"tokenizer": {"train_on": ["train.jsonl"]}, "vision": tower, "vision_weights": vision_weights,
                 "decoder": dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                 intermediate_size=32, num_experts=2)}
        stages = [{"name": "s", "data": "train.jsonl", "lr": {"decoder": 1e-3}, "steps": 1}]
        return build_model(TrainConfig.from_dict({"model": model, "stages": stages}, base_dir=tmp_path))

    with pytest.raises(WeightsError, match=r"(?s)model.vision_weights: .*QuickGELU.*In a training config that option "
                                           r"is written `vision_weights: \{path: .*my_metaclip_finetune.safetensors, "
                                           r"quickgelu_check: false\}`"):
        model_with("my_metaclip_finetune.safetensors")
    model = model_with({"path": "my_metaclip_finetune.safetensors", "quickgelu_check": False})
    assert all(torch.equal(model.vision.visual.state_dict()[k], v) for k, v in saved.items())
    for wrong, message in (({"path": "my_metaclip_finetune.safetensors", "quickgelu_checks": False},
                            r"model.vision_weights: unknown key 'quickgelu_checks' \(did you mean "
                            r"'quickgelu_check'\?\)"),
                           ({"path": "my_metaclip_finetune.safetensors", "quickgelu_check": "no"},
                            r"model.vision_weights.quickgelu_check must be true or false, got 'no'"),
                           ({"quickgelu_check": False}, r"model.vision_weights must be the path of an open_clip "
                                                        r"weight file, or a mapping with its `path`")):
        with pytest.raises(ConfigError, match=message):
            model_with(wrong)
