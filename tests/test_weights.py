"""Backbone weights by name through torch hub's cache (a torchvision-layout file the tests write under
the cache name in a temporary TORCH_HOME; nothing downloads), ``megdet weights``, and what the weights
decide: frozen stages and BN with them, nothing frozen and zero-gamma residual branches that train
without them; and ``megdet train`` offline without the file: one line, exit 2, no run folder."""
import contextlib
import hashlib
import io
import urllib.error

import pytest
import torch

from hpc.cgbn import CrossGPUBatchNorm2d, FrozenBatchNorm2d
from hpc.errors import UserError
from megdet import cli, config, weights
from megdet.model import build_detector
from tests.test_model import torchvision_resnet_state_dict

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME, and a torch.hub download that fails as offline (recording what it was asked)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return home, calls


def cache_file(monkeypatch, depth, *, matching=True):
    """Write a torchvision-layout ResNet-``depth`` state dict into the cache under its name: with the
    hash prefix of its own sha256 (the table entry patched to it), or under torchvision's real name."""
    arch = f"resnet{depth}"
    state = torchvision_resnet_state_dict(depth)
    folder = weights.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / "staging.pth"
    torch.save(state, staging)
    if matching:
        prefix = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
        monkeypatch.setitem(weights.TORCHVISION, arch, weights.TorchvisionWeights(arch, f"{arch} test", prefix))
    path = folder / weights.TORCHVISION[arch].file_name
    staging.rename(path)
    return path, state


