"""network/: reference state_dict layout, strides, dilation rule, pretrained loading, predict."""

import hashlib
import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import network
from helpers import UserError
from network.backbone import dilate_layer

# The state_dict key lists of the reference code's models (tests/data/checkpoint_keys_*.json).
REFERENCE = Path(__file__).resolve().parent / "data"
# (backbone, classes, reference key file, sha256 of json.dumps(that file's list), number of entries):
# the digests let the test run where the reference folder is absent.
KEY_FILES = [
    (
        "deeplabv3p",
        21,
        "checkpoint_keys_deeplabv3p_21.json",
        "45602a48e92d44335ffcef8f4c42887ddf2ea24ad098808c2e6ebc00d528a1e2",
        682,
    ),
    (
        "deeplabv3p",
        19,
        "checkpoint_keys_deeplabv3p_19.json",
        "0cc3eeaa277a522d9b4a84eec27676f047f44077589e5b9d5ac80230f571a669",
        682,
    ),
    (
        "deeplabv2",
        21,
        "checkpoint_keys_deeplabv2_21.json",
        "43bdfc7c614760f1c7b37e8976dc8a622d9bff7cd9f7dedc1fae2a0ce752fd69",
        634,
    ),
]
DTYPES = {"torch.float32": torch.float32, "torch.int64": torch.int64}


def _meta_model(backbone, num_classes, depth=101):
    with torch.device("meta"):
        return network.build_model(backbone, num_classes, resnet_depth=depth)


def _key_list(model):
    return [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]


@pytest.mark.parametrize("backbone,num_classes,name,digest,count", KEY_FILES)
def test_state_dict_keys_shapes_dtypes_match_reference(backbone, num_classes, name, digest, count):
    ours = _key_list(_meta_model(backbone, num_classes))
    assert ours == json.loads((REFERENCE / name).read_text())
    assert len(ours) == count
    assert hashlib.sha256(json.dumps(ours).encode()).hexdigest() == digest
    assert ours[0] == ["resnet_conv1.weight", [64, 3, 7, 7], "torch.float32"]
    assert ours[-1][0] == ("representation.3.bias" if backbone == "deeplabv3p" else "representation.0.bias")


