"""Running a function in every rank of a gloo process group on this CPU, the way users launch
(torch.multiprocessing.spawn), and bringing each rank's results back."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, world_size, folder, target, args):
    if not torch.cuda.is_available():  # inherited from the parent's environment; set again to be sure
        os.environ["TRITON_INTERPRET"] = "1"
    import conftest  # noqa: F401  -- the suite's setup, the interpreter's speed-up included, in this process too
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'init')}", rank=rank,
                            world_size=world_size)
    try:
        torch.save(target(rank, world_size, *args), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_in_group(world_size: int, target, *args) -> list:
    """``target(rank, world_size, *args)`` in each of ``world_size`` spawned processes of one gloo group; the
    ranks' return values, in rank order. ``target`` must be importable by name (a module-level function)."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world_size, folder, target, args), nprocs=world_size)
        return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]
