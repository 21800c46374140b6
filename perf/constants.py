"""The values the harness measures over, named once: the CLI offers them as choices, the sweep crosses them,
its CSV rows hold them, and the report and README block list results in their order.

Activation names are tritonbn's own (`activations()`), not listed here. Importing this module imports
neither torch nor tritonbn (`activations()` imports tritonbn when called), as the CLI's own imports do not.
"""

MODES = ("fwd", "bwd", "fwd_bwd", "eval")  # training forward, backward, both in one step, eval forward
# Short name -> torch attribute: names rather than torch dtypes keep this module free of torch.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
LAYOUTS = ("nchw", "nhwc")  # nhwc = channels_last (channels_last_3d for 5-D shapes)
# Every backend a sweep can compare, in the order reports list them; the optional ones, other libraries, run
# only where they are installed.
BACKENDS = ("tritonbn", "eager", "compile", "flag_gems", "apex")
OPTIONAL_BACKENDS = ("flag_gems", "apex")
BASELINES = ("eager", "compile")  # the backends speedups are taken over
TIME_KINDS = ("e2e", "device")  # end to end (host stalls included) and device only


def activations() -> tuple[str, ...]:
    """tritonbn's activation names, from the package's registry (`tritonbn.ACTIVATIONS`)."""
    from tritonbn import ACTIVATIONS

    return tuple(ACTIVATIONS)
