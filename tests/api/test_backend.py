"""Which code runs a call: decided once, as Triton decides whether its kernels are interpreted."""

import os
import subprocess
import sys
import textwrap

import torch

import tritonbn


def _run(code: str, interpret: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_setting_the_variable_after_the_kernels_exist_changes_nothing():
    """The perf CLI used to set TRITON_INTERPRET at run time, after the kernels were compiled-or-interpreted:
    CPU tensors then reached compiled kernels. Now the first decision holds, and CPU tensors where the kernels
    are compiled take the reference."""
    out = _run("""
        import os, torch, tritonbn
        import tritonbn.kernels  # defines the kernels: compiled, since TRITON_INTERPRET is unset
        os.environ["TRITON_INTERPRET"] = "1"
        x = torch.randn(4, 3, 2, 2)
        y = tritonbn.batch_norm_act(x, None, None, training=True)
        ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
        print(tritonbn.uses_kernels(x), tritonbn.kernels.INTERPRETED, torch.allclose(y, ref, atol=1e-5))
    """, interpret=None)
    assert out == "False False True"


def test_variable_set_before_the_kernels_are_defined_interprets_them():
    out = _run("""
        import os, torch, tritonbn
        os.environ["TRITON_INTERPRET"] = "1"  # after import tritonbn, before any kernel is defined
        x = torch.randn(4, 3, 2, 2)
        y = tritonbn.batch_norm_act(x, None, None, training=True)
        ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
        print(tritonbn.uses_kernels(x), tritonbn.kernels.INTERPRETED, torch.allclose(y, ref, atol=1e-5))
    """, interpret=None)
    assert out == "True True True"


def test_cpu_reference_is_a_context_variable():
    x = torch.randn(2, 3)
    before = tritonbn.uses_kernels(x)
    with tritonbn.cpu_reference():
        assert not tritonbn.uses_kernels(x)
        with tritonbn.cpu_reference():
            assert not tritonbn.uses_kernels(x)
        assert not tritonbn.uses_kernels(x)
    assert tritonbn.uses_kernels(x) == before


def test_variable_set_after_triton_itself_was_imported():
    """Triton's own library was then compiled, and interpreted kernels cannot call it: not interpreted."""
    out = _run("""
        import os, torch, triton, tritonbn
        os.environ["TRITON_INTERPRET"] = "1"
        x = torch.randn(4, 3, 2, 2)
        y = tritonbn.batch_norm_act(x, None, None, training=True)
        ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
        print(tritonbn.uses_kernels(x), torch.allclose(y, ref, atol=1e-5))
    """, interpret=None)
    assert out == "False True"
