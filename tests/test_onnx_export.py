"""torch.onnx.export of fused models (both exporters): while exporting, blocks, stems and the
pool compute with their conv / BN / pool modules (`nn.module_calls.tracing_layers`), so the ONNX
graph holds standard Conv / Relu / MaxPool / Add nodes, no fused_resnet op, and onnxruntime
gives the model's eval output."""

import warnings

import pytest
import torch
import torchvision
from _backends import DEVICE, FUSED_BACKENDS

import fused_resnet as fr

onnx = pytest.importorskip("onnx")

BACKENDS = [*FUSED_BACKENDS, "reference"]
MODELS = {
    "resnet18": (lambda b: fr.models.resnet18(num_classes=10, backend=b), 64),
    "cifar_resnet20 (option A)": (lambda b: fr.models.cifar_resnet(20, backend=b), 16),
    "converted torchvision resnet50": (
        lambda b: fr.convert(torchvision.models.resnet50(num_classes=10), backend=b), 64),
}


def _export(model, x, path, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, and the like
        torch.onnx.export(model, (x,), str(path), dynamo=exporter == "dynamo")
    return onnx.load(str(path))


# Triton with the small net only: its eval forward (the expected output) runs in the
# interpreter here; the export path itself does not depend on the backend.
def _value(backend) -> str:
    return backend.values[0] if hasattr(backend, "values") else backend  # a pytest.param


CASES = [pytest.param(_value(b), n, id=f"{_value(b)}-{n}", marks=getattr(b, "marks", ()))
         for b in BACKENDS for n in MODELS if _value(b) != "triton" or n.startswith("cifar")]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("backend, name", CASES)
def test_onnx_export_gives_standard_layers(backend, name, exporter, tmp_path):
    make, size = MODELS[name]
    torch.manual_seed(0)
    model = make(backend).eval().to(DEVICE)
    with torch.no_grad():  # BN statistics of a trained model, so folds matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, size, size, device=DEVICE)
    graph = _export(model, x, tmp_path / "model.onnx", exporter).graph
    domains = {node.domain for node in graph.node}
    kinds = {node.op_type for node in graph.node}
    assert not any("fused" in d for d in domains), domains
    assert {"Conv", "Relu", "Add"} <= kinds, kinds
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(got), expected.cpu(), rtol=1e-4, atol=1e-4)
