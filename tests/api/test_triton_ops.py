"""torch.compile's GPU path, checked at trace level on any machine: the triton ops' graphs hold the kernels
themselves (Triton kernel wrappers), the running statistics' update, and no tritonbn op; Inductor's analysis
of which arguments each kernel writes succeeds.

Tracing needs the kernels compiled, not interpreted (the op bodies run on fake tensors), so the checks run in
a fresh process without TRITON_INTERPRET, on meta tensors (nothing is launched), with a stand-in GPU driver
that only names the compile target (the analysis lowers each kernel to TTIR for it). The numbers of the triton
op path are checked on CUDA, in the process itself (test_compile.py's tests run it there).
"""

import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import logging, sys, torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import get_mutated_tensors, kernel_side_table
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.functional_tensor import dispatch_functionalize
    import triton
    from triton.backends.compiler import GPUTarget
    from tritonbn import ops
    from tritonbn.perf.compile_check import _CompileOnlyDriver

    triton.runtime.driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", 90, 32)))
    warnings = []
    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    logging.getLogger("torch._dynamo").addHandler(Catch(logging.WARNING))

    residual_on, dynamic, training = (arg == "1" for arg in sys.argv[1:4])
    def step(x, w, b, rm, rv, r):
        return ops.CompiledBatchNormAct.apply(x, w, b, r, rm, rv, None, training, 0.1, 1e-5, "relu", 0.01)

    def inputs(n):
        x = torch.randn(n, 6, 5, 7, device="meta").to(memory_format=torch.channels_last).requires_grad_()
        w, b = torch.rand(6, device="meta", requires_grad=True), torch.randn(6, device="meta", requires_grad=True)
        r = torch.randn_like(x, requires_grad=True) if residual_on else None
        return x, w, b, torch.zeros(6, device="meta"), torch.ones(6, device="meta"), r

    graphs = {"fw": [], "bw": []}
    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return gm.forward
        return compiler
    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"), keep_inference_input_mutations=True)
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=dynamic)
    for n in (4, 9):  # a second batch size: a dynamic graph may not be specialized away from it
        args = inputs(n)
        y = compiled(*args)
        assert y.shape == args[0].shape and y.stride() == args[0].stride(), (y.shape, y.stride())
        y.sum().backward()

    def targets(gm):
        return [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
    for kind in ("fw", "bw"):
        for gm in graphs[kind]:
            print(kind, " ".join(targets(gm)))
            for node in gm.graph.nodes:  # Inductor's write analysis of every kernel in the graph
                if "triton_kernel_wrapper" in str(node.target):
                    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                    constants = kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])
                    kwargs = {k: v.meta["val"] if isinstance(v, torch.fx.Node) else v
                              for k, v in node.kwargs["kwargs"].items()}
                    written = get_mutated_tensors(node.kwargs["kernel_idx"], node.kwargs["constant_args_idx"],
                                                  kwargs, node.kwargs["tma_descriptor_metadata"])
                    print("writes", kind, sorted(written))
    # make_fx with fake tensors, functionalized as AOTAutograd does: the kernels are in the graph too.
    traced = make_fx(dispatch_functionalize(lambda *a: step(*a)), tracing_mode="fake")(*inputs(4))
    print("make_fx", " ".join(targets(traced)))
    print("fallback", any("assuming every input is mutated" in w for w in warnings))
""")


def _capture(residual, dynamic, training):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *(str(int(v)) for v in (residual, dynamic, training))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    graphs = {kind: [line.split()[1:] for line in lines if line.startswith(kind + " ")] for kind in ("fw", "bw")}
    writes = [set(ast.literal_eval(line.split(None, 2)[2])) for line in lines if line.startswith("writes ")]
    make_fx = next(line.split()[1:] for line in lines if line.startswith("make_fx"))
    return graphs, writes, make_fx, "fallback True" in lines


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="this torch has no triton_op")
@pytest.mark.parametrize(("residual", "dynamic", "training"), [
    pytest.param(False, False, True, id="static-train"),
    pytest.param(True, True, True, id="dynamic-train-residual"),
    pytest.param(True, False, False, id="static-eval-residual"),
    pytest.param(False, True, False, id="dynamic-eval"),
])
def test_compiled_graphs_launch_the_kernels_themselves(residual, dynamic, training):
    graphs, writes, make_fx, fell_back = _capture(residual, dynamic, training)
    assert graphs["fw"] and graphs["bw"]
    for kind, graph_targets in graphs.items():
        for targets in graph_targets:
            assert not any(t.startswith("tritonbn.") for t in targets), targets  # no Python op left
            wrappers = [t for t in targets if "triton_kernel_wrapper" in t]
            assert len(wrappers) == (2 if kind == "bw" or training else 1), targets
    for targets in graphs["fw"]:  # the running statistics are written back into the module's buffers
        assert ("aten.copy_.default" in targets) == training, targets
    assert sum("triton_kernel_wrapper" in t for t in make_fx) == (2 if training else 1), make_fx
    assert not fell_back, "Inductor could not tell which arguments a kernel writes"
    # Each kernel writes its outputs, workspace, counters and (training forward) the running statistics; never
    # what it only reads.
    assert writes and all(written.isdisjoint({"x_ptr", "dy_ptr", "weight_ptr", "bias_ptr", "residual_ptr"})
                          for written in writes), writes
    assert ({"running_mean_ptr", "running_var_ptr"} <= set().union(*writes)) == training, writes
