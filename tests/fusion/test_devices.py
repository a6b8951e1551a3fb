"""The device a run uses: `parse_device` (the checked text of a config's `device` / `--device`) and
`init_distributed`, which must never silently fall back to the CPU. CUDA is simulated: nothing is allocated."""
import pytest
import torch

from fusion.distributed import init_distributed, parse_device
from fusion.errors import ConfigError


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA reported available with 2 devices; returns the devices passed to torch.cuda.set_device."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("text", ["gpu", "mps", "auto", "cuda:x", "cuda:-1", "cpu:0", "", 0])
def test_an_unknown_device_is_an_error_naming_the_valid_ones(text):
    with pytest.raises(ConfigError) as caught:
        parse_device(text, "--device")
    message = str(caught.value)
    assert message.startswith("--device: unknown device") and repr(text) in message
    assert "cpu, cuda or cuda:N" in message


@pytest.mark.parametrize("text", ["gpu", "mps"])
def test_init_distributed_does_not_turn_an_unknown_device_into_cpu(text, no_torchrun):
    with pytest.raises(ConfigError, match=f"device: unknown device '{text}'"):
        init_distributed(text)


def test_cpu_and_the_default_without_cuda(no_torchrun, no_cuda):
    assert parse_device("cpu") == parse_device(" CPU ") == torch.device("cpu")
    assert parse_device(None) == torch.device("cpu")
    for device in ("cpu", None):
        ctx = init_distributed(device)
        assert ctx.device == torch.device("cpu") and ctx.world_size == 1 and not ctx.distributed


@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_cuda_device_says_to_use_cpu(text, no_torchrun, no_cuda):
    with pytest.raises(ConfigError, match=f"device is '{text}' but no CUDA device is available.*use cpu"):
        parse_device(text)
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        init_distributed(text)


def test_cuda_index_is_honoured_outside_torchrun(no_torchrun, two_gpus):
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    ctx = init_distributed("cuda:1")
    assert ctx.device == torch.device("cuda", 1) and two_gpus == [torch.device("cuda", 1)]
    assert init_distributed("cuda").device == torch.device("cuda", 0)
    assert init_distributed(None).device == torch.device("cuda", 0)  # the default where CUDA is available


def test_cuda_index_beyond_the_devices_is_an_error(no_torchrun, two_gpus):
    with pytest.raises(ConfigError, match=r"device is 'cuda:2' but this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        init_distributed("cuda:2")
    assert two_gpus == []


def test_under_torchrun_each_process_uses_its_local_rank(monkeypatch, two_gpus):
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no process group to start
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert init_distributed("cuda:1").device == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init_distributed("cuda").device == torch.device("cuda", 1)
    assert two_gpus == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_bf16_counts_as_native_on_a_gpu_only_from_ampere_on(monkeypatch):
    """`precision: auto` takes bf16 where the hardware computes it natively: torch's plain
    `is_bf16_supported()` also says yes for older GPUs (V100, T4) that only emulate it."""
    from fusion.precision import has_native_bf16

    def is_bf16_supported(including_emulation=True, capability=(7, 5)):
        return including_emulation or capability >= (8, 0)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert not has_native_bf16(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: is_bf16_supported(including_emulation, (8, 0)))
    assert has_native_bf16(torch.device("cuda", 0))
