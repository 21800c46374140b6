"""SyncBatchNormAct over gloo on CPU against one-process batch norm over the concatenated batch, float64.

Each test spawns the ranks once and runs every case inside them, because starting processes is the
slow part. Batches are uneven and one rank holds no samples at all.
"""

import contextlib
import itertools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _helpers import TORCH_ACTIVATIONS

import tritonbn
from tritonbn.functional import cpu_reference

# (activation, with residual, momentum, shape of one sample)
CASES = [
    ("relu", True, 0.1, (3, 4, 5)),
    ("leaky_relu", False, None, (3, 6)),
    ("silu", True, 0.3, (3,)),
]
NEGATIVE_SLOPE = 0.2
STEPS = 2
# The kernels (interpreted on CPU) and the PyTorch path that CPU tensors take without the interpreter.
PATHS = {"kernels": contextlib.nullcontext, "reference": cpu_reference}


def make_inputs(batch_sizes, sample_shape, residual, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(batch_sizes), *sample_shape)
    channels = sample_shape[0]
    mean = torch.randn([1, channels] + [1] * (len(shape) - 2), generator=generator, dtype=torch.float64) * 2
    return {
        "x": torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5 + mean,
        "dy": torch.randn(shape, generator=generator, dtype=torch.float64),
        "residual": torch.randn(shape, generator=generator, dtype=torch.float64) if residual else None,
        "weight": torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5,
        "bias": torch.randn(channels, generator=generator, dtype=torch.float64),
    }


def local_slice(tensor, batch_sizes, rank):
    if tensor is None:
        return None
    start = sum(batch_sizes[:rank])
    return tensor[start : start + batch_sizes[rank]]


def run_rank(rank, world_size, init_file, batch_sizes, seed, results_dir):
    # Inherited from the parent's environment; set again so the kernels surely run interpreted.
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for path in PATHS:
            with PATHS[path]():
                results[path] = [run_case(rank, batch_sizes, seed + index, *case) for index, case in enumerate(CASES)]
        torch.save(results, os.path.join(results_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_case(rank, batch_sizes, seed, activation, residual, momentum, sample_shape):
    inputs = make_inputs(batch_sizes, sample_shape, residual, seed)
    layer = tritonbn.SyncBatchNormAct(sample_shape[0], momentum=momentum, dtype=torch.float64,
                                      activation=activation, negative_slope=NEGATIVE_SLOPE)
    with torch.no_grad():
        layer.weight.copy_(inputs["weight"])
        layer.bias.copy_(inputs["bias"])
    steps = []
    for _ in range(STEPS):
        x = local_slice(inputs["x"], batch_sizes, rank).clone().requires_grad_()
        res = local_slice(inputs["residual"], batch_sizes, rank)
        res = None if res is None else res.clone().requires_grad_()
        layer.zero_grad()
        y = layer(x, res)
        y.backward(local_slice(inputs["dy"], batch_sizes, rank))
        steps.append({
            "y": y.detach(), "dx": x.grad, "dresidual": None if res is None else res.grad,
            "dweight": layer.weight.grad.clone(), "dbias": layer.bias.grad.clone(),
        })
    layer.eval()
    eval_out = layer(local_slice(inputs["x"], batch_sizes, rank), local_slice(inputs["residual"], batch_sizes, rank))
    return {"steps": steps, "eval": eval_out, "state": layer.state_dict()}


def expected_case(batch_sizes, seed, activation, residual, momentum, sample_shape):
    """The same steps on the whole batch with nn.BatchNorm + torch ops in one process."""
    inputs = make_inputs(batch_sizes, sample_shape, residual, seed)
    bn = torch.nn.BatchNorm1d(sample_shape[0], momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(inputs["weight"])
        bn.bias.copy_(inputs["bias"])

    def forward(x, res):
        z = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training,
                         bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked), bn.eps)
        return TORCH_ACTIVATIONS[activation](z if res is None else z + res, NEGATIVE_SLOPE)

    steps = []
    for _ in range(STEPS):
        x = inputs["x"].clone().requires_grad_()
        res = None if inputs["residual"] is None else inputs["residual"].clone().requires_grad_()
        bn.zero_grad()
        bn.num_batches_tracked.add_(1)
        y = forward(x, res)
        y.backward(inputs["dy"])
        steps.append({
            "y": y.detach(), "dx": x.grad, "dresidual": None if res is None else res.grad,
            "dweight": bn.weight.grad.clone(), "dbias": bn.bias.grad.clone(),
        })
    bn.eval()
    return {"steps": steps, "eval": forward(inputs["x"], inputs["residual"]).detach(), "state": bn.state_dict()}


def check_against_single_process(world_size, batch_sizes):
    seed = int(torch.randint(0, 2**31, ()).item())
    with tempfile.TemporaryDirectory() as results_dir:
        init_file = os.path.join(results_dir, "init")
        mp.spawn(run_rank, args=(world_size, init_file, batch_sizes, seed, results_dir), nprocs=world_size)
        ranks = [torch.load(os.path.join(results_dir, f"rank{r}.pt")) for r in range(world_size)]
    for (index, case), path in itertools.product(enumerate(CASES), PATHS):
        expected = expected_case(batch_sizes, seed + index, *case)
        per_rank = [rank_results[path][index] for rank_results in ranks]
        for step, want in enumerate(expected["steps"]):
            got = [r["steps"][step] for r in per_rank]
            where = f"{path}, case {case}, step {step}"
            for key in ("y", "dx", "dresidual"):
                if want[key] is None:
                    assert all(g[key] is None for g in got)
                    continue
                torch.testing.assert_close(torch.cat([g[key] for g in got]), want[key], msg=lambda m, k=key, w=where:
                                           f"{w}, {k}: {m}")
            for key in ("dweight", "dbias"):  # local gradients, which DDP would then average
                torch.testing.assert_close(sum(g[key] for g in got), want[key], msg=lambda m, k=key, w=where:
                                           f"{w}, {k}: {m}")
        torch.testing.assert_close(torch.cat([r["eval"] for r in per_rank]), expected["eval"])
        for r in per_rank:
            torch.testing.assert_close(r["state"], expected["state"], msg=lambda m, c=case: f"state, {c}: {m}")


@pytest.mark.parametrize(("world_size", "batch_sizes"), [(2, (0, 5)), (3, (3, 0, 2))])
def test_matches_single_process_batch_norm(world_size, batch_sizes):
    check_against_single_process(world_size, batch_sizes)


def test_without_process_group_it_is_batch_norm_act():
    assert not dist.is_initialized()
    sync = tritonbn.SyncBatchNormAct(4, dtype=torch.float64, activation="elu")
    plain = tritonbn.BatchNormAct2d(4, dtype=torch.float64, activation="elu")
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.state_dict(), plain.state_dict())


