"""One training step per method, as pure functions over (networks, batch, settings): supervised, the
reference's mean teacher, FixMatch and UniMatch, each with ReCo's regional contrast loss as an add-on; and the
optimiser and learning-rate schedule FixMatch and UniMatch train with.

FixMatch and UniMatch follow their authors' code (LiheYoung/UniMatch, CVPR 2023: `fixmatch.py`,
`unimatch.py`) step for step, so that the same batches, dropout masks and weights give the same losses and
updates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import full_precision
from module_list import (
    ONLINE_METHODS,
    compute_ohem_loss,
    compute_reco_loss,
    compute_supervised_loss,
    compute_unsupervised_loss,
    generate_unsup_data,
    label_onehot,
)
from network import upsample
from transforms import HUE_JITTER, batch_transform
from unimatch_views import unlabelled_views

# The names of the logged terms each step returns, in order ('sup': the supervised scripts' step).
TERMS = {
    "sup": ("loss",),
    "meanteacher": ("sup", "unsup", "reco"),
    "fixmatch": ("sup", "unsup_s", "reco", "mask_ratio"),
    "unimatch": ("sup", "unsup_s1", "unsup_s2", "unsup_fp", "reco", "mask_ratio"),
}
CRITERIA = ("ce", "ohem")


class MethodBatch(NamedTuple):
    """One step's data: images [B,3,H,W] normalised, masks [B,H,W]; the *2 fields are None for FixMatch."""

    images_x: Tensor  # labelled images
    labels_x: Tensor  # their labels, long, module_list.IGNORE_INDEX where void (or padded)
    weak: Tensor  # unlabelled images, weak view (geometry only)
    strong1: Tensor  # strong view 1 of the same crops, before CutMix
    strong2: Tensor | None  # strong view 2 (UniMatch)
    padding: Tensor  # bool, True where the unlabelled crop is padding
    box1: Tensor  # bool, True where strong view 1 takes the mix batch's pixels and targets
    box2: Tensor | None  # the same for strong view 2 (UniMatch)
    mix_weak: Tensor  # the mix batch (other unlabelled crops): weak view
    mix_strong1: Tensor  # its strong view 1, pasted into strong1 inside box1
    mix_strong2: Tensor | None  # its strong view 2, pasted into strong2 inside box2 (UniMatch)
    mix_padding: Tensor  # bool, its padding


class MethodSettings(NamedTuple):
    """What a step needs besides the networks and the batch (UniMatch's Pascal values by default)."""

    method: str = "unimatch"  # a key of TERMS
    conf_thresh: float = 0.95  # tau: pseudo-labels with a lower confidence are not learnt from
    criterion: str = "ce"  # labelled loss: 'ce' (ignore void) or 'ohem' (Cityscapes)
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000  # see ohem_min_kept()
    apply_reco: bool = False
    reco_weight: float = 1.0
    strong_threshold: float = 0.97  # ReCo: queries are pixels predicted below this confidence
    weak_threshold: float = 0.7  # ReCo: pseudo-labelled pixels from this confidence on
    temp: float = 0.5
    num_queries: int = 256
    num_negatives: int = 256
    apply_aug: str = "cutout"  # the mean teacher's mixing (module_list.MIX_MODES)
    partial: bool = False  # the mean teacher on partial labels
    scale_range: tuple[float, float] = (1.0, 1.0)  # the mean teacher's rescaling of the unlabelled batch
    hue_jitter: float = HUE_JITTER  # the strong views' (mean teacher: the second batch_transform's) jitter
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # around the forwards


class StepOutput(NamedTuple):
    """What a step returns."""

    loss: Tensor  # the scalar to backpropagate
    terms: Tensor  # [len(TERMS[method])], detached
    pred_x: Tensor  # [B,H,W] long: the labelled images' predicted classes (for a monitor)
    pseudo: Tensor | None  # [B,H,W] long: the unlabelled images' pseudo-labels (None: supervised)


def ohem_min_kept(batch_size: int) -> int:
    """OHEM's min_kept for a per-process labelled batch: UniMatch keeps 200000 pixels per 2 crops per GPU."""
    return 100_000 * batch_size


