"""Host time of a training call against its floor: what a Python ``autograd.Function`` costs before any work.

``tritonbn-perf host-floor`` times three ways of running batch norm + ReLU forward, then backward through
``torch.autograd.grad``, on the same host and in interleaved batches (a shared machine's noise hits all alike):
- eager: ``F.batch_norm`` + ``F.relu``, PyTorch's whole path;
- floor: an ``autograd.Function`` that allocates exactly what a fused call allocates (forward: the output and
  one workspace, kept on the context; backward: dx, the weight and bias gradients and one workspace) and does
  nothing else: the least that any design built on an autograd.Function called from Python can cost;
- tritonbn: ``tritonbn.batch_norm_act``, and its launches alone (those of one call, replayed with its arguments:
  on CUDA the share the launches take of its host time).

On a CPU the kernels run under Triton's interpreter with every launch skipped whole (as
../shared/tools/hostcost.py does), so tritonbn's row is its host work without launches, and eager runs on a
tiny tensor so that its arithmetic is negligible. On CUDA launches are real and asynchronous: tensors are small,
so the device keeps up, and a row is the wall time of issuing many calls, synchronised once at the end.
"""

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import backend, functional

SHAPE = (8, 64, 7, 7)


class NoKernelPath(RuntimeError):
    """CPU tensors take the PyTorch reference in this process (Triton was imported compiled)."""


class _FloorFunction(torch.autograd.Function):
    """Allocates what a fused training call allocates and computes nothing."""

    @staticmethod
    def forward(ctx, x, weight, bias, workspaces):
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = torch.empty(workspaces[0], device=x.device)
        ctx.workspaces = workspaces
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias = ctx.saved_tensors
        if ctx.workspaces[1]:  # the sums, where they do not go into the forward's workspace
            torch.empty(ctx.workspaces[1], device=x.device)
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), None


@contextlib.contextmanager
def launches_skipped(device: torch.device):
    """Within: on a CPU every interpreted launch is counted and skipped (``count["launches"]``); on CUDA nothing
    changes. Triton's interpreter is restored on the way out. A plan binds its kernels' launch when it is made, so
    plans are made anew within, and forgotten on the way out."""
    count = {"launches": 0}
    if device.type != "cpu":
        yield count
        return
    import triton.runtime.interpreter as interpreter

    def skip(self, *args, **kwargs):
        count["launches"] += 1

    run = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = skip
    tritonbn.plans.clear()
    try:
        yield count
    finally:
        interpreter.InterpretedFunction.run = run
        tritonbn.plans.clear()


def _calls(device: torch.device) -> dict:
    """{name: (forward, forward + backward)}, each a function of no arguments."""
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    weight = torch.rand(SHAPE[1], device=device, requires_grad=True)
    bias = torch.randn(SHAPE[1], device=device, requires_grad=True)
    running_mean, running_var = torch.zeros(SHAPE[1], device=device), torch.ones(SHAPE[1], device=device)
    grad = torch.randn_like(x)
    eager_x = torch.randn(1, SHAPE[1], 1, 2, requires_grad=True) if device.type == "cpu" else x
    eager_grad = torch.randn_like(eager_x)
    plan = functional.prepare(x, running_mean, running_var, weight, bias, None, True, 1e-5, "relu")
    backward = plan.backward_plan(grad, weight, bias, None, (True,) * 3 + (False,))
    workspaces = (plan.workspace_numel, 0 if backward.sums_in_stats else backward.workspace_numel)

    def eager():
        return F.relu(F.batch_norm(eager_x, running_mean, running_var, weight, bias, True, 0.1, 1e-5))

    def floor():
        return _FloorFunction.apply(x, weight, bias, workspaces)

    def fused():
        return tritonbn.batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)

    def with_backward(forward, inputs, output_grad):
        return lambda: torch.autograd.grad(forward(), inputs, output_grad)

    fused_with_backward = with_backward(fused, (x, weight, bias), grad)
    launch_sets = _recorded_launches(fused_with_backward)  # the forward's, then the backward's

    def launch(recorded):
        from tritonbn.kernels.launch import launch_all

        def run():
            for args in recorded:
                launch_all(*args)
        return run

    return {"eager BN + ReLU": (eager, with_backward(eager, (eager_x, weight, bias), eager_grad)),
            "autograd.Function floor": (floor, with_backward(floor, (x, weight, bias), grad)),
            "tritonbn": (fused, fused_with_backward),
            "  of which its launches": (launch(launch_sets[:1]), launch(launch_sets))}


def _recorded_launches(call) -> list:
    """The arguments of every ``launch_all`` of one ``call`` (a plan's launches), in order, to replay them alone."""
    from tritonbn.kernels import backward, forward

    recorded, launch_all = [], forward.launch_all

    def record(*args):
        recorded.append(args)
        return launch_all(*args)

    forward.launch_all = backward.launch_all = record
    try:
        call()
    finally:
        forward.launch_all = backward.launch_all = launch_all
    return recorded


def _per_call_us(fn, calls: int, sync) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def measure(device: torch.device, calls: int = 2000, batches: int = 9) -> list[dict]:
    """One row per way: median host microseconds per call of forward and of forward + backward over
    ``batches`` interleaved batches of ``calls`` calls, backward as their difference, forward + backward over
    eager's from the same batches (median of the batches' ratios), and the launches of one call (skipped on a
    CPU, None where not counted)."""
    if not backend.device_uses_kernels(device):
        raise NoKernelPath("host-floor times the kernel path, and Triton was loaded compiled: on a CPU run it "
                           "with TRITON_INTERPRET=1 in the environment")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # eager's tiny CPU ops would pay for waking the intra-op thread pool
    try:
        return _measure(device, calls, batches, sync)
    finally:
        torch.set_num_threads(threads)


def _measure(device, calls, batches, sync):
    with launches_skipped(device) as count:
        ways = _calls(device)
        launches = {}
        for name, (forward, forward_backward) in ways.items():
            for fn in (forward, forward_backward):
                for _ in range(20):  # warm-up: plans, compilation, allocator
                    fn()
            sync()
            count["launches"] = 0
            forward_backward()
            launches[name] = count["launches"] if device.type == "cpu" else None
        samples = {name: ([], []) for name in ways}
        for _ in range(batches):
            for name, fns in ways.items():
                for sample, fn in zip(samples[name], fns):
                    sample.append(_per_call_us(fn, calls, sync))
    eager_total = samples["eager BN + ReLU"][1]
    rows = []
    for name, (forward, total) in samples.items():
        rows.append({"way": name, "forward_us": statistics.median(forward), "total_us": statistics.median(total),
                     "backward_us": statistics.median(total) - statistics.median(forward),
                     "vs_eager": statistics.median(t / e for t, e in zip(total, eager_total)),
                     "launches": launches[name]})
    return rows


def format_table(rows: list[dict], device: torch.device) -> str:
    where = "CPU, kernels interpreted, every launch skipped" if device.type == "cpu" else f"{device}, real launches"
    lines = [f"host us per training call ({where}); fwd+bwd over eager's: median of interleaved batches",
             f"{'':<26}{'forward':>9}{'backward':>10}{'fwd+bwd':>9}{'vs eager':>10}{'launches':>10}"]
    for row in rows:
        launches = "-" if row["launches"] is None else str(row["launches"])
        lines.append(f"{row['way']:<26}{row['forward_us']:>9.1f}{row['backward_us']:>10.1f}{row['total_us']:>9.1f}"
                     f"{row['vs_eager']:>9.2f}x{launches:>10}")
    return "\n".join(lines)
