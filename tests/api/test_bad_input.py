"""Every bad input gets a clear error, and a rejected call changes nothing."""

import pytest
import torch
from _helpers import make_case

import tritonbn

ANY_ERROR = (ValueError, TypeError, RuntimeError)


def snapshot(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_unchanged(module, before):
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), f"rejected call changed {name}"


def assert_module_rejects(module, call, errors, match):
    """`call(module)` raises one of `errors` whose message matches, and the module's state stays put."""
    before = snapshot(module)
    with pytest.raises(errors, match=match):
        call(module)
    assert_unchanged(module, before)


def trained_module(cls, num_features, device, **kwargs):
    """A module whose running stats are no longer at their initial values, so a change would show."""
    module = cls(num_features, device=device, **kwargs)
    shape = {
        tritonbn.BatchNormAct1d: (6, num_features),
        tritonbn.BatchNormAct2d: (3, num_features, 4, 4),
        tritonbn.BatchNormAct3d: (2, num_features, 2, 3, 3),
    }[cls]
    module(torch.randn(shape, device=device) * 3 + 1)
    return module


@pytest.mark.parametrize(
    ("cls", "shape", "message"),
    [
        (tritonbn.BatchNormAct2d, (2, 4, 5), r"expected 4D input \(got 3D input\)"),
        (tritonbn.BatchNormAct2d, (2, 4, 5, 5, 5), r"expected 4D input \(got 5D input\)"),
        (tritonbn.BatchNormAct1d, (2, 4, 5, 5), r"expected 2D or 3D input \(got 4D input\)"),
        (tritonbn.BatchNormAct3d, (2, 4, 5, 5), r"expected 5D input \(got 4D input\)"),
    ],
    ids=["2d_given_3D", "2d_given_5D", "1d_given_4D", "3d_given_4D"],
)
def test_wrong_rank_for_module(device, cls, shape, message):
    module = trained_module(cls, 4, device)
    assert_module_rejects(module, lambda m: m(torch.randn(shape, device=device)), ValueError, message)


def test_channel_count_mismatch_in_module(device):
    module = trained_module(tritonbn.BatchNormAct2d, 4, device)
    x = torch.randn(2, 5, 3, 3, device=device)
    # The message must give both counts, whatever the wording.
    assert_module_rejects(module, lambda m: m(x), ANY_ERROR, r"(?s)(4.*5|5.*4)")


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1)], ids=["2D", "3D", "4D"])
def test_single_value_per_channel_in_training(device, shape):
    cls = tritonbn.BatchNormAct2d if len(shape) == 4 else tritonbn.BatchNormAct1d
    module = trained_module(cls, 4, device)
    x = torch.randn(shape, device=device)
    assert_module_rejects(module, lambda m: m(x), ValueError, "Expected more than 1 value per channel when training")


def test_single_value_per_channel_is_fine_in_eval(device):
    module = trained_module(tritonbn.BatchNormAct1d, 4, device).eval()
    x = torch.randn(1, 4, device=device)
    y = module(x)
    expected = torch.relu(
        (x - module.running_mean) / torch.sqrt(module.running_var + module.eps) * module.weight + module.bias
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_non_floating_input(device, dtype):
    module = trained_module(tritonbn.BatchNormAct2d, 4, device)
    x = torch.randint(0, 2, (2, 4, 3, 3), device=device).to(dtype)
    assert_module_rejects(module, lambda m: m(x), ANY_ERROR, r"(?i)float")


def test_residual_of_another_shape(device):
    module = trained_module(tritonbn.BatchNormAct2d, 4, device)
    x = torch.randn(2, 4, 3, 3, device=device)
    residual = torch.randn(2, 4, 3, 2, device=device)
    assert_module_rejects(module, lambda m: m(x, residual), ANY_ERROR, r"(?i)residual")


def test_residual_broadcastable_but_not_same_shape(device):
    """A residual that would broadcast is still the wrong shape: the fused add is elementwise."""
    module = trained_module(tritonbn.BatchNormAct2d, 4, device)
    x = torch.randn(2, 4, 3, 3, device=device)
    residual = torch.randn(1, 4, 1, 1, device=device)
    assert_module_rejects(module, lambda m: m(x, residual), ANY_ERROR, r"(?i)residual")


def test_unknown_activation_at_construction():
    with pytest.raises(ValueError, match="tanh_like") as error:
        tritonbn.BatchNormAct1d(3, activation="tanh_like")
    assert all(name in str(error.value) for name in tritonbn.ACTIVATIONS)


def test_unknown_activation_in_functional(device):
    case = make_case((3, 4, 5), torch.float32, device)
    before = case.running_mean.clone(), case.running_var.clone()
    with pytest.raises(ValueError, match="softsign") as error:
        tritonbn.batch_norm_act(case.x, case.running_mean, case.running_var, training=True, activation="softsign")
    assert all(name in str(error.value) for name in tritonbn.ACTIVATIONS)
    assert torch.equal(case.running_mean, before[0]) and torch.equal(case.running_var, before[1])


def functional_call(case, **overrides):
    arguments = dict(
        running_mean=case.running_mean,
        running_var=case.running_var,
        weight=case.weight,
        bias=case.bias,
        training=True,
        residual=case.residual,
    )
    arguments.update(overrides)
    return tritonbn.batch_norm_act(case.x, **arguments)


def assert_functional_rejects(case, errors, match, **overrides):
    before = case.running_mean.clone(), case.running_var.clone()
    with pytest.raises(errors, match=match):
        functional_call(case, **overrides)
    assert torch.equal(case.running_mean, before[0]), "rejected call changed running_mean"
    assert torch.equal(case.running_var, before[1]), "rejected call changed running_var"


@pytest.mark.parametrize("tensor", ["running_mean", "running_var", "weight", "bias"])
def test_functional_channel_count_mismatch(device, tensor):
    case = make_case((3, 5, 4, 4), torch.float32, device)
    wrong = torch.rand(4, device=device) + 0.5
    assert_functional_rejects(case, ANY_ERROR, r"(?s)(4.*5|5.*4)", **{tensor: wrong})


def test_functional_single_value_per_channel(device):
    case = make_case((1, 5), torch.float32, device)
    assert_functional_rejects(case, ValueError, "Expected more than 1 value per channel when training")


def test_functional_residual_of_another_shape(device):
    case = make_case((3, 5, 4, 4), torch.float32, device)
    assert_functional_rejects(case, ANY_ERROR, r"(?i)residual", residual=torch.randn(3, 5, 4, device=device))


# The message must name the device or both devices involved ("weight is on meta but the input is on cpu").
DEVICE_MESSAGE = r"(?i)device|(cpu|cuda|meta).*(cpu|cuda|meta)"


def other_device(device):
    """A second device to mix with `device`: CUDA and CPU where both exist, else PyTorch's meta device,
    which holds no data but is still a different device that every input check must refuse."""
    if device == "cuda":
        return "cpu"
    return "meta"


@pytest.mark.parametrize("tensor", ["running_mean", "weight", "residual"])
def test_tensors_on_different_devices(device, tensor):
    case = make_case((3, 5, 4, 4), torch.float32, device, residual=True)
    elsewhere = getattr(case, tensor).to(other_device(device))
    assert_functional_rejects(case, ANY_ERROR, DEVICE_MESSAGE, **{tensor: elsewhere})


def test_module_on_other_device_than_input(device):
    module = trained_module(tritonbn.BatchNormAct2d, 4, device)
    x = torch.randn(2, 4, 3, 3, device=other_device(device))
    assert_module_rejects(module, lambda m: m(x), ANY_ERROR, DEVICE_MESSAGE)
