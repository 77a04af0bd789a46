"""Network <-> graph: exact round trips, edge and node features, permutation as relabelling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fusion_zoo import NAMES, make, traced

from qapfuse.fusion import (
    NetworkGraph,
    PermutationSpec,
    SpecError,
    from_graph,
    permute,
    random_permutations,
    to_graph,
    trace,
)


def assert_same_state_dict(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_exact(name):
    model, _ = make(name)
    sd = model.state_dict()
    graph = to_graph(sd, traced(name))
    assert_same_state_dict(from_graph(graph), sd)


def test_round_trip_is_exact_in_float64():
    model, _ = make("resnet20")
    sd = model.double().state_dict()
    graph = to_graph(sd, traced("resnet20"))
    assert graph.edges[0].features.dtype == torch.float64
    assert_same_state_dict(from_graph(graph), sd)


@pytest.mark.parametrize("name", NAMES)
def test_graph_lists_every_weight_with_its_groups(name):
    model, _ = make(name)
    sd = model.state_dict()
    spec = traced(name)
    graph = to_graph(sd, spec)
    assert graph.groups == dict(spec.sizes) and graph.fixed == spec.fixed
    seen = {e.key for e in graph.edges} | {n.key for n in graph.nodes} | set(graph.constants)
    assert seen == set(sd)
    for e in graph.edges:
        assert e.features.ndim == 3
        assert e.features.shape[:2] == (graph.groups[e.out_group], graph.groups[e.in_group])
        kernel = int(np.prod(sd[e.key].shape[2:])) if sd[e.key].ndim > 2 else 1
        assert e.features.shape[2] == kernel * e.out_block * e.in_block
    for n in graph.nodes:
        assert n.features.shape[0] == graph.groups[n.group]
    assert all(v.ndim == 0 for v in graph.constants.values())  # num_batches_tracked only


def test_lenet_edges_carry_kernels_and_flatten_blocks():
    model, _ = make("lenet")
    graph = to_graph(model.state_dict(), traced("lenet"))
    edges = {e.key: e for e in graph.edges}
    conv2 = edges["conv2.weight"]
    assert (conv2.out_group, conv2.in_group) == ("conv2", "conv1")
    assert conv2.features.shape == (6, 4, 25)
    assert torch.equal(conv2.features[2, 3], model.conv2.weight.detach()[2, 3].reshape(-1))
    fc1 = edges["fc1.weight"]
    assert (fc1.in_group, fc1.in_block, fc1.features.shape) == ("conv2", 16, (10, 6, 16))
    assert torch.equal(fc1.features[1, 5], model.fc1.weight.detach()[1, 80:96])
    bias = next(graph.node_features("conv1"))
    assert bias.key == "conv1.bias" and bias.features.shape == (4, 1)
    assert [e.key for e in graph.edges_into("conv1")] == ["conv2.weight"]
    assert [e.key for e in graph.edges_out_of("output")] == ["fc3.weight"]
    assert "edge sets" in repr(graph) and "Edge('conv1.weight'" in repr(graph.edges[0])


def test_layernorm_over_chw_is_a_node_feature_per_channel():
    model, _ = make("convln")
    graph = to_graph(model.state_dict(), traced("convln"))
    norm1 = next(n for n in graph.nodes if n.key == "norm1.weight")
    assert norm1.group == "conv1" and norm1.features.shape == (4, 64)
    pw = next(e for e in graph.edges if e.key == "pw.weight")
    assert (pw.out_group, pw.in_group) == ("conv2", "conv2")


@pytest.mark.parametrize("name", ["lenet", "resnet20", "convln"])
def test_permuting_relabels_graph_nodes(name):
    model, _ = make(name)
    spec = traced(name)
    sd = model.state_dict()
    perms = {g: torch.as_tensor(p) for g, p in random_permutations(spec, 5).items()}
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    p = ident | perms
    g0, g1 = to_graph(sd, spec), to_graph(permute(sd, spec, perms), spec)
    for e0, e1 in zip(g0.edges, g1.edges):
        assert torch.equal(e1.features, e0.features[p[e0.out_group]][:, p[e0.in_group]])
    for n0, n1 in zip(g0.nodes, g1.nodes):
        assert torch.equal(n1.features, n0.features[p[n0.group]])


def test_concatenated_axis_splits_into_edge_pieces():
    class Cat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.b = torch.nn.Conv2d(3, 5, 1)
            self.bn = torch.nn.BatchNorm2d(9)
            self.o = torch.nn.Conv2d(9, 2, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)
            return self.o(torch.relu(self.bn(y)))

    model = Cat().eval()
    x = torch.randn(2, 3, 5, 5)
    spec = trace(model, x)
    assert spec.axes["o.weight"][1] == (("a", 1), ("b", 1))
    graph = to_graph(model.state_dict(), spec)
    pieces = [(e.in_group, e.in_offset, tuple(e.features.shape)) for e in graph.edges
              if e.key == "o.weight"]  # fmt: skip
    assert pieces == [("a", 0, (2, 4, 1)), ("b", 4, (2, 5, 1))]
    assert_same_state_dict(from_graph(graph), model.state_dict())
    sd = permute(model, spec, random_permutations(spec, 0))
    other = Cat().eval()
    other.load_state_dict(sd)
    with torch.no_grad():
        assert (model(x) - other(x)).abs().max() < 1e-5


def test_from_graph_uses_replaced_features():
    model, _ = make("mlp")
    graph = to_graph(model.state_dict(), traced("mlp"))
    new_edges = tuple(
        type(e)(e.key, e.out_group, e.in_group, torch.zeros_like(e.features), e.out_axis,
                e.in_axis, e.out_block, e.in_block, e.out_offset, e.in_offset)
        for e in graph.edges
    )  # fmt: skip
    rebuilt = from_graph(
        NetworkGraph(graph.spec, graph.groups, graph.fixed, new_edges, graph.nodes,
                     graph.constants, graph.shapes)
    )  # fmt: skip
    assert torch.count_nonzero(rebuilt["layers.0.weight"]) == 0
    assert torch.equal(rebuilt["layers.0.bias"], model.state_dict()["layers.0.bias"])


def test_graph_errors():
    model, _ = make("mlp")
    spec = traced("mlp")
    with pytest.raises(TypeError, match="'spec' parameter of to_graph"):
        to_graph(model.state_dict(), "spec")
    with pytest.raises(TypeError, match=r"'state_dict' parameter of to_graph.*Got list"):
        to_graph(list(model.state_dict().values()), spec)
    with pytest.raises(TypeError, match="'graph' parameter of from_graph"):
        from_graph(model.state_dict())
    with pytest.raises(SpecError, match=r"'layers\.0\.weight'\] has shape"):
        to_graph({k: torch.zeros(2, *v.shape[1:]) if k == "layers.0.weight" else v
                  for k, v in model.state_dict().items()}, spec)  # fmt: skip
    three = PermutationSpec({"t": ("a", "b", "c")})
    with pytest.raises(SpecError, match="3 channel axes"):
        to_graph({"t": torch.zeros(2, 2, 2)}, three)
    assert isinstance(to_graph(model, spec), NetworkGraph)
