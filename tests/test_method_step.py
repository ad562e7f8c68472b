"""methods.py: the FixMatch / UniMatch step against the authors' recorded steps (bench/method_step.py on the
fixtures in tests/data, whose README.md says where they come from), and its parts on tiny networks."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import methods
import network
from module_list import IGNORE_INDEX, compute_ohem_loss, compute_supervised_loss

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["unimatch_step", "fixmatch_step"])
def test_replay_matches_the_authors_code(fixture):
    """Two recorded optimiser steps of UniMatch's own unimatch.py / fixmatch.py, replayed in float64."""
    command = [
        sys.executable,
        str(REPO / "bench" / "method_step.py"),
        "--fixture",
        str(REPO / "tests" / "data" / fixture),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["init_match"] and result["images_match"] and result["lr_match"] and result["pseudo_match"]
    assert result["loss_rel_diff"] <= 1e-5, result["steps"]
    assert result["state_rel_diff"] <= 1e-4
    assert len(result["steps"]) == 2 and all(
        len(s["losses"]) == (5 if fixture == "unimatch_step" else 3) for s in result["steps"]
    )


def test_poly_lr_has_unimatchs_off_by_one():
    assert methods.poly_lr(0.01, 0, 8) == methods.poly_lr(0.01, 1, 8) == 0.01
    assert methods.poly_lr(0.01, 2, 8) == 0.01 * (1 - 1 / 8) ** 0.9
    assert methods.poly_lr(0.01, 8, 8) == 0.01 * (1 / 8) ** 0.9


@pytest.mark.parametrize("backbone,prefix", [("deeplabv3p_unimatch", "backbone."), ("deeplabv3p", "resnet_")])
def test_optimizer_groups_backbone_and_head(backbone, prefix):
    model = network.build_model(backbone, 3, resnet_depth=18)
    optimizer = methods.method_optimizer(model, 0.001, 10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    group0, group1 = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    assert group0 and all(n.startswith(prefix) for n in group0)
    assert group1 and not any(n.startswith(prefix) for n in group1) and "representation.3.bias" in group1
    assert len(group0) + len(group1) == len(names)
    methods.set_lr(optimizer, 0.002, 10.0)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.002, 0.9, 1e-4),
        (0.02, 0.9, 1e-4),
    ]


def _ohem_by_sorting(pred, target, thresh, min_kept):
    """OHEM written the plain way: sort the valid pixels' target probabilities, keep the hard ones."""
    prob = pred.softmax(1).gather(1, target.clamp(min=0)[:, None])[:, 0]
    valid = target >= 0
    if valid.sum() < min_kept:
        return compute_supervised_loss(pred, target)
    cut = max(thresh, prob[valid].sort().values[min_kept - 1].item())
    return compute_supervised_loss(pred, target.masked_fill(~valid | (prob > cut), IGNORE_INDEX))


@pytest.mark.parametrize("min_kept", [1, 50, 300, 2000])
def test_ohem_keeps_the_hard_pixels(min_kept):
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 16, 16, dtype=torch.float64) * 3
    target = torch.randint(0, 4, (2, 16, 16)).masked_fill(torch.rand(2, 16, 16) < 0.2, IGNORE_INDEX)
    ours = compute_ohem_loss(pred, target, 0.7, min_kept)
    torch.testing.assert_close(ours, _ohem_by_sorting(pred, target, 0.7, min_kept), rtol=1e-12, atol=0)
    if min_kept > (target >= 0).sum():  # too few pixels: plain CE
        assert ours == compute_supervised_loss(pred, target)


def _tiny(backbone="deeplabv3p_unimatch", seed=0):
    torch.manual_seed(seed)
    return network.build_model(backbone, 4, output_dim=8, resnet_depth=18)


def _batch(method, batch=2, size=33, seed=1):
    generator = torch.Generator().manual_seed(seed)

    def image():
        return torch.randn(batch, 3, size, size, generator=generator)

    def mask(p):
        return torch.rand(batch, size, size, generator=generator) < p

    two = method == "unimatch"
    labels = torch.randint(0, 4, (batch, size, size), generator=generator)
    labels = labels.masked_fill(mask(0.1), IGNORE_INDEX)
    return methods.MethodBatch(
        images_x=image(),
        labels_x=labels,
        weak=image(),
        strong1=image(),
        strong2=image() if two else None,
        padding=mask(0.1),
        box1=mask(0.3),
        box2=mask(0.3) if two else None,
        mix_weak=image(),
        mix_strong1=image(),
        mix_strong2=image() if two else None,
        mix_padding=mask(0.1),
    )


