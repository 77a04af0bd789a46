"""The tracer's rules beyond the zoo, and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from qapfuse.fusion import (
    Segment,
    TracingError,
    UnsupportedOpError,
    permute,
    random_permutations,
    trace,
)
from qapfuse.fusion.models import MLP

X8 = torch.randn(3, 8)
XI = torch.randn(3, 3, 10, 10)


def preserved(model: nn.Module, x: torch.Tensor, seed: int = 1) -> float:
    model.eval()
    spec = trace(model, x)
    other = copy.deepcopy(model)
    other.load_state_dict(permute(model, spec, random_permutations(spec, seed)))
    with torch.no_grad():
        return (model(x) - other(x)).abs().max().item()


class Roll(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.roll(self.fc(x), 1, dims=-1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.fc(x)
        return self.out(self.attn(x, x, x)[0])


class SDPA(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = self.fc(x)
        return self.out(F.scaled_dot_product_attention(x, x, x))


class ChannelSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(self.conv(x)[:, :4])


class Grouped(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.grouped = nn.Conv2d(8, 16, 3, groups=groups)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.out(self.bn(self.grouped(F.relu(self.conv(x)))))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.out(x)


class Norm(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3), nn.GroupNorm(groups, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.norm(self.conv(x)))


@pytest.mark.parametrize(
    ("model", "x", "node", "op"),
    [
        (Roll(), X8, "roll", "call_function torch.roll"),
        (Attention(), torch.randn(3, 4, 8), "attn", "MultiheadAttention"),
        (SDPA(), torch.randn(3, 4, 8), "scaled_dot_product_attention", "scaled_dot_product"),
        (ChannelSlice(), XI, "getitem", "indexing along the channel axis"),
        (Grouped(2), XI, "grouped", "grouped convolution with groups=2"),
        (Shuffle(), XI, "view", "splits or mixes the channel axis"),
        (Norm(2), XI, "norm", "GroupNorm with num_groups=2"),
    ],
)
def test_unsupported_ops_raise_naming_node_and_op(model, x, node, op):
    with pytest.raises(UnsupportedOpError, match=f"fx node '{node}'") as info:
        trace(model, x)
    assert info.value.node == node
    assert op in str(info.value) and "PermutationSpec by hand" in str(info.value)


def test_unknown_op_on_fixed_channels_only_is_fine():
    class RollInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.roll(x, 1, dims=-1))

    spec = trace(RollInput(), X8)
    assert spec.axes["fc.weight"] == ((Segment("output"),), (Segment("fc.in"),))
    assert spec.free_groups == ()


def test_data_dependent_control_flow_says_so():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            x = self.fc(x)
            if x.sum() > 0:
                x = F.relu(x)
            return self.out(x)

    with pytest.raises(TracingError, match=r"data-dependent control flow.*PermutationSpec by hand"):
        trace(DataDependent(), X8)


def test_shape_dependent_control_flow_uses_the_concrete_fallback():
    class ShapeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = self.conv(x)
            if x.shape[-1] > 4:
                x = F.max_pool2d(x, 2)
            return self.out(x)

    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(ShapeDependent())
    assert trace(ShapeDependent(), XI).free_groups == ("conv",)
    assert preserved(ShapeDependent(), XI) < 1e-5


def test_model_and_input_that_do_not_run_together():
    with pytest.raises(TracingError, match=r"do not run together: fx node 'layers_0'.*Linear"):
        trace(MLP(8, (4,), 2), torch.zeros(2, 7))
    bad_norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5))
    with pytest.raises(TracingError, match=r"fx node '_1'.*BatchNorm2d.*running_mean"):
        trace(bad_norm, XI)
    bad_ln = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 9, 9]))
    with pytest.raises(TracingError, match=r"fx node '_1'.*LayerNorm"):
        trace(bad_ln, XI)
    with pytest.raises(TypeError, match="'example_input' parameter of trace"):
        trace(MLP(8, (4,), 2), [1, 2])
    with pytest.raises(TypeError, match="'model' parameter of trace"):
        trace(lambda x: x, X8)


def test_trace_restores_training_mode_and_leaves_buffers_alone():
    model = Grouped(8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, XI)
    assert model.training and model.bn.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "model",
    [Grouped(8), Norm(1), Norm(8)],
    ids=["depthwise_multiplier2", "groupnorm1", "groupnorm_per_channel"],
)
def test_depthwise_and_groupnorm_rules(model):
    spec = trace(model, XI)
    if isinstance(model, Grouped):
        assert spec.axes["grouped.weight"] == ((Segment("conv", 2),), None, None, None)
        assert spec.axes["bn.running_mean"] == ((Segment("conv", 2),),)
    assert preserved(model, XI) < 1e-5


def test_functional_layers_shared_modules_and_channels_last():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 8))
            self.b = nn.Parameter(torch.randn(6))
            self.scale = nn.Parameter(torch.randn(6))
            self.hidden = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            h = F.linear(x, self.w, self.b) * self.scale
            h = self.hidden(F.relu(self.hidden(F.relu(h))))  # one module used twice
            return self.out(h)

    spec = trace(Functional(), X8)
    assert spec.axes["w"] == ((Segment("w"),), (Segment("input"),))
    assert spec.axes["scale"] == ((Segment("w"),),)
    assert spec.axes["hidden.weight"] == ((Segment("w"),), (Segment("w"),))
    assert preserved(Functional(), X8) < 1e-5


def test_cat_residual_and_pooling_functions():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.c = nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(4 * 4, 3)

        def forward(self, x):
            y = torch.cat((F.relu(self.a(x)), self.b(x)), dim=1)
            z = self.c(y) + torch.add(self.a(x), 1.0)  # residual merges c with a
            z = F.adaptive_avg_pool2d(z, 2)
            return self.fc(z.reshape(z.size(0), -1))

    spec = trace(Mixed(), XI)
    assert spec.axes["c.weight"][0] == (Segment("a"),)
    assert spec.axes["fc.weight"][1] == (Segment("a", 4),)
    assert preserved(Mixed(), XI) < 1e-5


def test_torchvision_models_trace_when_available():
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 64, 64)
    for build in (tv.models.resnet18, tv.models.vgg11):
        model = build(weights=None, num_classes=7)
        assert trace(model, x).free_groups
        assert preserved(model, x) < 1e-4


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_output_shape_formula_matches_torch():
    from qapfuse.fusion._ops import _conv_out_shape

    gen = torch.Generator().manual_seed(0)

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    for _ in range(60):
        k = draw(1, 4)
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[k - 1]
        groups = draw(1, 3)
        padding = ("same", "valid", draw(0, 3))[draw(0, 3)]
        stride = 1 if padding == "same" else draw(1, 4)
        conv = conv_cls(2 * groups, 3 * groups, draw(1, 4), stride=stride, padding=padding,
                        dilation=draw(1, 3), groups=groups)  # fmt: skip
        x = torch.zeros(2, 2 * groups, *[draw(7, 12) for _ in range(k)])
        shape = _conv_out_shape(
            x, conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        try:
            expected = tuple(conv(x).shape)
        except RuntimeError:
            assert shape is None
            continue
        assert shape == expected


def test_trace_never_writes_into_parameters_or_the_input():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Identity()
            self.bn = nn.BatchNorm1d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            h = self.act(x).add_(1)  # a real forward writes into the caller's tensor here
            h = self.bn(torch.relu_(h)).add_(self.bn.bias)  # in place on the norm's output
            return self.fc(h)

    model = InPlace().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    x0 = x.clone()
    x1 = x.clone()
    model(x1)
    assert not torch.equal(x1, x0)  # the model itself does write into its input
    spec = trace(model, x)
    assert spec.axes["bn.bias"] == ((Segment("input"),),)  # both uses agree
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x0)


def test_squeeze_excitation_and_spatial_padding():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.squeeze, self.excite = nn.Linear(8, 2), nn.Linear(2, 8)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = F.pad(self.conv(x), (1, 1, 2, 0))
            s = x.mean((2, 3))
            s = torch.sigmoid(self.excite(F.relu(self.squeeze(s))))
            x = x * s.view(s.size(0), -1, 1, 1).expand_as(x)  # merges excite with conv
            return self.out(x)

    spec = trace(SE(), XI)
    assert spec.axes["excite.weight"] == ((Segment("conv"),), (Segment("squeeze"),))
    assert spec.free_groups == ("conv", "squeeze")
    assert preserved(SE(), XI) < 1e-5

    class PadChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(10, 2, 1)

        def forward(self, x):
            return self.out(F.pad(self.conv(x), (0, 0, 0, 0, 1, 1)))

    with pytest.raises(UnsupportedOpError, match="padding along the channel axis"):
        trace(PadChannels(), XI)