@pytest.mark.parametrize("backbone,num_classes,name", [(b, c, n) for b, c, n, _, _ in KEY_FILES])
def test_reference_format_state_dict_loads_strictly(backbone, num_classes, name):
    """A state_dict shaped like the reference's (from its key list, no storage) loads strictly."""
    keys = json.loads((REFERENCE / name).read_text())
    state = {k: torch.empty(shape, dtype=DTYPES[dtype], device="meta") for k, shape, dtype in keys}
    model = _meta_model(backbone, num_classes)
    model.load_state_dict(state, strict=True, assign=True)
    assert network.infer_config(state) == {
        "backbone": backbone,
        "resnet_depth": 101,
        "num_classes": num_classes,
        "output_dim": 256,
    }
    del state["representation.0.bias" if backbone == "deeplabv2" else "representation.3.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        _meta_model(backbone, num_classes).load_state_dict(state, strict=True, assign=True)


@pytest.mark.parametrize("backbone", ["deeplabv3p", "deeplabv2"])
def test_checkpoint_round_trip_is_strict_and_exact(tmp_path, backbone):
    torch.manual_seed(0)
    model = network.build_model(backbone, 4, output_dim=8, resnet_depth=18).eval()
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    other = network.build_model(backbone, 4, output_dim=8, resnet_depth=18).eval()
    other.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(1, 3, 49, 65)
    for a, b in zip(model(x), other(x)):
        assert torch.equal(a, b)
    assert network.infer_config(other.state_dict()) == {
        "backbone": backbone,
        "resnet_depth": 18,
        "num_classes": 4,
        "output_dim": 8,
    }


@pytest.mark.parametrize(
    "backbone,size,expected", [("deeplabv3p", 321, 81), ("deeplabv3p", 513, 129), ("deeplabv2", 321, 41)]
)
def test_output_strides(backbone, size, expected):
    model = network.build_model(backbone, 5, output_dim=16, resnet_depth=18).eval()
    with torch.no_grad():
        logits, rep = model(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 5, expected, expected)
    assert rep.shape == (1, 16, expected, expected)


def _conv_config(layer):
    return [
        (name, conv.stride, conv.dilation, conv.padding)
        for name, conv in layer.named_modules()
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
    ]


def test_resnet101_dilation_layout_deeplabv3p():
    model = _meta_model("deeplabv3p", 21)
    assert model.resnet_layer3[0].conv2.stride == (2, 2)  # layer3 keeps its stride: OS16
    assert all(d == (1, 1) for _, _, d, _ in _conv_config(model.resnet_layer3))
    config = _conv_config(model.resnet_layer4)
    assert config[0] == ("0.conv2", (1, 1), (1, 1), (1, 1))
    assert all(c[1:] == ((1, 1), (2, 2), (2, 2)) for c in config[1:]) and len(config) == 3
    assert model.resnet_layer4[0].downsample[0].stride == (1, 1)
    rates = [branch[0].dilation for branch in model.ASPP.convs[1:4]]
    assert rates == [(6, 6), (12, 12), (18, 18)]
    assert len(model.resnet_layer3) == 23


def test_resnet101_dilation_layout_deeplabv2():
    model = _meta_model("deeplabv2", 21)
    for layer, d in ((model.resnet_layer3, 2), (model.resnet_layer4, 4)):
        config = _conv_config(layer)
        assert config[0] == ("0.conv2", (1, 1), (d // 2, d // 2), (d // 2, d // 2))
        assert all(c[1:] == ((1, 1), (d, d), (d, d)) for c in config[1:])
        assert layer[0].downsample[0].stride == (1, 1)
    assert [c.dilation for c in model.classifier.conv2d_list] == [(6, 6), (12, 12), (18, 18), (24, 24)]


def test_basic_block_dilation_rule():
    resnet = torchvision.models.resnet18(weights=None)
    dilate_layer(resnet.layer4, 4)
    assert _conv_config(resnet.layer4) == [
        ("0.conv1", (1, 1), (2, 2), (2, 2)),
        ("0.conv2", (1, 1), (4, 4), (4, 4)),
        ("1.conv1", (1, 1), (4, 4), (4, 4)),
        ("1.conv2", (1, 1), (4, 4), (4, 4)),
    ]
    assert resnet.layer4[0].downsample[0].stride == (1, 1)


def test_deeplabv2_sums_all_four_branches():
    torch.manual_seed(0)
    head = network.deeplab.DeepLabv2Classifier(8, 3)
    x = torch.randn(2, 8, 30, 30)
    expected = sum(conv(x) for conv in head.conv2d_list)
    torch.testing.assert_close(head(x), expected)
    weights = torch.cat([c.weight.flatten() for c in head.conv2d_list])
    assert abs(weights.std().item() - 0.01) < 0.002


def test_bad_backbone_and_depth_are_clear():
    with pytest.raises(UserError, match="--backbone"):
        network.build_model("unet", 3)
    with pytest.raises(UserError, match="--resnet_depth 42"):
        network.build_model("deeplabv3p", 3, resnet_depth=42)


def test_pretrained_path_loads_backbone_strictly(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)  # includes fc.*, which is ignored
    model = network.build_model("deeplabv3p", 3, resnet_depth=18, pretrained=str(path))
    assert torch.equal(model.resnet_conv1.weight, source.conv1.weight)
    assert torch.equal(model.resnet_layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match=r"r34.pth.*ResNet-18"):
        network.build_model("deeplabv3p", 3, resnet_depth=18, pretrained=str(tmp_path / "r34.pth"))
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        network.build_model("deeplabv3p", 3, resnet_depth=18, pretrained=str(tmp_path / "nothing.pth"))
    (tmp_path / "text.pth").write_text("not a torch file")
    with pytest.raises(UserError, match=r"text.pth cannot be read \(UnpicklingError") as error:
        network.build_model("deeplabv3p", 3, resnet_depth=18, pretrained=str(tmp_path / "text.pth"))
    assert "\n" not in str(error.value)  # one line, whatever torch's message looked like


def _no_network(url, dst, *args, **kwargs):
    raise urllib.error.URLError("no network")


def test_pretrained_imagenet_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert network.imagenet_weight_file(18) == target
    with pytest.raises(FileNotFoundError) as error:
        network.build_model("deeplabv3p", 3, resnet_depth=18, pretrained="imagenet")
    message = str(error.value)
    assert str(target) in message and "none" in message and "\n" not in message

    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), target)  # a cached file is used without any download
    model = network.build_model("deeplabv3p", 3, resnet_depth=18, pretrained="imagenet")
    assert torch.equal(model.resnet_layer2[0].conv1.weight, source.layer2[0].conv1.weight)


class _Echo(nn.Module):
    """Logits = the image plus a left-to-right ramp, at full resolution (a known answer for predict)."""

    def forward(self, x, with_rep=True):
        ramp = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x)
        return x + ramp, x