def test_perturbed_forward_decodes_clean_and_dropped_features_together():
    model = _tiny().train()
    net = methods.PerturbedNet(model)
    x = torch.randn(2, 3, 33, 33)
    keep = [torch.rand(2, 64) < 0.5, torch.rand(2, 512) < 0.5]
    state = copy.deepcopy(model.state_dict())
    logits, logits_fp, rep = net(x, rep_rows=2, keep=keep)
    model.load_state_dict(state)  # the same BN state for the reference computation
    low, high = model.encode(x)
    dropped = [f * k[:, :, None, None] * 2 for f, k in zip((low, high), keep)]
    expected, expected_rep = model.decode(
        torch.cat([low, dropped[0]]), torch.cat([high, dropped[1]]), rep_rows=2
    )
    assert torch.equal(logits, expected[:2]) and torch.equal(logits_fp, expected[2:])
    assert torch.equal(rep, expected_rep) and rep.shape[0] == 2
    drawn = net(x, perturb=True)  # masks drawn on the device
    assert drawn[1].shape == logits_fp.shape and drawn[2] is None
    assert net(x)[1] is None


@pytest.mark.parametrize("method", methods.ONLINE_METHODS)
def test_step_runs_with_reco_on_top_and_reco_only_adds_its_weighted_term(method):
    batch = _batch(method)
    model = _tiny()
    keep = [torch.rand(4, 64) < 0.5, torch.rand(4, 512) < 0.5] if method == "unimatch" else None
    plain = methods.method_step(
        methods.PerturbedNet(copy.deepcopy(model)),
        batch,
        methods.MethodSettings(method=method, conf_thresh=0.3),
        keep,
    )
    settings = methods.MethodSettings(
        method=method,
        conf_thresh=0.3,
        apply_reco=True,
        reco_weight=0.5,
        strong_threshold=1.0,
        weak_threshold=0.0,
        num_queries=8,
        num_negatives=8,
    )
    net = methods.PerturbedNet(model)
    out = methods.method_step(net, batch, settings, keep)
    terms = dict(zip(methods.TERMS[method], out.terms))
    assert out.terms.shape == (len(methods.TERMS[method]),) and terms["reco"] > 0
    assert torch.allclose(out.loss, plain.loss + 0.5 * terms["reco"], rtol=1e-6, atol=0)
    assert torch.equal(out.terms[:-2], plain.terms[:-2])  # the method's own terms are untouched by ReCo
    assert out.pred_x.shape == out.pseudo.shape == (2, 33, 33) and net.training
    out.loss.backward()
    assert model.representation[3].weight.grad.abs().sum() > 0


def test_unimatch_loss_by_hand_on_a_tiny_network():
    """The five terms recomputed from the network's outputs with the formulas of UniMatch's step."""
    batch = _batch("unimatch", seed=4)
    model = _tiny(seed=5)
    keep = [torch.rand(4, 64) < 0.5, torch.rand(4, 512) < 0.5]
    reference = copy.deepcopy(model)
    settings = methods.MethodSettings(conf_thresh=0.4)
    out = methods.method_step(methods.PerturbedNet(model), batch, settings, keep)

    def up(logits):
        return F.interpolate(logits, size=(33, 33), mode="bilinear", align_corners=True)

    net = methods.PerturbedNet(reference).eval()
    with torch.no_grad():
        mix = up(net(batch.mix_weak)[0])
    net.train()
    s1 = torch.where(batch.box1[:, None], batch.mix_strong1, batch.strong1)
    s2 = torch.where(batch.box2[:, None], batch.mix_strong2, batch.strong2)
    logits, logits_fp, _ = net(torch.cat([batch.images_x, batch.weak]), keep=keep)
    pred_s1, pred_s2 = up(net(torch.cat([s1, s2]))[0]).chunk(2)
    weak = up(logits[2:]).detach()

    def unsup(pred, box):
        label = torch.where(box, mix.argmax(1), weak.argmax(1))
        conf = torch.where(box, mix.softmax(1).amax(1), weak.softmax(1).amax(1))
        pad = torch.where(box, batch.mix_padding, batch.padding)
        return (F.cross_entropy(pred, label, reduction="none") * ((conf >= 0.4) & ~pad)).sum() / (~pad).sum()

    sup = F.cross_entropy(up(logits[:2]), batch.labels_x, ignore_index=IGNORE_INDEX)
    fp = unsup(up(logits_fp[2:]), torch.zeros_like(batch.box1))
    expected = [sup, unsup(pred_s1, batch.box1), unsup(pred_s2, batch.box2), fp]
    torch.testing.assert_close(out.terms[:4], torch.stack(expected).detach())
    total = (expected[0] + 0.25 * expected[1] + 0.25 * expected[2] + 0.5 * fp) / 2
    torch.testing.assert_close(out.loss, total)


