"""fusion.distributed's loading into FSDP2 shards, per process, without starting processes: torch's fake process
group plays each rank of a world (no data moves; shapes and ranks are all these tests need)."""
import pytest
import torch
import torch.distributed as dist

from fusion.distributed import copy_whole_tensors, this_process_part
from fusion.errors import CheckpointError

fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")


def sharded_linears(world_size: int, rank: int, rows: list[int]):
    """Linear layers of `rows` output rows each, sharded by `fully_shard` as rank `rank` of `world_size`."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world_size,))
    layers = torch.nn.ModuleList(torch.nn.Linear(4, n, bias=False) for n in rows)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    return layers


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_each_process_gets_the_rows_fully_shard_gave_it(world_size):
    """Every rank of worlds of 2 to 8 processes takes exactly the rows of a whole tensor that `fully_shard` put in
    its shard (`torch.chunk` of the rows: uneven splits, and ranks with no rows at all when there are few)."""
    rows = [1, 3, 5, 7, 8, 13]
    for rank in range(world_size):
        dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world_size)
        try:
            layers = sharded_linears(world_size, rank, rows)
            wholes = {f"{i}.weight": torch.arange(n * 4.0).reshape(n, 4) for i, n in enumerate(rows)}
            targets = {name: p for name, p in layers.named_parameters()}
            for name, whole in wholes.items():
                chunks = whole.chunk(world_size)
                expected = chunks[rank] if rank < len(chunks) else whole[:0]
                assert torch.equal(this_process_part(targets[name], whole), expected), (name, rank)
            copy_whole_tensors(targets, list(wholes), wholes.__getitem__, lambda *args: "unused")
            for name, whole in wholes.items():
                local = targets[name].to_local()
                assert torch.equal(local, this_process_part(targets[name], whole)), (name, rank)
            with pytest.raises(CheckpointError, match=r"0.weight: \(2, 4\) for \(1, 4\)"):
                copy_whole_tensors(targets, ["0.weight"], lambda name: torch.zeros(2, 4),
                                   lambda name, got, want: f"{name}: {got} for {want}")
        finally:
            dist.destroy_process_group()


def test_a_plain_tensor_takes_the_whole_tensor():
    whole = torch.randn(3, 2)
    target = torch.empty(3, 2)
    copy_whole_tensors({"w": target}, ["w"], lambda name: whole, lambda *args: "unused")
    assert torch.equal(target, whole) and this_process_part(target, whole) is whole


_ENDING_PROCESS = """
import logging, logging.handlers, sys
from fusion.distributed import end_torchrun_process
held = logging.handlers.MemoryHandler(100, target=logging.FileHandler(sys.argv[1]))  # written when closed
logging.basicConfig(handlers=[held], level=logging.INFO)
logging.getLogger("run").info("the last record of the run")
print("the last line of the run")  # (stdout is a pipe here: block-buffered, not yet written)
sys.stderr.write("the last warning of the run")
end_torchrun_process(int(sys.argv[2]))
print("after the end")
"""


def test_a_torchrun_process_ends_with_its_status_and_loses_none_of_its_output(tmp_path):
    """`end_torchrun_process` ends a torchrun process (WORLD_SIZE > 1) at once with the status given, past the
    interpreter's teardown (where torch's gloo can abort it), and nothing it wrote is lost: buffered stdout and
    stderr, log records held by a handler until it is closed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("PYTHONUNBUFFERED", None)
    log = tmp_path / "run.log"
    done = subprocess.run([sys.executable, "-c", _ENDING_PROCESS, str(log), "3"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "the last line of the run" in done.stdout
    assert "after the end" not in done.stdout
    assert "the last warning of the run" in done.stderr
    assert "the last record of the run" in log.read_text()


def test_outside_torchrun_ending_a_process_does_nothing(monkeypatch):
    import os

    from fusion.distributed import end_torchrun_process

    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail(f"the process was ended with status {code}"))
    for world_size in (None, "1"):
        if world_size is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world_size)
        assert end_torchrun_process(0) is None  # (returned: this test process goes on)
