"""A synchronized training step captured in a CUDA graph and replayed with new inputs, against eager: the
collectives (NCCL) and every piece are capturable because nothing in a call waits for a device value.

CUDA only, in an NCCL group of this process alone (one GPU: the synchronized op runs both collectives in a
group of one too). On a CPU these tests are reported as skipped, not passed; there the absence of host syncs
is shown by construction and counted (tests/api/test_sync.py).
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import tritonbn
from tritonbn.sync import sync_batch_norm_act

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                                reason="CUDA graphs and NCCL need a CUDA device")


@pytest.fixture
def nccl_group_of_one():
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(folder, 'init')}", rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device()))
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def step(layer, x, residual, dy):
    """A synchronized forward and backward of ``layer``'s parameters and buffers (momentum=None: the counter)."""
    layer.num_batches_tracked.add_(1)
    y = sync_batch_norm_act(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                            layer.num_batches_tracked, layer.eps, activation=layer.activation, residual=residual)
    y.backward(dy)
    return y


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_captured_synchronized_step_replays_like_eager(nccl_group_of_one, memory_format):
    torch.manual_seed(0)
    layer = tritonbn.SyncBatchNormAct(16, momentum=None, activation="silu", device="cuda")
    eager = tritonbn.SyncBatchNormAct(16, momentum=None, activation="silu", device="cuda")
    eager.load_state_dict(layer.state_dict())
    shape = (8, 16, 12, 12)
    static_x = torch.randn(shape, device="cuda").to(memory_format=memory_format).requires_grad_()
    static_r = torch.randn(shape, device="cuda").to(memory_format=memory_format)
    static_dy = torch.randn(shape, device="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: plans, compilation, NCCL's first calls
        for _ in range(2):
            step(layer, static_x, static_r, static_dy)
            step(eager, static_x.detach().clone().requires_grad_(), static_r, static_dy)
    torch.cuda.current_stream().wait_stream(side)
    # Gradients None at capture: the graph writes them afresh each replay instead of adding to them.
    static_x.grad = layer.weight.grad = layer.bias.grad = None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(layer, static_x, static_r, static_dy)

    for _ in range(3):
        x = torch.randn(shape, device="cuda").to(memory_format=memory_format)
        static_x.data.copy_(x)
        static_r.copy_(torch.randn(shape, device="cuda"))
        static_dy.copy_(torch.randn(shape, device="cuda"))
        graph.replay()
        eager_x = x.clone().requires_grad_()
        eager.weight.grad = eager.bias.grad = None
        expected = step(eager, eager_x, static_r, static_dy)
        torch.testing.assert_close(static_y, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(static_x.grad, eager_x.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.running_mean, eager.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, eager.running_var, rtol=1e-5, atol=1e-6)
        assert int(layer.num_batches_tracked) == int(eager.num_batches_tracked)


def test_no_host_sync_on_the_synchronized_path(nccl_group_of_one):
    """torch.cuda's sync debug mode raises at any synchronising call in a forward and backward."""
    layer = tritonbn.SyncBatchNormAct(8, momentum=None, device="cuda")
    x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)
    step(layer, x, None, torch.randn_like(x))  # first call: planning and compilation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(layer, x, None, torch.randn_like(x))
    finally:
        torch.cuda.set_sync_debug_mode("default")