# --- the mean teacher, moved here from the engine ------------------------------------------------

# (partial labels, ReCo, mixing) -> logged (sup, unsup, reco), loss and the summed |gradient| of every
# parameter, as the engine's step computed them before it moved to methods.py
MEAN_TEACHER_BEFORE = {
    (False, True, "classmix"): ([1.6487838, 0.3095918, 3.0588298], 5.0172052, 77896.03),
    (True, True, "cutmix"): ([1.6487838, 1.3439375, 3.0388525], 6.0315738, 93488.3922),
    (False, False, "cutout"): ([1.6487838, 0.4645739, 0.0], 2.1133578, 76972.8586),
}


@pytest.mark.parametrize("partial, reco, aug", list(MEAN_TEACHER_BEFORE))
def test_mean_teacher_step_computes_what_it_did_and_weighs_reco(partial, reco, aug):
    def step(reco_weight: float):
        torch.manual_seed(0)
        model = network.build_model("deeplabv3p", 5, output_dim=16, resnet_depth=18)
        teacher = copy.deepcopy(model)
        g = torch.Generator().manual_seed(3)
        images = torch.randn(4, 3, 33, 33, generator=g)
        labels = torch.randint(-1, 5, (4, 1, 5, 5), generator=g).float()
        labels = F.interpolate(labels, size=(33, 33), mode="nearest")[:, 0].long()
        settings = methods.MethodSettings(
            method="meanteacher",
            apply_reco=reco,
            reco_weight=reco_weight,
            strong_threshold=0.3,
            num_queries=16,
            num_negatives=32,
            apply_aug=aug,
            partial=partial,
            scale_range=(0.75, 1.25),
        )
        torch.manual_seed(1)
        out = methods.mean_teacher_step(
            methods.Views(model),
            methods.Views(teacher),
            (images[:2], labels[:2]),
            (images[2:], labels[2:]),
            settings,
        )
        out.loss.backward()
        return out, sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None)

    out, grad = step(1.0)
    terms, loss, grad_before = MEAN_TEACHER_BEFORE[(partial, reco, aug)]
    assert out.terms.tolist() == pytest.approx(terms, rel=1e-4, abs=1e-6)
    assert out.loss.item() == pytest.approx(loss, rel=1e-4) and grad == pytest.approx(grad_before, rel=1e-3)
    assert out.loss.item() == pytest.approx(sum(terms), rel=1e-6)  # weight 1: the plain sum
    doubled, _ = step(2.0)
    assert torch.equal(doubled.terms, out.terms)  # the logged ReCo term is unweighted
    assert doubled.loss.item() == pytest.approx(out.loss.item() + terms[2], rel=1e-6)


@pytest.mark.parametrize("method", ["meanteacher", "unimatch"])
def test_the_step_jitters_the_unlabelled_images_by_the_runs_hue(method, monkeypatch):
    hues = []

    def record(real):
        def wrapper(*args, **kwargs):
            if method == "unimatch" or args[5]:  # the mean teacher: the augmenting transform only
                hues.append(kwargs.get("hue"))
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(methods, "batch_transform", record(methods.batch_transform))
    monkeypatch.setattr(methods, "unlabelled_views", record(methods.unlabelled_views))
    model = methods.Views(_tiny("deeplabv3p")) if method == "meanteacher" else methods.PerturbedNet(_tiny())
    g = torch.Generator().manual_seed(3)
    images, labels = torch.rand(2, 3, 33, 33, generator=g), torch.randint(0, 4, (2, 33, 33), generator=g)
    padding = torch.zeros(2, 33, 33, dtype=torch.bool)
    unlabelled = (images, labels) if method == "meanteacher" else (images, padding, labels, images, padding)
    settings = methods.MethodSettings(method=method, hue_jitter=0.1)
    methods.training_step(method, model, copy.deepcopy(model), [(images, labels), unlabelled], settings)
    assert hues == ([0.1] if method == "meanteacher" else [0.1, 0.1])
