"""Shared pytest setup: pick the device and make CPU runs exercise the Triton kernels.

Without CUDA the kernels run under Triton's interpreter, which is switched on by TRITON_INTERPRET=1.
Triton reads that variable when a kernel is decorated, so it must be set before `tritonbn.kernels` (or
triton itself) is imported; conftest.py is imported before any test module, and importing torch does
not import triton.
"""

import os
import random
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _patch_the_language_once_per_launch():
    """Triton's interpreter patches triton.language for a launch (inspect.getmembers over its modules, about a
    millisecond), then again on every call of a nested jit function (a tile's offsets, an activation), although
    the launch's patch is still in place. That repetition is a third of the suite's time. Here a nested call
    skips it when the modules its function sees are patched already; a launch patches and restores as before.
    On a Triton whose interpreter lacks these internals the suite runs as it is, only slower."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter

        patch_lang = interpreter._patch_lang
        is_builtin = tl.core.is_builtin
    except (ImportError, AttributeError):
        return

    class AlreadyPatched:
        def restore(self):
            pass

    def patch_unless_patched(fn):
        langs = [value for value in fn.__globals__.values() if value is tl or value is tl.core]
        if langs and not any(is_builtin(getattr(lang, "load", None)) for lang in langs):
            return AlreadyPatched()
        return patch_lang(fn)

    interpreter._patch_lang = patch_unless_patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def pytest_addoption(parser):
    parser.addoption("--reference-path", action="store_true",
                     help="run CPU tensors through tritonbn.cpu_reference(), the PyTorch path every CPU user without "
                          "TRITON_INTERPRET gets (tests marked `kernels` are about the kernels: deselect them with "
                          "-m 'not kernels')")


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels: about the Triton kernels themselves (not the reference path)")


@pytest.fixture(autouse=True)
def reference_path(request):
    """Under --reference-path, every test runs inside tritonbn.cpu_reference()."""
    if not request.config.getoption("--reference-path"):
        yield
        return
    import tritonbn

    with tritonbn.cpu_reference():
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_seed():
    """Seed each test from fresh entropy and print the seed, which pytest shows when a test fails.

    Set TRITONBN_TEST_SEED to replay a failing draw.
    """
    seed = int(os.environ.get("TRITONBN_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"seed={seed} (replay with TRITONBN_TEST_SEED={seed})")
    return seed


_STARTED = pytest.StashKey[float]()
_COLLECTED = pytest.StashKey[bool]()


def pytest_sessionstart(session):
    """A line before pytest-xdist's workers start: which path runs, and why nothing else prints for a while."""
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if hasattr(config, "workerinput") or reporter is None:
        return
    config.stash[_STARTED] = time.monotonic()
    path = "the compiled Triton kernels on cuda" if torch.cuda.is_available() else \
        "the Triton kernels under Triton's interpreter, on the CPU (no GPU here)"
    workers = getattr(config.option, "numprocesses", None)
    wait = f"; {workers} workers start by importing torch and collecting every test" if workers else ""
    reporter.write_line(f"tritonbn tests: {path}{wait}")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Under pytest-xdist: when the first worker has collected, how many tests and how long it took."""
    config = node.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or _STARTED not in config.stash or config.stash.get(_COLLECTED, False):
        return
    config.stash[_COLLECTED] = True
    seconds = time.monotonic() - config.stash[_STARTED]
    reporter.write_line(f"{node.gateway.id} collected {len(ids)} tests in {seconds:.0f} s")


# Tests marked ``timm`` need the real timm package: they run wherever it imports and are deselected (counted
# as deselected, never as passed or skipped) wherever it does not, and the run's summary says which.  timm
# needs torchvision, which a CPU build of torch may lack, so being installed is not enough: it must import.
# Under pytest-xdist the workers collect and the controller prints and counts: a worker sends the timm line and
# every test it deselected (timm's, and those of -m or -k) in its workeroutput, and the controller counts the
# first worker's, as every worker collects every test.
_TIMM_LINE = pytest.StashKey[str]()
_COUNTED = pytest.StashKey[bool]()


def _timm_import() -> tuple[str | None, str]:
    """(timm's version, "") where it imports, else (None, why not)."""
    try:
        import timm
    except Exception as error:  # noqa: BLE001 -- any failure to import (torchvision's included) means no timm
        return None, f"{type(error).__name__}: {error}"
    return timm.__version__, ""


def pytest_collection_modifyitems(config, items):
    needs_timm = [item for item in items if item.get_closest_marker("timm")]
    if not needs_timm:
        return
    version, why = _timm_import()
    if version is None:
        items[:] = [item for item in items if not item.get_closest_marker("timm")]
        config.hook.pytest_deselected(items=needs_timm)
        line = f"{len(needs_timm)} tests marked timm deselected: timm does not import here ({why})"
    else:
        line = f"{len(needs_timm)} tests marked timm collected, to run against timm {version}"
    if hasattr(config, "workeroutput"):
        config.workeroutput["timm"] = line
    else:
        config.stash[_TIMM_LINE] = line


def pytest_deselected(items):
    """On a pytest-xdist worker, note the deselected tests for the controller, whose summary counts them."""
    config = getattr(items[0], "config", None) if items else None  # the controller's items are node ids
    if config is not None and hasattr(config, "workeroutput"):
        config.workeroutput.setdefault("deselected", []).extend(item.nodeid for item in items)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    output = getattr(node, "workeroutput", {})
    if not output or node.config.stash.get(_COUNTED, False):
        return
    node.config.stash[_COUNTED] = True
    if output.get("timm"):
        node.config.stash[_TIMM_LINE] = output["timm"]
    if output.get("deselected"):
        node.config.hook.pytest_deselected(items=output["deselected"])


def pytest_terminal_summary(terminalreporter, config):
    if _TIMM_LINE in config.stash:
        terminalreporter.write_line(config.stash[_TIMM_LINE])
