"""CUDA-graph capture of fused calls: nothing in a call synchronises with the device or decides on a device
value, and no buffer is shared between calls, so a captured training step replays correctly with new
inputs. CUDA only (graphs are a CUDA feature): on a CPU these tests are reported as skipped, not passed."""

import pytest
import torch

import tritonbn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_captured_training_step_replays_like_eager(memory_format):
    torch.manual_seed(0)
    layer = tritonbn.BatchNormAct2d(16, device="cuda")
    plain = torch.nn.BatchNorm2d(16, device="cuda")
    plain.load_state_dict(layer.state_dict())
    shape = (8, 16, 12, 12)
    static_x = torch.randn(shape, device="cuda").to(memory_format=memory_format).requires_grad_()
    static_r = torch.randn(shape, device="cuda").to(memory_format=memory_format)
    static_g = torch.randn(shape, device="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream: plans, compilation, first launches
            layer(static_x, static_r).backward(static_g)
            torch.relu(plain(static_x) + static_r).backward(static_g)
    torch.cuda.current_stream().wait_stream(stream)
    static_x.grad = None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x, static_r)
        static_y.backward(static_g)

    for _ in range(3):
        x = torch.randn(shape, device="cuda")
        static_x.data.copy_(x)
        static_r.copy_(torch.randn(shape, device="cuda"))
        static_g.copy_(torch.randn(shape, device="cuda"))
        graph.replay()
        expected_x = x.clone().to(memory_format=memory_format).requires_grad_()
        expected = torch.relu(plain(expected_x) + static_r)
        expected.backward(static_g)
        torch.testing.assert_close(static_y, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(static_x.grad, expected_x.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.running_mean, plain.running_mean, rtol=1e-5, atol=1e-6)
        static_x.grad.zero_()


def test_reduce_overhead_compile_matches_eager():
    torch._dynamo.reset()
    layer = tritonbn.BatchNormAct2d(8, device="cuda").eval()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 8, 6, 6, device="cuda")
        torch.testing.assert_close(compiled(x).clone(), layer(x))