def one_line(match, function, *args, **kwargs):
    with pytest.raises(UserError, match=match) as caught:
        function(*args, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_table_names_torchvisions_imagenet_v1_files():
    assert weights.TORCHVISION["resnet50"].url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert weights.TORCHVISION["resnet50"].enum == "ResNet50_Weights.IMAGENET1K_V1"
    assert [entry.file_name for entry in weights.TORCHVISION.values()] == [
        "resnet18-f37072fd.pth", "resnet50-0676ba61.pth", "resnet101-63fe2227.pth"]


def test_a_name_resolves_in_torch_home_and_a_bad_hash_is_one_line(torch_home, monkeypatch):
    home, calls = torch_home
    path, _ = cache_file(monkeypatch, 18)
    assert weights.cache_dir() == home / "hub" / "checkpoints"
    assert weights.resolve("torchvision:resnet18") == path and not calls, "a good cached file is used, not fetched"
    assert str(weights.resolve("some/file.pth")) == "some/file.pth"
    path.write_bytes(path.read_bytes()[:-1] + b"x")  # same name, other bytes
    message = one_line(r"resnet18-\w{8}.pth has sha256 \w{8}\.\.\., not \w{8}\.\.\. as its name says .*: delete it",
                       weights.resolve, "torchvision:resnet18")
    assert str(path) in message and not calls


def test_offline_without_the_file_names_it_the_folder_and_the_url_and_leaves_nothing(torch_home):
    home, calls = torch_home
    message = one_line(r"torchvision:resnet50 is not in torch hub's cache", weights.resolve, "torchvision:resnet50")
    entry = weights.TORCHVISION["resnet50"]
    folder = home / "hub" / "checkpoints"
    assert str(folder / "resnet50-0676ba61.pth") in message and f"copy it into {folder}" in message
    assert f"fetch {entry.url} on a machine that is online" in message and "Temporary failure" in message
    assert calls == [(entry.url, str(folder / "resnet50-0676ba61.pth"), "0676ba61")], "hash checked on download"
    assert not home.exists(), "the folders made for the download are removed again"


def test_online_the_file_is_downloaded_into_the_cache_with_its_hash(torch_home, monkeypatch):
    fetched = []

    def online(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        torch.save(torchvision_resnet_state_dict(18), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", online)
    path = weights.resolve("torchvision:resnet18")
    assert path == weights.cache_dir() / "resnet18-f37072fd.pth" and path.is_file()
    assert fetched == [(weights.TORCHVISION["resnet18"].url, "f37072fd")]


def test_megdet_weights_lists_and_verifies_the_cache(torch_home, monkeypatch, capsys):
    path, _ = cache_file(monkeypatch, 18)
    assert cli.main(["weights"]) == 0
    out = capsys.readouterr().out
    assert str(weights.cache_dir()) in out
    assert any(line.startswith("torchvision:resnet18") and " ok " in line and str(path) in line
               for line in out.splitlines())
    assert any(line.startswith("torchvision:resnet50") and "missing" in line and
               "fetch https://download.pytorch.org/models/resnet50-0676ba61.pth" in line for line in out.splitlines())
    bad, _ = cache_file(monkeypatch, 50, matching=False)  # under torchvision's name, another sha256
    assert cli.main(["weights"]) == 2
    captured = capsys.readouterr()
    assert "BAD HASH" in captured.out
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and str(bad) in error[0] and "delete them" in error[0]


def test_a_truncated_file_or_another_architecture_is_one_line(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet_state_dict(18), path)
    path.write_bytes(path.read_bytes()[:100_000])
    one_line(r"cannot be read by torch.load \(.*\): it is truncated or not a torch checkpoint; fetch the file again",
             build_detector, "resnet18_fpn", num_classes=3, norm="bn", backbone_weights=str(path))
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "classifier.weight": torch.zeros(10, 64)}, path)
    one_line(r"does not fit this ResNet .* missing \['conv1.weight'", build_detector, "resnet18_fpn", num_classes=3,
             norm="bn", backbone_weights=str(path))


def test_paper_baseline_loads_every_tensor_and_freezes_the_stem_res2_and_bn(torch_home, monkeypatch):
    """megdet_r50_fpn_bs16 as detectron2's R50-FPN baseline: ImageNet weights, FrozenBN, stem + res2 frozen."""
    from megdet.engine.train import build_model

    _, state = cache_file(monkeypatch, 50)
    cfg = config.load("megdet_r50_fpn_bs16")
    backbone = build_model(cfg).backbone
    loaded = backbone.state_dict()
    expected = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    kinds = (torch.nn.BatchNorm2d, CrossGPUBatchNorm2d, FrozenBatchNorm2d)
    norms = [m for m in backbone.modules() if isinstance(m, kinds)]
    assert len(norms) == 53 and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    frozen = {name.split(".")[0] for name, p in backbone.named_parameters() if not p.requires_grad}
    training = {name.split(".")[0] for name, p in backbone.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and training == {"layer2", "layer3", "layer4"}


def test_cross_gpu_bn_preset_freezes_the_stem_and_res2_on_weights(torch_home, monkeypatch):
    cache_file(monkeypatch, 50)
    from megdet.engine.train import build_model

    backbone = build_model(config.load("megdet_r50_fpn_bs256_bn32", ["model.bn_size=null"])).backbone
    assert isinstance(backbone.bn1, FrozenBatchNorm2d) and isinstance(backbone.layer1[2].bn3, FrozenBatchNorm2d)
    assert isinstance(backbone.layer2[0].bn1, CrossGPUBatchNorm2d) and backbone.layer2[0].conv1.weight.requires_grad
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert (backbone.layer2[0].bn3.weight != 0).all(), "loaded gammas, not the zero init"


@pytest.mark.parametrize("norm", ["bn", "cgbn"])
def test_from_scratch_nothing_is_frozen_and_zero_gammas_train(norm):
    from megdet.engine.train import build_model

    cfg = config.load("megdet_r50_fpn_bs256_bn32", ["model.backbone_weights=null", f"model.norm={norm}",
                                                    "model.bn_size=null"])
    backbone = build_model(cfg).backbone
    assert all(p.requires_grad for p in backbone.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    last = [block.bn3 for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
            for block in stage]
    assert all(isinstance(bn.weight, torch.nn.Parameter) and not bn.weight.any() for bn in last), \
        "each residual branch starts at zero, with a gamma that trains"


def test_zero_gamma_never_where_bn_is_frozen():
    scratch_frozen = build_detector("resnet18_fpn", num_classes=3, norm="frozen")
    assert all(m.weight.all() for m in scratch_frozen.backbone.modules() if isinstance(m, FrozenBatchNorm2d))
    partly = build_detector("resnet18_fpn", num_classes=3, norm="bn", freeze_at=2)  # explicit: frozen stem + res2
    assert all(block.bn2.weight.all() for block in partly.backbone.layer1), "frozen res2 keeps its branches"
    assert not any(block.bn2.weight.any() for block in partly.backbone.layer2)
    # the builder's contract (the user's rule is model.sublinear_stages's check in megdet.specs)
    with pytest.raises(ValueError, match=r"sublinear_stages \['res2'\] are frozen \(freeze_at=2\): .* recomputing it "
                                         r"saves nothing"):
        build_detector("resnet18_fpn", num_classes=3, norm="bn", freeze_at=2, sublinear_stages=("res2",))


def test_megdet_train_offline_without_weights_is_one_line_exit_2_and_no_run_folder(torch_home, tmp_path):
    home, calls = torch_home
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        assert cli.main(["synth", "--out", str(tmp_path / "shapes"), "--train", "2", "--val", "1", "--size", "64"]) == 0
        assert cli.main(["pack", "--coco-json", str(tmp_path / "shapes" / "annotations" / "instances_train.json"),
                         "--images", str(tmp_path / "shapes" / "train"), "--out", str(tmp_path / "shards")]) == 0
    run = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["train", "megdet_r50_fpn_bs16", "solver.batch_size=2", f"data.train={tmp_path / 'shards'}",
                         "data.val=", "data.num_workers=0", "model.num_classes=3", f"train.output_dir={run}"])
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith("megdet train: error: torchvision:resnet50 is not in torch hub's cache")
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in lines[0] and len(calls) == 1
    assert not run.exists() and not home.exists()
