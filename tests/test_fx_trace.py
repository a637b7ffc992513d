"""torch.fx symbolic tracing of the fused modules (torchvision's `create_feature_extractor`,
`get_graph_node_names`, `torch.fx.symbolic_trace`): while tracing, a module computes with its
conv / BN modules and torch functions (`nn.module_calls.tracing_layers`), so the graph is
torchvision's graph of standard layers, with its node names, and gives its values.
torch.export keeps the fused ops (tests/test_ecosystem.py)."""

import copy

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fused_resnet as fr

RETURNS = {"layer1": "c2", "layer3": "c4", "layer4": "c5"}


def _pairs():
    """(ours, torchvision's with the same tensors) in fp64: our ResNet-50, a converted
    torchvision ResNet-18."""
    torch.manual_seed(0)
    ours = fr.models.resnet50(backend="reference").double()
    theirs = torchvision.models.resnet50().double()
    theirs.load_state_dict(ours.state_dict())
    tv18 = torchvision.models.resnet18().double()
    return [(ours, theirs), (fr.convert(copy.deepcopy(tv18), backend="reference"), tv18)]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_feature_extractor_of_fused_models_is_torchvisions(training):
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for ours, theirs in _pairs():
        a = create_feature_extractor(ours.train(training), RETURNS)(x)
        b = create_feature_extractor(theirs.train(training), RETURNS)(x)
        assert list(a) == list(b)
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10)
        names, their_names = get_graph_node_names(ours)[1], get_graph_node_names(theirs)[1]
        # the same nodes but the pools (function calls in ours: FusedMaxPool2d's max_pool2d,
        # the head's adaptive_avg_pool2d)
        assert [n for n in names if "pool" not in n] == \
            [n for n in their_names if "pool" not in n]


def test_symbolic_trace_of_option_a_blocks_and_conv_modules():
    """The CIFAR ResNet (option-A zero-pad shortcuts: a slice and a pad in the graph) and a
    FusedConvBNAct with a residual, traced and run against the modules' own forward."""
    torch.manual_seed(0)
    model = fr.models.cifar_resnet(8, shortcut="A", backend="reference").double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-12, atol=1e-12)
    conv = fr.nn.FusedConvBNAct(4, 8, 3, backend="reference").double().eval()
    x, r = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 8, 6, 6,
                                                                    dtype=torch.float64)
    traced = torch.fx.symbolic_trace(conv)
    assert any(n.op == "call_module" and n.target == "conv" for n in traced.graph.nodes)
    torch.testing.assert_close(traced(x, r), conv(x, r), rtol=1e-12, atol=1e-12)
