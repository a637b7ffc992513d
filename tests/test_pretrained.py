"""torchvision's pretrained weights (`resnet18(weights=...)`, `validate --weights`, `train
--weights`), without a network: a fake checkpoint is put where torch.hub looks for the real
file, so the fused model and torchvision's own `resnet18(weights=...)` both read it."""

import importlib.util
import os
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import fused_resnet as fr
from fused_resnet.backend import unavailable_reason
from fused_resnet.models.pretrained import checkpoint_path, with_classes

torchvision = pytest.importorskip("torchvision")
W18 = torchvision.models.ResNet18_Weights
W50 = torchvision.models.ResNet50_Weights
BACKEND = "cpu" if unavailable_reason("cpu", torch.device("cpu")) is None else "reference"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch.hub's folder moved to tmp_path, holding a ResNet-18 'IMAGENET1K_V1' file (a
    random torchvision ResNet-18 with non-trivial BN statistics); downloads recorded, and
    answered with no network. Yields (state dict in the file, list of download URLs)."""
    # torch.hub's own variable, restored as it was (None: TORCH_HOME is read again), where
    # set_dir(old get_dir()) would pin the folder for every later test
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    downloads = []

    def no_network(url, dst, *args, **kwargs):
        downloads.append(url)
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    state = net.state_dict()
    path = checkpoint_path(W18.IMAGENET1K_V1)
    os.makedirs(os.path.dirname(path))
    torch.save(state, path)
    yield state, downloads


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1",
                                     W18.IMAGENET1K_V1, W18.DEFAULT],
                         ids=["DEFAULT", "name", "qualified-name", "member", "member-DEFAULT"])
def test_weights_load_as_torchvisions_do(hub, weights):
    state, downloads = hub
    ours = fr.models.resnet18(weights=weights, backend=BACKEND, progress=False).eval()
    theirs = torchvision.models.resnet18(weights=weights).eval()
    got = ours.state_dict()
    assert got.keys() == state.keys() and downloads == []
    for key, value in state.items():
        assert torch.equal(got[key], value), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_variant_is_free_where_the_blocks_are_basic(hub):
    state, _ = hub  # a ResNet-18's blocks have no 1x1 to move the stride to: v1 is v1.5
    model = fr.models.resnet18(weights="DEFAULT", variant="v1", backend=BACKEND)
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


REFUSED = [
    ("resnet18", dict(weights="IMAGENET1K_V9"), "weights must name one of"),
    ("resnet18", dict(weights=W50.DEFAULT), "weights must be None, a member of"),
    ("resnet18", dict(weights=True), "weights must be None"),
    ("resnet18", dict(weights="DEFAULT", num_classes=10), "num_classes must be 1000"),
    ("resnet50", dict(weights="DEFAULT", variant="v1"), "variant must be 'v1.5'"),
    ("resnet50", dict(weights="DEFAULT", shortcut="A"), "shortcut must be 'B'"),
    ("resnet50", dict(weights="DEFAULT", shortcut="C"), "shortcut must be 'B'"),
    ("resnet50", dict(weights="DEFAULT", width_per_group=32), "layer1.0.bn1.bias is"),
    ("cifar_resnet20", dict(weights="DEFAULT"), "weights: torchvision has pretrained"),
    ("plain18", dict(weights="DEFAULT"), "weights: torchvision has pretrained"),
]


@pytest.mark.parametrize("arch,kwargs,message", REFUSED,
                         ids=[f"{i}-{a}-{'-'.join(kw)}" for i, (a, kw, _) in enumerate(REFUSED)])
def test_refused_weights_name_the_argument_and_download_nothing(hub, arch, kwargs, message):
    _, downloads = hub
    with pytest.raises(ValueError, match=message):
        fr.models.build_model(arch, **kwargs)
    assert downloads == []


def test_a_failed_download_says_where_the_file_goes(hub):
    _, downloads = hub
    path = checkpoint_path(W50.IMAGENET1K_V2)
    with pytest.raises(RuntimeError, match="put that file at " + path):
        fr.models.resnet50(weights="DEFAULT")
    assert downloads == [W50.IMAGENET1K_V2.url] and not os.path.exists(path)


@pytest.mark.parametrize("arch", ["wide_resnet101_2", "resnext101_32x8d", "resnext101_64x4d"])
def test_larger_family_checks_pass_up_to_the_download(hub, arch):
    """The 101-layer wide / ResNeXt nets: the weights resolve against torchvision's enum and
    the state dict's keys and shapes against torchvision's model; only the download (no
    network here) is left, for the file torchvision's own model reads."""
    _, downloads = hub
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    with pytest.raises(RuntimeError, match="put that file at " + checkpoint_path(weights)):
        getattr(fr.models, arch)(weights="DEFAULT", progress=False)
    assert downloads == [weights.url]