def test_predict_flip_and_window_known_answers():
    x = torch.randn(2, 3, 20, 31)
    width = x.shape[-1]
    ramp = torch.arange(width, dtype=x.dtype).expand_as(x)
    torch.testing.assert_close(network.predict(_Echo(), x, (20, 31)), x + ramp)
    # the flipped pass sees the ramp reversed; undoing the flip must realign the image
    torch.testing.assert_close(network.predict(_Echo(), x, (20, 31), flip=True), x + (width - 1) / 2)
    # windows are put back where they came from and overlaps are averaged: the identity model is exact
    torch.testing.assert_close(network.predict(lambda t, with_rep: (t, t), x, (20, 31), window=(8, 12)), x)
    # each window's ramp restarts at 0: column 0 is only ever a window's first column, the last a last one
    windowed = network.predict(_Echo(), x, (20, 31), window=(8, 12))
    torch.testing.assert_close(windowed[..., 0], x[..., 0])
    torch.testing.assert_close(windowed[..., -1], x[..., -1] + 11)


def test_predict_on_a_real_model():
    torch.manual_seed(0)
    model = network.build_model("deeplabv3p", 4, output_dim=8, resnet_depth=18).eval()
    x = torch.randn(2, 3, 65, 81)
    plain = network.predict(model, x, (65, 81))
    assert plain.shape == (2, 4, 65, 81)
    torch.testing.assert_close(network.predict(model, x, (65, 81), window=(65, 81)), plain)
    torch.testing.assert_close(network.predict(model, x, (65, 81), window=(100, 100)), plain)
    assert network.predict(model, x, (65, 81), flip=True, window=(33, 49)).shape == (2, 4, 65, 81)
    assert network.predict(model, x, (30, 40), flip=True).shape == (2, 4, 30, 40)
    assert network.predict(model, x, (30, 40), window=(33, 49)).shape == (2, 4, 30, 40)


# ------------------------------------------------------------------------------------------------------------
# UniMatch's DeepLabv3+ (--backbone deeplabv3p_unimatch)
# ------------------------------------------------------------------------------------------------------------

# UniMatch's own R50 state_dict keys, in order (recorded from its code with the step fixture).
UNIMATCH_KEYS = json.loads((REFERENCE / "unimatch_step" / "fixture.json").read_text())["state_dict_keys"]


def _unimatch_keys(model):
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def test_unimatch_keys_shapes_and_order_are_unimatchs_then_the_representation_head():
    ours = _unimatch_keys(_meta_model("deeplabv3p_unimatch", 21, depth=50))
    assert len(UNIMATCH_KEYS) == 386
    assert ours[:386] == UNIMATCH_KEYS
    assert [k for k, _, _ in ours[386:]] == [
        "representation.0.weight",
        "representation.1.weight",
        "representation.1.bias",
        "representation.1.running_mean",
        "representation.1.running_var",
        "representation.1.num_batches_tracked",
        "representation.3.weight",
        "representation.3.bias",
    ]
    # parameters without the ReCo head: 40.5 M (R50) and 59.5 M (R101), as UniMatch's logs say
    for depth, count in ((50, 40_475_957), (101, 59_468_085)):
        model = _meta_model("deeplabv3p_unimatch", 21, depth=depth)
        unimatch = [p for n, p in model.named_parameters() if not n.startswith("representation.")]
        assert sum(p.numel() for p in unimatch) == count


def test_unimatch_layout_deep_stem_and_output_stride_16():
    model = _meta_model("deeplabv3p_unimatch", 21)
    convs = [m for m in model.backbone.conv1 if isinstance(m, nn.Conv2d)]
    stem = [(m.in_channels, m.out_channels, m.stride) for m in convs]
    assert stem == [(3, 64, (2, 2)), (64, 64, (1, 1)), (64, 128, (1, 1))]
    assert model.backbone.layer3[0].conv2.stride == (2, 2) and len(model.backbone.layer3) == 23
    config = _conv_config(model.backbone.layer4)
    assert config[0] == ("0.conv2", (1, 1), (1, 1), (1, 1))
    assert all(c[1:] == ((1, 1), (2, 2), (2, 2)) for c in config[1:])
    rates = [branch[0].dilation for branch in (model.head.b1, model.head.b2, model.head.b3)]
    assert rates == [(6, 6), (12, 12), (18, 18)]
    torch.manual_seed(0)
    small = network.build_model("deeplabv3p_unimatch", 5, output_dim=8, resnet_depth=18).eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        low, high = small.encode(x)
        logits, rep = small(x)
        assert (low.shape[-1], high.shape[-1]) == (17, 5)
        assert (logits.shape, rep.shape) == ((2, 5, 17, 17), (2, 8, 17, 17))
        torch.testing.assert_close(small.decode(low, high, with_rep=False)[0], logits, rtol=0, atol=0)
        assert small.decode(low, high, rep_rows=1)[1].shape == (1, 8, 17, 17)


