"""SyncBatchNormAct in gloo groups of 2 and 3 processes on a CPU against one process on the concatenated batch.

One spawn per group size runs everything in its ranks, since starting processes is the slow part: the layer
on its own (forward, every gradient, running statistics, eval, activation checkpointing) on the kernels and on
the PyTorch pieces; a small conv net converted with tritonbn.fuse and convert_sync_batchnorm (with timm's
batch norm + activation, one of them converted the way timm converts it) trained under
DistributedDataParallel; in the group of 2, torch.compile(fullgraph=True) of that net and the calls the layer
rejects. Batches are uneven; in the group of 3, rank 0 holds no samples at all.
"""

import contextlib

import pytest
import torch
from _helpers import TORCH_ACTIVATIONS
from ddp_net import STEPS, make_net, net_batches, sync_net, train
from group import run_in_group
from torch.utils.checkpoint import checkpoint

import tritonbn
from tritonbn.functional import cpu_reference

# The kernels (interpreted on a CPU) and the PyTorch pieces that CPU tensors take without the interpreter.
PATHS = {"kernels": contextlib.nullcontext, "reference": cpu_reference}
NEGATIVE_SLOPE = 0.2
# (activation, with residual, momentum, one sample's shape, dtype, mean offset)
CASES = [
    ("relu", True, 0.1, (3, 4, 5), torch.float64, 0.0),
    ("leaky_relu", False, None, (3, 6), torch.float64, 0.0),
    ("gelu", False, 0.3, (4, 3), torch.float32, 1e4),  # the merge across ranks must be as precise as one rank
]
GROUPS = {2: (1, 4), 3: (0, 3, 2)}  # samples per rank


def make_inputs(batch_sizes, case, seed):
    _, residual, _, sample_shape, dtype, offset = case
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(batch_sizes), *sample_shape)
    channels = sample_shape[0]
    mean = torch.randn([1, channels] + [1] * (len(shape) - 2), generator=generator, dtype=torch.float64) * 2
    values = {
        "x": torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5 + mean + offset,
        "dy": torch.randn(shape, generator=generator, dtype=torch.float64),
        "residual": torch.randn(shape, generator=generator, dtype=torch.float64) if residual else None,
        "weight": torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5,
        "bias": torch.randn(channels, generator=generator, dtype=torch.float64),
    }
    return {name: None if t is None else t.to(dtype) for name, t in values.items()}


def local_slice(tensor, batch_sizes, rank):
    if tensor is None:
        return None
    start = sum(batch_sizes[:rank])
    return tensor[start : start + batch_sizes[rank]]


def steps_of(layer, inputs, take, checkpointed):
    """Two training steps of ``layer`` (with ``checkpointed`` the second under activation checkpointing, whose
    recomputed forward must not update the running statistics again), then an eval call; ``take`` picks the
    layer's share of a batch."""
    steps = []
    for step in range(2):
        x = take(inputs["x"]).clone().requires_grad_()
        res = take(inputs["residual"])
        res = None if res is None else res.clone().requires_grad_()
        layer.zero_grad()
        y = checkpoint(layer, x, res, use_reentrant=False) if checkpointed and step else layer(x, res)
        y.backward(take(inputs["dy"]))
        steps.append({"y": y.detach(), "dx": x.grad, "dresidual": None if res is None else res.grad,
                      "dweight": layer.weight.grad.clone(), "dbias": layer.bias.grad.clone()})
    layer.eval()
    eval_out = layer(take(inputs["x"]), take(inputs["residual"])).detach()
    return {"steps": steps, "eval": eval_out, "state": {k: v.clone() for k, v in layer.state_dict().items()}}


def layer_results(rank, batch_sizes, seed, case, layer_class):
    activation, _, momentum, sample_shape, dtype, _ = case
    inputs = make_inputs(batch_sizes, case, seed)
    layer = layer_class(sample_shape[0], momentum=momentum, dtype=dtype, activation=activation,
                        negative_slope=NEGATIVE_SLOPE)
    with torch.no_grad():
        layer.weight.copy_(inputs["weight"])
        layer.bias.copy_(inputs["bias"])
    synchronized = layer_class is tritonbn.SyncBatchNormAct
    return steps_of(layer, inputs, lambda t: local_slice(t, batch_sizes, rank), checkpointed=synchronized)


def rejected_calls(rank):
    """Which error each bad call raised on this rank, whether it left the state alone; then a batch of one value
    per channel over the group (no rank can raise for it) and a first accepted batch with momentum=None."""
    layer = tritonbn.SyncBatchNormAct(3, momentum=None, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    calls = {
        "channels": lambda: layer(torch.randn(2, 4, 4, dtype=torch.float64)),
        "dtype": lambda: layer(torch.ones(2, 3, 4, dtype=torch.long)),
        "residual": lambda: layer(x, torch.randn(2, 3, 1, dtype=torch.float64)),
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
    one_value = tritonbn.SyncBatchNormAct(3, dtype=torch.float64)
    one_value(torch.randn(1 - rank, 3, dtype=torch.float64))
    results["one value"] = one_value.state_dict()
    local = torch.randn(2 + rank, 3, 5, dtype=torch.float64) * 2 + 1
    layer(local)
    results["accepted"] = (local, layer.state_dict())
    return results


def compiled_step(rank, world_size, seed):
    """torch.compile(fullgraph=True) of the converted net in the group, which raises at any graph break: one
    training step's output and gradients against eager's."""
    net = sync_net(make_net(seed))
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x, _ = net_batches(seed, (2, 2), rank)[0]
    outputs, grads = [], []
    for model in (compiled, net):
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in net.parameters()])
    return {"outputs": outputs, "grads": grads}