def test_weights_without_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ImportError, match="weights: loading pretrained weights needs"):
        fr.models.resnet18(weights="DEFAULT")
    assert isinstance(fr.models.resnet18(), fr.models.ResNet)  # weights=None needs none


def test_with_classes():
    model = fr.models.resnet18(num_classes=10)
    fc = model.fc
    assert with_classes(model, 10).fc is fc
    assert with_classes(model, 7).fc.out_features == 7 and model.fc.in_features == 512
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        with_classes(model, 0)
    with pytest.raises(ValueError, match="model must have its classifier as an nn.Linear"):
        with_classes(torch.nn.Sequential(), 10)


def test_validate_with_weights(hub):
    from fused_resnet.validate import validate

    report = validate("resnet18", BACKEND, "fp64", 1, batch_size=2, image_size=32,
                      weights="DEFAULT")
    assert report.ok, report.rows
    with pytest.raises(ValueError, match="weights: torchvision has pretrained"):
        validate("cifar_resnet20", BACKEND, "fp64", 1, weights="DEFAULT")


def test_train_fine_tunes_from_weights(hub, tmp_path):
    from fused_resnet.train import TrainConfig, train

    state, _ = hub
    out = tmp_path / "run"
    cfg = dict(arch="resnet18", epochs=1, batch_size=4, synthetic_size=8, image_size=32,
               lr=1e-9, momentum=0.0, weight_decay=0.0, backend=BACKEND, device="cpu",
               progress=False, out=str(out))
    train(TrainConfig(**cfg, weights="DEFAULT"))
    model = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert model["fc.weight"].shape == (10, 512)  # the synthetic set's 10 classes
    torch.testing.assert_close(model["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"],
                               rtol=0, atol=1e-6)  # one step at lr 1e-9 from the file's
    torch.testing.assert_close(model["layer3.1.bn2.weight"], state["layer3.1.bn2.weight"],
                               rtol=0, atol=1e-6)
    for bad, message in (({"arch": "cifar_resnet20"}, "weights: torchvision has pretrained"),
                         ({"weights": "IMAGENET1K_V9"}, "weights must name one of")):
        with pytest.raises(ValueError, match=message):
            train(TrainConfig(**{**cfg, "weights": "DEFAULT", **bad}))


def test_torch_hub_entry_points(hub):
    """hubconf.py: torch.hub.load from a checkout gives the package's models, weights too."""
    state, _ = hub
    root = str(Path(__file__).resolve().parents[1])
    model = torch.hub.load(root, "resnet18", source="local", weights="DEFAULT", backend=BACKEND)
    assert isinstance(model, fr.models.ResNet)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    cifar = torch.hub.load(root, "cifar_resnet", 20, source="local", shortcut="B")
    assert isinstance(cifar, fr.models.CifarResNet)
    spec = importlib.util.spec_from_file_location("hubconf", os.path.join(root, "hubconf.py"))
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = {k for k in dir(hubconf) if callable(getattr(hubconf, k)) and k[0] != "_"}
    assert entry_points == {*fr.models.IMAGENET_ARCHS, "cifar_resnet", "plain_net"}
