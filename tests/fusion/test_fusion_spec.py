"""Traced specs equal hand-written ones; the spec data structure validates itself."""

from __future__ import annotations

import pytest
import torch
from fusion_zoo import NAMES, hand_spec, make, traced

from qapfuse.fusion import (
    PermutationSpec,
    Segment,
    SpecError,
    TracingError,
    UnplacedTensorError,
    check_same_shapes,
    models,
    trace,
)
from qapfuse.fusion.models import MLP


@pytest.mark.parametrize("name", NAMES)
def test_traced_spec_equals_hand_written(name):
    model, _ = make(name)
    spec = traced(name)
    expected = hand_spec(name).resolve(model.state_dict())
    assert spec.axes == expected.axes, spec.describe()
    assert spec.fixed == expected.fixed
    assert spec.sizes == expected.sizes
    assert spec == expected


@pytest.mark.parametrize("name", NAMES)
def test_traced_spec_covers_every_key_and_sizes_agree(name):
    model, _ = make(name)
    sd = model.state_dict()
    spec = traced(name)
    assert set(spec.axes) == set(sd)
    for key, entries in spec.axes.items():
        assert len(entries) == sd[key].ndim
        for axis, entry in enumerate(entries):
            if entry is not None:
                assert sum(spec.sizes[s.group] * s.block for s in entry) == sd[key].shape[axis]
    assert {"input", "output"} <= spec.fixed
    assert spec.free_groups and not set(spec.free_groups) & spec.fixed


def test_perm_to_axes_is_derived_from_axes():
    spec = PermutationSpec(
        {"a.weight": ("h", "input"), "a.bias": ("h",), "b.weight": ("output", Segment("h", 3))},
        fixed={"input", "output"},
    )
    assert spec.groups == ("h", "input", "output")
    assert spec.free_groups == ("h",)
    assert spec.perm_to_axes["h"] == (("a.weight", 0, 1), ("a.bias", 0, 1), ("b.weight", 1, 3))
    sd = {"a.weight": torch.zeros(4, 2), "a.bias": torch.zeros(4), "b.weight": torch.zeros(5, 12)}
    assert spec.resolve(sd).sizes == {"h": 4, "input": 2, "output": 5}
    assert "3 tensors" in repr(spec) and "b.weight: (output, hx3)" in spec.describe()


def test_hand_written_spec_entry_forms_are_normalised():
    a = PermutationSpec({"w": ["g", None], "v": [("g", Segment("k", 2))]})
    assert a.axes == {"w": ((Segment("g", 1),), None), "v": ((Segment("g"), Segment("k", 2)),)}