def rank_main(rank, world_size, batch_sizes, seed):
    results = {"layers": {}, "ddp": {}}
    for path, context in PATHS.items():
        with context():
            results["layers"][path] = [layer_results(rank, batch_sizes, seed + index, case, tritonbn.SyncBatchNormAct)
                                       for index, case in enumerate(CASES)]
            results["ddp"][path] = train(seed, batch_sizes, rank, world_size)
    if world_size == 2:
        results["compile"] = compiled_step(rank, world_size, seed)
        results["rejected"] = rejected_calls(rank)
    return results


def expected_layers(batch_sizes, seed, path):
    """Each case's steps on the whole batch in one process: float64 batch norm + torch ops (a float32 case:
    tritonbn's single-process layer, the precision to match)."""
    expected = []
    for index, case in enumerate(CASES):
        activation, _, momentum, sample_shape, dtype, _ = case
        if dtype == torch.float64:
            expected.append(layer_results(0, (sum(batch_sizes),), seed + index, case, TorchBatchNormAct))
        else:
            with PATHS[path]():
                expected.append(layer_results(0, (sum(batch_sizes),), seed + index, case, tritonbn.BatchNormAct1d))
    return expected


class TorchBatchNormAct(torch.nn.BatchNorm1d):
    """nn.BatchNorm1d + residual + activation in torch ops, a module like SyncBatchNormAct."""

    def __init__(self, num_features, *, activation, negative_slope, **options):
        super().__init__(num_features, **options)
        self.activation, self.negative_slope = activation, negative_slope

    def _check_input_dim(self, input):
        pass

    def forward(self, input, residual=None):
        z = super().forward(input)
        return TORCH_ACTIVATIONS[self.activation](z if residual is None else z + residual, self.negative_slope)


def assert_layers_match(ranks, batch_sizes, seed):
    for path in PATHS:
        for case, want in zip(CASES, expected_layers(batch_sizes, seed, path)):
            got_ranks = [rank["layers"][path][CASES.index(case)] for rank in ranks]
            where = f"{path}, {case[:3]}"
            for step, want_step in enumerate(want["steps"]):
                got_steps = [r["steps"][step] for r in got_ranks]
                got = {key: torch.cat([g[key] for g in got_steps]) for key in ("y", "dx")}
                got["dresidual"] = None if want_step["dresidual"] is None else torch.cat(
                    [g["dresidual"] for g in got_steps])
                # Weight and bias gradients are each rank's own, which DDP then averages: their sum is the batch's.
                got.update({key: sum(g[key] for g in got_steps) for key in ("dweight", "dbias")})
                check_close(got, want_step, case, f"{where}, step {step}")
            check_close(torch.cat([r["eval"] for r in got_ranks]), want["eval"], case, f"{where}, eval")
            for r in got_ranks:
                check_close(r["state"], want["state"], case, f"{where}, state")


def check_close(got, want, case, where):
    if case[4] == torch.float64:
        torch.testing.assert_close(got, want, msg=lambda message: f"{where}: {message}")
        return
    # float32 at a large mean (want: one process's float32 op): the group's statistics merged as precisely. Each
    # side rounds the mean 1e4 to float32 (6e-4 apart at most), so xhat may differ by ~1e-3 a value, and the
    # weight gradient adds a batch of such values times dz: 1e-2 absolute. (The merge's own precision is held to
    # the single-process op's error in tests/api/test_sync.py.)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2, msg=lambda message: f"{where}: {message}")


def assert_ddp_matches(ranks, batch_sizes, seed):
    want = train(seed, (sum(batch_sizes),), 0, 1, distributed=False)
    for path in PATHS:
        runs = [rank["ddp"][path] for rank in ranks]
        assert [len(run["losses"]) for run in runs] == [STEPS] * len(runs)
        losses = torch.stack([torch.stack(run["losses"]) for run in runs]).sum(0)  # each rank's share of the loss
        torch.testing.assert_close(losses, torch.stack(want["losses"]), msg=lambda m, p=path: f"{p}, losses: {m}")
        for run in runs:
            assert run["fused"] == want["fused"], run["fused"]
            torch.testing.assert_close(run["state"], want["state"], msg=lambda m, p=path: f"{p}, weights: {m}")


@pytest.mark.parametrize("world_size", sorted(GROUPS), ids=lambda size: f"{size} ranks")
def test_group_matches_one_process(world_size):
    batch_sizes = GROUPS[world_size]
    seed = int(torch.randint(0, 2**31, ()))
    ranks = run_in_group(world_size, rank_main, batch_sizes, seed)
    assert_layers_match(ranks, batch_sizes, seed)
    assert_ddp_matches(ranks, batch_sizes, seed)
    if world_size == 2:
        for rank in ranks:
            compiled = rank["compile"]
            torch.testing.assert_close(compiled["outputs"][0], compiled["outputs"][1])
            torch.testing.assert_close(compiled["grads"][0], compiled["grads"][1])
        assert_rejected_calls([rank["rejected"] for rank in ranks])


def assert_rejected_calls(ranks):
    expected_errors = {"channels": "ChannelMismatchError", "dtype": "InputDtypeError",
                       "residual": "ChannelMismatchError"}
    batch = torch.cat([results["accepted"][0] for results in ranks])
    for results in ranks:
        for name, error in expected_errors.items():
            assert results[name] == (error, True), name
        one_value = results["one value"]  # as nn.SyncBatchNorm in a group: variance 0, unbiased 0 / 0
        assert one_value["running_var"].isnan().all() and one_value["running_mean"].isfinite().all()
        state = results["accepted"][1]
        assert int(state["num_batches_tracked"]) == 1
        torch.testing.assert_close(state["running_mean"], batch.mean((0, 2)))
        torch.testing.assert_close(state["running_var"], batch.transpose(0, 1).reshape(3, -1).var(1))