def test_convert_sync_batchnorm_keeps_state():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), tritonbn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.3),
        torch.nn.BatchNorm2d(4),
    )
    bn = model[1]
    converted = tritonbn.convert_sync_batchnorm(model)
    sync = converted[1]
    assert type(sync) is tritonbn.SyncBatchNormAct
    assert (sync.activation, sync.negative_slope) == ("leaky_relu", 0.3)
    assert sync.weight is bn.weight and sync.running_var is bn.running_var
    assert type(converted[2]) is torch.nn.BatchNorm2d  # plain batch norms are left to nn.SyncBatchNorm
    single = tritonbn.convert_sync_batchnorm(tritonbn.BatchNormAct3d(2, momentum=None))
    assert type(single) is tritonbn.SyncBatchNormAct and single.momentum is None


def run_rejected_calls(rank, world_size, init_file, results_dir):
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        layer = tritonbn.SyncBatchNormAct(3, momentum=None, dtype=torch.float64)
        x = torch.randn(2, 3, 4, dtype=torch.float64)
        calls = {
            "channels": lambda: layer(torch.randn(2, 4, 4, dtype=torch.float64)),
            "dtype": lambda: layer(torch.ones(2, 3, 4, dtype=torch.long)),
            "residual": lambda: layer(x, torch.randn(2, 3, 1, dtype=torch.float64)),
            # One sample on rank 0, none on rank 1: one value per channel over the whole group.
            "one value": lambda: layer(torch.randn(1 - rank, 3, dtype=torch.float64)),
        }
        results = {}
        for name, call in calls.items():
            before = {key: value.clone() for key, value in layer.state_dict().items()}
            try:
                call()
                error = None
            except Exception as caught:  # noqa: BLE001 -- the test records which error each rank raised
                error = type(caught).__name__
            results[name] = (error, all(torch.equal(before[k], v) for k, v in layer.state_dict().items()))
        # The first accepted batch with momentum=None takes the group's statistics whole.
        local = torch.randn(2 + rank, 3, 5, dtype=torch.float64) * 2 + 1
        layer(local)
        results["accepted"] = (local, layer.state_dict())
        torch.save(results, os.path.join(results_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_rejected_calls_change_nothing_on_any_rank():
    with tempfile.TemporaryDirectory() as results_dir:
        init_file = os.path.join(results_dir, "init")
        mp.spawn(run_rejected_calls, args=(2, init_file, results_dir), nprocs=2)
        ranks = [torch.load(os.path.join(results_dir, f"rank{r}.pt")) for r in range(2)]
    expected_errors = {"channels": "ChannelMismatchError", "dtype": "InputDtypeError",
                       "residual": "ChannelMismatchError", "one value": "ValueError"}
    batch = torch.cat([results["accepted"][0] for results in ranks])
    for results in ranks:
        for name, error in expected_errors.items():
            assert results[name] == (error, True), name
        state = results["accepted"][1]
        assert int(state["num_batches_tracked"]) == 1
        torch.testing.assert_close(state["running_mean"], batch.mean((0, 2)))
        torch.testing.assert_close(state["running_var"], batch.transpose(0, 1).reshape(3, -1).var(1))


def test_without_bias():
    sync = tritonbn.SyncBatchNormAct(4, bias=False, dtype=torch.float64, activation="silu")
    plain = tritonbn.BatchNormAct1d(4, bias=False, dtype=torch.float64, activation="silu")
    assert sync.bias is None and list(sync.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        sync.weight.uniform_(0.5, 2.0)
        plain.weight.copy_(sync.weight)
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(sync(x), plain(x))
    converted = tritonbn.convert_sync_batchnorm(plain)
    assert type(converted) is tritonbn.SyncBatchNormAct and converted.bias is None