@pytest.mark.parametrize(
    ("axes", "kwargs", "exc", "match"),
    [
        ([("w", ("g",))], {}, TypeError, "must be a mapping"),
        ({"w": "g"}, {}, TypeError, "one entry per tensor axis"),
        ({1: ("g",)}, {}, TypeError, "keys of the 'axes' parameter of PermutationSpec"),
        ({"w": ((3,),)}, {}, TypeError, "group names or Segments"),
        ({"w": (3,)}, {}, TypeError, "axes\\['w'\\]\\[0\\] of PermutationSpec must be None"),
        ({"w": (None, ("",))}, {}, TypeError, "axes\\['w'\\]\\[1\\] .* non-empty strings"),
        ({"w": (Segment("g", 0),)}, {}, ValueError, "must be an int >= 1"),
        ({"w": ("g",)}, {"fixed": {"nope"}}, ValueError, "no axis uses: \\['nope'\\]"),
        ({"w": ("g",)}, {"sizes": [4]}, TypeError, "'sizes' parameter of PermutationSpec"),
        ({"w": ("g",)}, {"sizes": {}}, ValueError, "lacks the groups \\['g'\\]"),
        ({"w": ("g",)}, {"sizes": {"g": 0}}, ValueError, "sizes\\['g'\\] .* must be an int >= 1"),
    ],
)
def test_bad_hand_written_specs_are_refused(axes, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PermutationSpec(axes, **kwargs)


def test_spec_that_does_not_cover_a_parameter_names_it():
    sd = MLP(4, (3,), 2).state_dict()
    spec = PermutationSpec({"layers.0.weight": ("h", "input"), "layers.0.bias": ("h",)})
    with pytest.raises(
        SpecError, match=r"does not cover the parameter or buffer 'layers.2.weight'"
    ):
        spec.resolve(sd)
    extra = dict.fromkeys(sd, ()) | {"ghost": ()}
    with pytest.raises(SpecError, match=r"names 'ghost', which is not in the state dict"):
        PermutationSpec(extra).resolve(sd)
    wrong_ndim = {k: (None,) for k in sd}
    with pytest.raises(SpecError, match=r"'layers.0.weight'\] has 2 axes"):
        PermutationSpec(wrong_ndim).resolve(sd)


def test_state_dict_of_a_wider_model_names_the_key():
    spec = trace(MLP(4, (3,), 2), torch.zeros(1, 4))
    wide = MLP(4, (5,), 2).state_dict()
    with pytest.raises(
        SpecError, match=r"'layers.0.weight'\] has shape \(5, 4\).*different widths"
    ):
        spec.resolve(wide)


def test_inconsistent_group_sizes_are_reported():
    spec = PermutationSpec({"a": ("g",), "b": ("g",)})
    with pytest.raises(SpecError, match=r"state_dict\['b'\] has shape \(4,\)"):
        spec.resolve({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_check_same_shapes_names_the_key():
    a, b = MLP(4, (3,), 2).state_dict(), MLP(4, (6,), 2).state_dict()
    check_same_shapes(a, MLP(4, (3,), 2).state_dict())
    with pytest.raises(SpecError, match=r"state_dicts\[1\]\['layers.0.weight'\] has shape"):
        check_same_shapes(a, b)
    with pytest.raises(SpecError, match=r"lacks the key 'layers.2.bias'"):
        check_same_shapes(a, {k: v for k, v in a.items() if k != "layers.2.bias"})
    with pytest.raises(TypeError, match=r"must be a torch.Tensor"):
        check_same_shapes(a, dict.fromkeys(a, 1.0))


def test_unused_parameters_raise_unless_allowed(caplog):
    class WithSpare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.spare = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(UnplacedTensorError, match=r"'spare.weight', 'spare.bias'.*allow_unplaced"):
        trace(WithSpare(), torch.zeros(1, 4))
    with pytest.raises(TracingError) as info:  # a kind of TracingError, with the keys
        trace(WithSpare(), torch.zeros(1, 4))
    assert info.value.keys == ("spare.weight", "spare.bias")
    with caplog.at_level("WARNING", logger="qapfuse.fusion.spec"):
        spec = trace(WithSpare(), torch.zeros(1, 4), allow_unplaced=True)
    assert spec.axes["spare.weight"] == (None, None)
    assert "spare.weight" in caplog.text and "allow_unplaced=True" in caplog.text
    with pytest.raises(TypeError, match="'allow_unplaced' parameter of trace must be a bool"):
        trace(WithSpare(), torch.zeros(1, 4), allow_unplaced="yes")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MLP(4, (), 2), "'hidden' parameter of MLP"),
        (lambda: models.VGG("vgg99"), "'cfg' parameter of VGG"),
        (lambda: models.ResNet("wide"), "'block' parameter of ResNet"),
        (lambda: models.ResNet(stem="tiny"), "'stem' parameter of ResNet"),
        (lambda: models.ResNet(layers=(1, 1), widths=(4,)), "same length"),
        (lambda: models.LeNet(input_size=8), "'input_size' parameter of LeNet"),
    ],
)
def test_zoo_refuses_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_zoo_shapes():
    x = torch.zeros(2, 3, 64, 64)
    assert models.resnet50(width=2, num_classes=7)(x).shape == (2, 7)
    assert models.vgg16(width=1 / 32, classifier=(8, 8), num_classes=3)(x).shape == (2, 3)
    assert models.LeNet(3, 4, input_size=64)(x).shape == (2, 4)
    assert models.ConvLayerNormNet(3, 5, channels=(4, 4), input_size=64)(x).shape == (2, 5)