def test_reco_deeplab_forward_is_encode_then_decode():
    torch.manual_seed(0)
    model = network.build_model("deeplabv3p", 4, output_dim=8, resnet_depth=18).eval()
    x = torch.randn(2, 3, 49, 49)
    with torch.no_grad():
        logits, rep = model(x)
        split = model.decode(*model.encode(x), rep_rows=1)
    assert torch.equal(split[0], logits) and torch.equal(split[1], rep[:1])


def _unimatch_backbone_file(path, depth=50):
    """A backbone file as UniMatch ships it: key names without 'backbone.', an fc, no num_batches_tracked."""
    torch.manual_seed(3)
    state = {
        k.removeprefix("backbone."): torch.randn(shape)
        for k, shape, _ in UNIMATCH_KEYS
        if k.startswith("backbone.") and not k.endswith("num_batches_tracked")
    }
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    torch.save(state, path)
    return state


def test_unimatch_backbone_file_loads_strictly(tmp_path):
    state = _unimatch_backbone_file(tmp_path / "resnet50.pth")
    model = network.build_model(
        "deeplabv3p_unimatch", 21, resnet_depth=50, pretrained=str(tmp_path / "resnet50.pth")
    )
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    del state["layer4.2.bn3.running_var"]  # one key short: refused, not half loaded
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(UserError, match="deep-stem"):
        network.build_model(
            "deeplabv3p_unimatch", 21, resnet_depth=50, pretrained=str(tmp_path / "short.pth")
        )


@pytest.mark.parametrize(
    "source,found", [("torchvision", "7x7-stem torchvision ResNet"), ("reco", "ReCo DeepLab checkpoint")]
)
def test_wrong_architecture_for_unimatch_is_one_line_naming_the_family_and_fix(tmp_path, source, found):
    if source == "torchvision":
        state = torchvision.models.resnet18(weights=None).state_dict()
    else:
        state = network.build_model("deeplabv3p", 3, resnet_depth=18).state_dict()
    torch.save(state, tmp_path / "weights.pth")
    with pytest.raises(UserError) as error:
        network.build_model(
            "deeplabv3p_unimatch", 3, resnet_depth=18, pretrained=str(tmp_path / "weights.pth")
        )
    message = str(error.value)
    assert "\n" not in message and "weights.pth" in message and found in message
    assert "UniMatch's deep-stem ResNet (conv1.0" in message and "--backbone deeplabv3p" in message
    with pytest.raises(UserError, match="--pretrained imagenet.*--pretrained PATH"):
        network.build_model("deeplabv3p_unimatch", 3, resnet_depth=18, pretrained="imagenet")


def test_deep_stem_file_for_recos_network_points_to_the_unimatch_backbone(tmp_path):
    torch.save(network.build_deep_stem_resnet(18).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(UserError, match="needs --backbone deeplabv3p_unimatch"):
        network.build_model("deeplabv3p", 3, resnet_depth=18, pretrained=str(tmp_path / "deep.pth"))


def test_unimatch_checkpoint_loads_in_the_checkpoint_readers(tmp_path):
    """latest.pth / best.pth as UniMatch saves them: {'model': DDP state_dict ('module.'), ...}, no ReCo
    head."""
    torch.manual_seed(0)
    model = network.build_model("deeplabv3p_unimatch", 4, resnet_depth=18).eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("representation.")}
    torch.save({"model": state, "optimizer": {}, "epoch": 3, "previous_best": 50.0}, tmp_path / "best.pth")
    loaded = network.load_model(tmp_path / "best.pth", num_classes=4).eval()
    x = torch.randn(1, 3, 49, 49)
    with torch.no_grad():
        assert torch.equal(loaded(x, with_rep=False)[0], model(x, with_rep=False)[0])
    assert network.infer_config(network.load_state_dict(tmp_path / "best.pth")) == {
        "backbone": "deeplabv3p_unimatch",
        "resnet_depth": 18,
        "num_classes": 4,
        "output_dim": 256,
    }
    meta = {k: torch.empty(shape, device="meta") for k, shape, _ in UNIMATCH_KEYS}
    assert network.infer_config(meta)["resnet_depth"] == 50
    del state["module.fuse.4.bias"]  # strict on every UniMatch key
    torch.save({"model": state}, tmp_path / "short.pth")
    expected = r"short.pth does not fit a deeplabv3p_unimatch ResNet-18.*fuse.4.bias"
    with pytest.raises(UserError, match=expected):
        network.load_model(tmp_path / "short.pth")
