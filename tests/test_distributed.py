"""Data-parallel training with the fused blocks: DistributedDataParallel over a fused model
with synchronized BatchNorm, 2 processes on CPU (gloo), against one process training on the
concatenated batch (what synchronized BN must reproduce)."""

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fused_resnet as fr
from fused_resnet.nn import FusedConvBNAct

DEVICE = "cpu"  # the workers' device (set to "cuda" by the GPU test)
WORLD = 2
BATCH = 8  # global; 4 per rank
STEPS = 2


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, BATCH, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (STEPS, BATCH), generator=g)
    return x, y


def _model(backend):
    torch.manual_seed(0)
    return fr.models.cifar_resnet(20, backend=backend)


def _train(model, xs, ys):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        x = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y.to(DEVICE))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank, init_file, out_dir, backend, device="cpu"):
    global DEVICE
    DEVICE = device
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        xs, ys = _data()
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        model = fr.convert(_model(backend), backend=backend, sync_bn=True)
        model = model.to(device, memory_format=torch.channels_last)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _train(ddp, xs[:, part], ys[:, part])
        # the op on its own: output, input gradient and BN gradients with a residual and
        # activations of mean 1e3 (the all-reduced sums must keep the variance's digits)
        torch.manual_seed(5)
        layer = FusedConvBNAct(4, 6, 3, backend=backend, sync_bn=True).to(device)
        x = (torch.randn(4, 4, 5, 5) + 1e3)[rank * 2:(rank + 1) * 2].to(device)
        x.requires_grad_()
        r = torch.randn(4, 6, 5, 5)[rank * 2:(rank + 1) * 2].to(device)
        z = layer(x, residual=r)
        z.pow(2).sum().backward()

        def cpu(tensors):
            return {k: v.cpu() for k, v in tensors.items()}

        torch.save({"state": cpu(model.state_dict()), "z": z.detach().cpu(),
                    "dx": x.grad.cpu(),
                    "layer_grads": cpu({n: p.grad for n, p in layer.named_parameters()}),
                    "layer_state": cpu(layer.state_dict())},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, backend, device="cpu"):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), backend, device),
             nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _has_extension():
    try:
        from fused_resnet import _C  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo workers on Linux")
@pytest.mark.parametrize("backend", [
    pytest.param("cpu", marks=pytest.mark.skipif(not _has_extension(), reason="_C not built")),
    "reference"])
def test_ddp_sync_bn_matches_one_process_on_the_whole_batch(tmp_path, backend):
    results = _spawn(tmp_path, backend)
    xs, ys = _data()
    single = _model("reference").to(memory_format=torch.channels_last)
    _train(single, xs, ys)
    expected = single.state_dict()
    for rank, result in enumerate(results):
        for key, value in expected.items():
            got = result["state"][key]
            if key.endswith("num_batches_tracked"):
                assert got == value, key
            else:
                torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, k=key, r=rank: f"rank {r} {k}: {m}")
    # the op: both ranks' halves against one layer on the whole batch
    torch.manual_seed(5)
    layer = FusedConvBNAct(4, 6, 3, backend="reference")
    x = (torch.randn(4, 4, 5, 5) + 1e3).requires_grad_()
    r = torch.randn(4, 6, 5, 5)
    z = layer(x, residual=r)
    z.pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([res["z"] for res in results]), z.detach(),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([res["dx"] for res in results]), x.grad,
                               rtol=1e-3, atol=1e-3)
    for name, p in layer.named_parameters():  # each rank's own term; DDP would average them
        total = sum(res["layer_grads"][name] for res in results)
        torch.testing.assert_close(total, p.grad, rtol=1e-3, atol=1e-3)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(results[0]["layer_state"][key], value, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ddp_sync_bn_on_gpu_matches_one_process(tmp_path, backend):
    """Both ranks on the one GPU (gloo moves CUDA tensors); fp32 with TF32 off."""
    results = _spawn(tmp_path, backend, "cuda")
    xs, ys = _data()
    single = _model("reference").to(memory_format=torch.channels_last)
    _train(single, xs, ys)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(results[0]["state"][key].float(), value.float(), rtol=1e-3,
                                   atol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def test_sync_bn_without_distributed_is_plain_batch_norm():
    torch.manual_seed(0)
    plain = FusedConvBNAct(4, 6, 3)
    synced = copy.deepcopy(plain)
    fr.nn.convert_sync_bn(synced)
    assert isinstance(synced.bn, fr.nn.FusedSyncBatchNorm)
    assert synced.bn.weight is not plain.bn.weight  # a deep copy's own tensors
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.bn.running_var, plain.bn.running_var)
    keys = fr.convert(_model("auto"), sync_bn=True).state_dict().keys()
    assert keys == _model("auto").state_dict().keys()