class Views(nn.Module):
    """Runs the model on each input separately (own BN statistics) inside one call, so that DDP sees one
    forward (and torch.compile one graph); inputs are put in the weights' memory format."""

    def __init__(self, model: nn.Module, layout: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, *inputs: Tensor, with_rep: bool = True) -> list[tuple[Tensor, Tensor | None]]:
        """Each input [N,3,H,W] -> (logits, representation or None) at the network's output stride."""
        return [self.model(x.contiguous(memory_format=self.layout), with_rep) for x in inputs]


class PerturbedNet(nn.Module):
    """A network with encode/decode in one call, plain or with UniMatch's feature perturbation, so that DDP
    and torch.compile see one forward; inputs are put in the weights' memory format."""

    def __init__(self, model: nn.Module, layout: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(
        self, images: Tensor, rep_rows: int = 0, perturb: bool = False, keep: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """images [N,3,H,W] -> (logits [N,C,h,w], perturbed logits [N,C,h,w] or None, representation of
        the first rep_rows images or None), at the network's output stride.

        perturb: decode [clean; channel-dropped] encoder features in one batch (its BN statistics mix both),
        the low- and high-level features each with Dropout2d(0.5): a (sample, channel) is zeroed with
        probability 0.5, the others doubled. keep: the two keep-masks (low [N,C_low], high [N,C_high], bool)
        instead of a draw on the device.
        """
        low, high = self.model.encode(images.contiguous(memory_format=self.layout))
        if not (perturb or keep is not None):
            logits, rep = self.model.decode(low, high, rep_rows > 0, rep_rows)
            return logits, None, rep
        if keep is None:
            keep = _keep_masks(low, high)
        low, high = (
            torch.cat([f, f * (k[:, :, None, None].to(f.dtype) * 2)]) for f, k in zip((low, high), keep)
        )
        logits, rep = self.model.decode(low, high, rep_rows > 0, rep_rows)
        count = images.shape[0]
        return logits[:count], logits[count:], rep


@torch.compiler.disable  # eager draws: the same masks compiled or not (acceleration changes no result)
def _keep_masks(*features: Tensor) -> list[Tensor]:
    """Dropout2d(0.5)'s keep-masks, [N, C] bool for each feature map [N, C, H, W]."""
    return [torch.rand(f.shape[:2], device=f.device) < 0.5 for f in features]


def nearest(x: Tensor, size: Sequence[int]) -> Tensor:
    """[B, H, W] labels or masks -> [B, h, w] by nearest neighbour (the reference's ReCo resolution)."""
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(x.dtype)


def reco_inputs(
    labels: Tensor, masks: Tensor, logits: Tensor, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One-hot labels, validity mask and class probabilities at the logits' resolution (compute_reco_loss)."""
    size = logits.shape[-2:]
    labels, masks = nearest(labels, size), nearest(masks, size)
    prob = torch.softmax(full_precision(logits), dim=1)
    return label_onehot(labels, num_classes), masks[:, None].float(), prob


def settings_reco_loss(
    rep: Tensor, onehot: Tensor, mask: Tensor, prob: Tensor, settings: MethodSettings
) -> Tensor:
    """ReCo's loss, unweighted, with the step's thresholds, temperature and sample sizes."""
    return compute_reco_loss(
        rep,
        onehot,
        mask,
        prob,
        settings.strong_threshold,
        settings.temp,
        settings.num_queries,
        settings.num_negatives,
    )


def _confidence_and_label(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(max softmax, argmax of the logits) over dim 1, as UniMatch takes them."""
    return logits.softmax(1).max(1).values, logits.argmax(1)


def _masked_ce(logits: Tensor, label: Tensor, conf: Tensor, padding: Tensor, tau: float) -> Tensor:
    """Per-pixel CE summed over confident (>= tau) non-padded pixels, divided by the non-padded count."""
    loss = F.cross_entropy(logits, label, reduction="none") * ((conf >= tau) & ~padding)
    return loss.sum() / (~padding).sum().clamp(min=1)  # no pixel at all: 0 (UniMatch divides by 0)


def _labelled_loss(logits: Tensor, labels: Tensor, settings: MethodSettings) -> Tensor:
    if settings.criterion == "ohem":
        return compute_ohem_loss(logits, labels, settings.ohem_thresh, settings.ohem_min_kept)
    return compute_supervised_loss(logits, labels)


def method_step(
    net: nn.Module, batch: MethodBatch, settings: MethodSettings, keep: Sequence[Tensor] | None = None
) -> StepOutput:
    """The loss of one FixMatch or UniMatch step as their authors' code computes it, plus ReCo's if asked.

    net: a PerturbedNet (DDP-wrapped or not); it is left in train mode. keep: UniMatch's two dropout
    keep-masks for the [labelled; weak] forward, [2B, C_low] and [2B, C_high] bool (None: drawn on the
    device).

    1. Mix batch, eval mode (BN running statistics), no gradient: its confidences and pseudo-labels.
    2. CutMix: each strong view takes the mix batch's strong view of the same index inside its box.
    3. Train mode: one forward on [labelled; weak] (UniMatch: with the perturbed copy decoded in the same
       batch), one on the strong views together ([s1; s2] for UniMatch, s1 for FixMatch).
    4. The weak view's detached prediction is the pseudo-label; a strong view's targets take the mix batch's
       pseudo-label, confidence and padding inside its box.
    5. Loss: UniMatch (sup + 0.25 s1 + 0.25 s2 + 0.5 fp) / 2, FixMatch (sup + s) / 2; each unlabelled term
       sums CE over confident non-padded pixels and divides by the non-padded count.
    6. ReCo (apply_reco), + reco_weight * its loss: representations from the representation head on the clean
       features of the labelled images (the [labelled; weak] forward, clean half) and of the strong views
       (after CutMix); labels from the labelled ground truth (valid where not void) and from the strong views'
       mixed pseudo-labels (valid where confidence >= weak_threshold and not padding); class probabilities
       from the network's own detached prediction on the same images (labelled and strong); all at the
       representation's stride by nearest neighbour.
    """
    if settings.method not in ONLINE_METHODS:
        raise ValueError(
            f"method_step: unknown method {settings.method!r}; choose one of {', '.join(ONLINE_METHODS)}"
        )
    unimatch = settings.method == "unimatch"
    size = batch.weak.shape[-2:]
    count_x = batch.images_x.shape[0]
    views = [(batch.strong1, batch.box1, batch.mix_strong1)]
    if unimatch:
        views.append((batch.strong2, batch.box2, batch.mix_strong2))

    net.eval()
    with torch.no_grad():
        with settings.autocast():
            logits_mix = net(batch.mix_weak)[0]
        conf_mix, label_mix = _confidence_and_label(upsample(logits_mix, size))
    strong = torch.cat([torch.where(box[:, None], mix, image) for image, box, mix in views])

    net.train()
    reco = settings.apply_reco
    with settings.autocast():
        logits_b, logits_fp, rep_x = net(
            torch.cat([batch.images_x, batch.weak]),
            rep_rows=count_x if reco else 0,
            perturb=unimatch,
            keep=keep,
        )
        logits_c, _, rep_c = net(strong, rep_rows=strong.shape[0] if reco else 0)
    pred_x = upsample(logits_b[:count_x], batch.labels_x.shape[-2:])
    with torch.no_grad():
        conf_w, label_w = _confidence_and_label(upsample(logits_b[count_x:].detach(), size))
    targets = [
        (
            torch.where(box, label_mix, label_w),
            torch.where(box, conf_mix, conf_w),
            torch.where(box, batch.mix_padding, batch.padding),
        )
        for _, box, _ in views
    ]

    tau = settings.conf_thresh
    sup = _labelled_loss(pred_x, batch.labels_x, settings)
    preds = upsample(logits_c, size).chunk(len(views))
    unsup = [_masked_ce(pred, *target, tau) for pred, target in zip(preds, targets)]
    if unimatch:
        fp = _masked_ce(upsample(logits_fp[count_x:], size), label_w, conf_w, batch.padding, tau)
        loss = (sup + unsup[0] * 0.25 + unsup[1] * 0.25 + fp * 0.5) / 2.0
        unsup.append(fp)
    else:
        loss = (sup + unsup[0]) / 2.0

    reco_loss = loss.new_zeros(())
    if reco:
        with torch.no_grad():
            labels = torch.cat([batch.labels_x] + [label for label, _, _ in targets])
            valid = torch.cat(
                [batch.labels_x >= 0]
                + [(conf >= settings.weak_threshold) & ~padding for _, conf, padding in targets]
            )
            onehot, mask, prob = reco_inputs(
                labels, valid, torch.cat([logits_b[:count_x], logits_c]), logits_c.shape[1]
            )
        reco_loss = settings_reco_loss(torch.cat([rep_x, rep_c]), onehot, mask, prob, settings)
        loss = loss + settings.reco_weight * reco_loss

    with torch.no_grad():
        confident = ((conf_w >= tau) & ~batch.padding).sum().to(conf_w.dtype)
        mask_ratio = confident / (~batch.padding).sum().clamp(min=1)
        terms = torch.stack([t.to(loss.dtype) for t in (sup, *unsup, reco_loss, mask_ratio)])
    return StepOutput(loss, terms.detach(), pred_x.detach().argmax(1), label_w)


def supervised_step(net: nn.Module, images: Tensor, labels: Tensor, settings: MethodSettings) -> StepOutput:
    """The supervised scripts' step: CE on a labelled batch (images [B,3,H,W], labels [B,H,W]), plus ReCo with
    the labels as its classes (valid where not void). net: a Views."""
    with settings.autocast():
        [(logits, rep)] = net(images, with_rep=settings.apply_reco)
    logits_up = upsample(logits, labels.shape[-2:])
    loss = compute_supervised_loss(logits_up, labels)
    if settings.apply_reco:
        with torch.no_grad():
            onehot, mask, prob = reco_inputs(labels, labels >= 0, logits, logits.shape[1])
        loss = loss + settings.reco_weight * settings_reco_loss(rep, onehot, mask, prob, settings)
    return StepOutput(loss, loss.detach()[None], logits_up.argmax(1), None)


def mean_teacher_step(
    student: nn.Module,
    teacher: nn.Module,
    labelled: Sequence[Tensor],
    unlabelled: Sequence[Tensor],
    settings: MethodSettings,
) -> StepOutput:
    """The reference's semi-supervised step: the teacher's pseudo-labels, re-cropped, mixed (apply_aug) and
    re-augmented with their images; the loss sup + unsup + reco_weight * ReCo. student, teacher: Views;
    labelled, unlabelled: (images [B,3,H,W], labels [B,H,W]) each (unlabelled labels: partial, or
    monitored)."""
    (images_l, labels_l), (images_u, labels_u) = labelled, unlabelled
    crop = images_u.shape[-2:]
    with torch.no_grad():
        with settings.autocast():
            [(teacher_logits, _)] = teacher(images_u, with_rep=False)
        conf_u, pseudo_u = torch.softmax(upsample(teacher_logits, crop), dim=1).max(dim=1)
        monitored = pseudo_u
        if settings.partial:  # partial ground truth overrides the teacher, with full confidence
            known = labels_u >= 0
            pseudo_u = torch.where(known, labels_u, pseudo_u)
            conf_u = torch.where(known, torch.ones_like(conf_u), conf_u)
        images_u, pseudo_u, conf_u = batch_transform(
            images_u, pseudo_u, conf_u, crop, settings.scale_range, False
        )
        images_u, pseudo_u, conf_u = generate_unsup_data(images_u, pseudo_u, conf_u, settings.apply_aug)
        images_u, pseudo_u, conf_u = batch_transform(
            images_u, pseudo_u, conf_u, crop, (1.0, 1.0), True, hue=settings.hue_jitter
        )

    with settings.autocast():
        (logits_l, rep_l), (logits_u, rep_u) = student(images_l, images_u, with_rep=settings.apply_reco)
    logits_l_up = upsample(logits_l, labels_l.shape[-2:])
    sup = compute_supervised_loss(logits_l_up, labels_l)
    unsup = compute_unsupervised_loss(upsample(logits_u, crop), pseudo_u, conf_u, settings.strong_threshold)
    reco = torch.zeros((), device=sup.device)
    if settings.apply_reco:
        with torch.no_grad():
            if settings.partial:  # the student's confident predictions complete the sparse labels
                conf_l, pred_l = torch.softmax(logits_l_up, dim=1).max(dim=1)
                known = labels_l >= 0
                reco_labels_l = torch.where(known, labels_l, pred_l)
                reco_mask_l = known | (conf_l >= 0.97)  # the reference hard-codes 0.97 here
            else:
                reco_labels_l, reco_mask_l = labels_l, labels_l >= 0
            onehot, mask, prob = reco_inputs(
                torch.cat([reco_labels_l, pseudo_u]),
                torch.cat([reco_mask_l, conf_u >= settings.weak_threshold]),
                torch.cat([logits_l, logits_u]),
                logits_l.shape[1],
            )
        reco = settings_reco_loss(torch.cat([rep_l, rep_u]), onehot, mask, prob, settings)
    loss = sup + unsup + settings.reco_weight * reco
    return StepOutput(loss, torch.stack([sup, unsup, reco]).detach(), logits_l_up.argmax(1), monitored)


def online_batch(
    method: str, labelled: Sequence[Tensor], unlabelled: Sequence[Tensor], hue: float = HUE_JITTER
) -> MethodBatch:
    """A MethodBatch from the loaders' items on the training device: labelled (images normalised, labels)
    and unlabelled (weak crops in [0, 1], their padding, labels, the mix batch's weak crops and padding); the
    strong views (largest hue rotation: hue) and CutMix boxes are drawn here, from the device's RNG."""
    images_x, labels_x = labelled
    weak, padding, _, mix_weak, mix_padding = unlabelled
    weak, strong1, strong2, _, box1, box2 = unlabelled_views(weak, padding, hue=hue)
    mix_weak, mix_strong1, mix_strong2, *_ = unlabelled_views(mix_weak, mix_padding, hue=hue)
    two = method == "unimatch"  # FixMatch's loader makes the second view too, and leaves it unused
    return MethodBatch(
        images_x,
        labels_x,
        weak,
        strong1,
        strong2 if two else None,
        padding,
        box1.bool(),
        box2.bool() if two else None,
        mix_weak,
        mix_strong1,
        mix_strong2 if two else None,
        mix_padding,
    )


def training_step(
    method: str,
    student: nn.Module,
    teacher: nn.Module | None,
    batch: Sequence[Sequence[Tensor]],
    settings: MethodSettings,
) -> tuple[StepOutput, list[Tensor]]:
    """One step of a method (a key of TERMS) on the loaders' items on the device; returns its output and the
    ground truth its predictions are monitored against (labelled, then unlabelled labels)."""
    if method == "sup":
        return supervised_step(student, *batch[0], settings), [batch[0][1]]
    if method == "meanteacher":
        return mean_teacher_step(student, teacher, batch[0], batch[1], settings), [batch[0][1], batch[1][1]]
    step_batch = online_batch(method, *batch, hue=settings.hue_jitter)
    return method_step(student, step_batch, settings), [batch[0][1], batch[1][2]]


def method_optimizer(
    model: nn.Module, lr: float, lr_multi: float, weight_decay: float = 1e-4
) -> torch.optim.SGD:
    """UniMatch's SGD (momentum 0.9, weight decay on every parameter): group 0 the backbone at lr, group 1 the
    rest of the network at lr * lr_multi. model: a network with backbone_parameters() (both DeepLabv3+)."""
    backbone = list(model.backbone_parameters())
    in_backbone = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in in_backbone]
    return torch.optim.SGD(
        [{"params": backbone, "lr": lr}, {"params": head, "lr": lr * lr_multi}],
        lr=lr,
        momentum=0.9,
        weight_decay=weight_decay,
    )


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """The learning rate of step `step` (0-based over the run) in UniMatch's poly schedule.

    UniMatch sets base * (1 - i / total)^power after step i, so steps 0 and 1 both run at base_lr and step k
    at the value for k - 1; no warm-up, no floor.
    """
    done = max(step - 1, 0)
    return base_lr * max(1 - done / total_steps, 0.0) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float, lr_multi: float) -> None:
    """Put lr on method_optimizer's backbone group and lr * lr_multi on its head group."""
    optimizer.param_groups[0]["lr"] = lr
    optimizer.param_groups[1]["lr"] = lr * lr_multi
