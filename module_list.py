"""Training pieces as pure tensor functions: losses, ReCo, mixing, EMA teacher, poly schedule, mIoU.

Imports neither build_data nor engine.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import full_precision

# Ignore value inside label tensors (the reference's -1); on disk the void value is 255 (dataset_table.VOID).
IGNORE_INDEX = -1

MIX_MODES = ("cutout", "cutmix", "classmix")
# --method of the semi-supervised scripts: the reference's mean teacher, or a method without a teacher whose
# pseudo-labels are the network's own predictions on a weak view (FixMatch, UniMatch; methods.py).
ONLINE_METHODS = ("fixmatch", "unimatch")
SEMI_METHODS = ("meanteacher", *ONLINE_METHODS)
# ClassMix keeps a table of every label value per image: -1 (ignore) and classes 0..255 (labels come from
# 8-bit PNGs).
_NUM_LABEL_VALUES = 257


def _uniform_below(n: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Integers drawn uniformly from [0, n), elementwise, on n's device; entries with n == 0 give 0."""
    u = torch.rand(n.shape, generator=generator, device=n.device, dtype=torch.float64).mul_(
        n
    )  # 53 bits: no bias
    return u.long().clamp_(max=(n - 1).clamp_(min=0))


# ------------------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------------------


def compute_supervised_loss(pred: Tensor, target: Tensor, reduction: bool = True) -> Tensor:
    """Cross-entropy of pred [B,C,H,W] (any float dtype) against target [B,H,W] long, ignoring IGNORE_INDEX.

    Computed in fp32 (fp64 kept). reduction=True: mean over valid pixels (0, not NaN, when there are none);
    reduction=False: per-pixel values [B,H,W] with 0 on ignored pixels.
    """
    loss = F.cross_entropy(full_precision(pred), target, ignore_index=IGNORE_INDEX, reduction="none")
    if not reduction:
        return loss
    return loss.sum() / (target != IGNORE_INDEX).sum().clamp(min=1)


def compute_ohem_loss(pred: Tensor, target: Tensor, thresh: float = 0.7, min_kept: int = 100_000) -> Tensor:
    """Online hard example mining CE (UniMatch's Cityscapes loss): pred [B,C,H,W], target [B,H,W] -> scalar.

    With at least min_kept valid pixels in the batch, only the pixels whose probability of the target class is
    <= max(thresh, the min_kept-th smallest such probability) count; with fewer, every valid pixel does. Then
    the mean CE over the counted pixels, as compute_supervised_loss. No host sync.
    """
    pred = full_precision(pred)
    valid = target != IGNORE_INDEX
    with torch.no_grad():
        prob = pred.softmax(1).gather(1, target.clamp(min=0)[:, None])[:, 0]
        prob = prob.masked_fill(~valid, 1.0)  # ignored pixels sort last
        threshold = torch.full((), thresh, dtype=prob.dtype, device=prob.device)
        if min_kept > 0:
            kth = prob.flatten().kthvalue(min(min_kept, prob.numel())).values
            threshold = torch.maximum(threshold, kth)
        kept = torch.where(valid.sum() < min_kept, valid, valid & (prob <= threshold))
    return compute_supervised_loss(pred, target.masked_fill(~kept, IGNORE_INDEX))


def compute_unsupervised_loss(pred: Tensor, target: Tensor, conf: Tensor, strong_threshold: float) -> Tensor:
    """Confidence-weighted pseudo-label CE: pred [B,C,H,W], target [B,H,W] long, conf [B,H,W] -> scalar.

    Image weight w_b = #(conf >= strong_threshold) / #(target valid) (0 for an image without valid pixels);
    the loss is the mean of w_b * CE_p over the pixels with CE_p > 0, and 0 when there is no such pixel.
    """
    valid = (target >= 0).flatten(1).sum(1)
    strong = (conf >= strong_threshold).flatten(1).sum(1)
    weight = torch.where(valid > 0, strong / valid.clamp(min=1), 0.0)  # no valid pixel: weight 0, not x/0
    loss = compute_supervised_loss(pred, target, reduction=False)  # [B,H,W], 0 where ignored
    selected = loss > 0
    weighted = torch.where(selected, loss * weight.view(-1, 1, 1), torch.zeros_like(loss))
    return weighted.sum() / selected.sum().clamp(min=1)


def _draw_pixels(weights: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """[A,num] column indices drawn i.i.d. from each row of weights [A,P] (>= 0, each row's sum positive).

    Inverse CDF in fp64: the normalised CDF ends at exactly 1 > u, and a pixel of weight 0 has an empty bin.
    """
    cdf = weights.double().cumsum(1)
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(weights.shape[0], num, generator=generator, device=weights.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True)


def _reco_draws(
    valid: Tensor,
    hard: Tensor,
    class_probs: Tensor,
    anchors: Tensor,
    num_queries: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Pixel indices of the queries [A,Q] and negative keys [A,Q,N] for the anchor classes `anchors` [A].

    valid, hard: [C,P] bool pixel sets per class; class_probs: [C,C] negative-class distribution per
    anchor class (rows with a positive sum). Queries are uniform over the anchor's hard pixels; each
    query's negatives are num_negatives i.i.d. draws of a class from class_probs, then of a pixel uniform
    among that class's valid pixels (all with replacement). An anchor without hard pixels gets any
    queries (the caller masks it).
    """
    num_classes, num_pixels = valid.shape
    device = valid.device
    hard_rows = hard[anchors].double()
    queries = _draw_pixels(hard_rows + ~hard_rows.any(1, keepdim=True), num_queries, generator)

    # Per query, the class counts of its negatives ~ Multinomial(N, p), as a chain of binomials (one per
    # class, on [A,Q]) instead of N categorical draws:
    # count_j ~ Bin(N - earlier counts, p_j / (p_j + later p)).
    probs = class_probs[anchors].double()  # [A,C]
    tail = probs.flip(1).cumsum(1).flip(1)  # p_j + later p
    last = torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], dim=1) <= 0  # no mass after class j
    ratio = torch.where(last, 1.0, probs / tail.clamp(min=torch.finfo(tail.dtype).tiny)).clamp(0.0, 1.0)
    remaining = torch.full(
        (anchors.shape[0], num_queries), float(num_negatives), dtype=torch.float64, device=device
    )
    counts = []
    for j in range(num_classes):  # <= C small ops, no host sync
        count = torch.binomial(remaining, ratio[:, j, None].expand_as(remaining), generator=generator)
        counts.append(count)
        remaining = remaining - count
    counts = torch.stack(counts, dim=2).long()  # [A,Q,C], sums to N

    # Lay the counts out as runs of slots: slot s of a query belongs to the first class whose cumulative count
    # exceeds s (a scatter of run starts, then a cumulative sum: no per-draw categorical search).
    starts = counts.cumsum(2)[:, :, :-1]
    marks = torch.zeros(*counts.shape[:2], num_negatives + 1, dtype=torch.long, device=device)
    slot_class = marks.scatter_add_(2, starts, torch.ones_like(starts))[:, :, :num_negatives].cumsum(2)
    del marks
    # Then a pixel uniform among the valid pixels of that class: rows of valid_order list its pixels first.
    valid_order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
    rank = _uniform_below(valid.sum(1).take(slot_class), generator)
    negatives = valid_order.take(slot_class.mul_(num_pixels).add_(rank))  # [A,Q,N]
    return queries, negatives


# The private ATen op whose result is the sampled dot product (see _sampled_dot_fused).
_FUSED_SAMPLED_DOT_OP = "_embedding_bag_per_sample_weights_backward"
# Most elements of the gathered keys tile the public fallback holds at once (16M: 64 MiB in fp32).
_GATHER_TILE_ELEMENTS = 1 << 24


def _sampled_dot_fused(a: Tensor, b: Tensor, index: Tensor) -> Tensor:
    """out [R,N] with out[r, n] = a[r] . b[index[r, n]] for a [R,D], b [P,D], index [R,N]; private op."""
    rows, cols = index.shape
    offsets = torch.arange(0, rows * cols, cols, device=a.device)
    bag_of = torch.arange(rows, device=a.device).repeat_interleave(cols)
    # The gradient of embedding_bag with respect to its per-sample weights is exactly these dot products,
    # computed by a fused gather-dot kernel on CPU and CUDA (no public op does this without the [R,N,D] copy).
    out = getattr(torch.ops.aten, _FUSED_SAMPLED_DOT_OP)(
        a.contiguous(), b, index.reshape(-1), offsets, bag_of, 0, -1
    )  # mode 0 = sum, no padding index
    return out.view(rows, cols)


def _sampled_dot_public(a: Tensor, b: Tensor, index: Tensor) -> Tensor:
    """out [R,N] with out[r, n] = a[r] . b[index[r, n]] for a [R,D], b [P,D], index [R,N]: public ops only."""
    rows, cols = index.shape
    dim = max(a.shape[1], 1)
    # Tiles of whole rows when a row's keys fit, else of one row and part of its columns: the gathered
    # [rows, cols, D] keys never exceed _GATHER_TILE_ELEMENTS (for D <= _GATHER_TILE_ELEMENTS).
    tile_cols = max(1, min(cols, _GATHER_TILE_ELEMENTS // dim))
    tile_rows = max(1, _GATHER_TILE_ELEMENTS // (tile_cols * dim))
    out = a.new_empty(rows, cols)
    for r0 in range(0, rows, tile_rows):
        queries = a[r0 : r0 + tile_rows, :, None]  # [r,D,1]
        for c0 in range(0, cols, tile_cols):
            keys = b[index[r0 : r0 + tile_rows, c0 : c0 + tile_cols]]  # [r,c,D]
            out[r0 : r0 + tile_rows, c0 : c0 + tile_cols] = torch.bmm(keys, queries).squeeze(2)
    return out


@functools.cache
def _fused_sampled_dot_works() -> bool:
    """Whether the private op of _sampled_dot_fused exists in this torch and is right on a fixed CPU input."""
    # Probed once per process, on the CPU, so no training step waits on a device; the op has CPU and CUDA
    # kernels under one schema, so the answer is reused on every device. Small integers: every product and sum
    # is exact in fp32, so a correct kernel gives exactly the definition's values.
    a = torch.arange(12, dtype=torch.float32).view(3, 4) - 5
    b = torch.arange(20, dtype=torch.float32).view(5, 4).mul(3).remainder(7) - 3
    index = torch.tensor([[4, 0, 4, 2, 1, 3], [1, 1, 0, 2, 3, 4], [3, 2, 2, 0, 4, 3]])  # repeats included
    try:
        out = _sampled_dot_fused(a, b, index)
    # A missing op is an AttributeError (a RuntimeError in older torch); a changed schema or missing kernel
    # is a RuntimeError or TypeError.
    except (AttributeError, RuntimeError, TypeError):
        return False
    expected = (a[:, None, :] * b[index]).sum(2)
    return out.shape == expected.shape and out.dtype == expected.dtype and torch.equal(out, expected)


class _SampledDot(torch.autograd.Function):
    """out[r, n] = a[r] . b[index[r, n]] for a [R,D], b [P,D] (a constant), index [R,N]; gradient to a only.

    A sampled matrix product that never builds the gathered [R,N,D] keys at once (a fused private kernel
    when it works, else bounded tiles of public ops), and whose backward is one weighted embedding_bag
    (grad_a[r] = sum_n grad[r, n] * b[index[r, n]]), so autograd keeps only index for it.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(b, index)
        if _fused_sampled_dot_works():
            return _sampled_dot_fused(a, b, index)
        return _sampled_dot_public(a, b, index)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        b, index = ctx.saved_tensors
        return F.embedding_bag(index, b, mode="sum", per_sample_weights=grad.contiguous()), None, None


def compute_reco_loss(
    rep: Tensor,
    label: Tensor,
    mask: Tensor,
    prob: Tensor,
    strong_threshold: float = 1.0,
    temp: float = 0.5,
    num_queries: int = 256,
    num_negatives: int = 256,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ReCo loss (Liu et al. 2022): rep [B,D,h,w], label one-hot [B,C,h,w], mask [B,1,h,w], prob [B,C,h,w].

    Valid pixels are label * mask; a class is present with >= 1 valid pixel in the batch. Per present
    class c: num_queries hard queries (valid pixels with prob[c] < strong_threshold), drawn with
    replacement; a detached prototype (mean feature of the class) as positive; num_negatives keys drawn
    per query, class by softmax(cos(prototypes)/temp) over the other present classes, then uniformly among
    that class's valid pixels; InfoNCE with target 0 at temperature temp, averaged over queries. Returns
    the sum over classes divided by the number of present classes, 0 with fewer than two. Gradients reach
    the queries only. Runs in fp32 even under autocast; no host sync on an accelerator.
    """
    # Why this formulation: keys and prototypes are detached, so backward needs only the query side. The
    # [A,Q,N] negative logits come from a sampled matrix product (_SampledDot) that never builds the gathered
    # [A,Q,N,D] keys (the reference keeps a 256x513x256 fp32 key tensor per class for backward) and does
    # Q x N x D work per class, where gathering from a dense [Q,P] similarity matrix would do Q x P x D
    # (13x more at the benchmark's P = 6724, and it grows with the crop); autograd keeps only the [A,Q,1+N]
    # logits and the indices. Class counts per query come from a binomial chain, pixels from a class-sorted
    # order: no categorical draw per negative, no boolean indexing.
    batch, dim, height, width = rep.shape
    expected = {
        "label": (batch, label.shape[1], height, width),
        "mask": (batch, 1, height, width),
        "prob": (batch, label.shape[1], height, width),
    }
    for name, tensor in (("label", label), ("mask", mask), ("prob", prob)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"compute_reco_loss: {name} has shape {tuple(tensor.shape)}, expected "
                f"{expected[name]} to match rep {tuple(rep.shape)} (all at feature resolution)"
            )
    with torch.autocast(device_type=rep.device.type, enabled=False):
        num_classes = label.shape[1]
        feats = rep.float().permute(0, 2, 3, 1).reshape(-1, dim)  # [P,D], with gradients
        with torch.no_grad():
            valid = ((label.float() * mask.float()) > 0).permute(1, 0, 2, 3).reshape(num_classes, -1)  # [C,P]
            hard = valid & (prob.float().permute(1, 0, 2, 3).reshape(num_classes, -1) < strong_threshold)
            count = valid.sum(1)
            present = count > 0
            num_present = present.sum()
            has_hard = hard.any(1)  # implies present

            keys = F.normalize(feats.detach(), dim=1)  # [P,D]
            protos = F.normalize(valid.float() @ feats.detach() / count.clamp(min=1)[:, None], dim=1)  # [C,D]
            # Negative-class distribution: softmax over the other present classes of cos(prototypes) / temp.
            allowed = present[None, :] & ~torch.eye(num_classes, dtype=torch.bool, device=rep.device)
            relation = (protos @ protos.t() / temp).masked_fill(~allowed, float("-inf"))
            # Rows with no allowed class (fewer than two present) are unused; keep them a valid distribution.
            class_probs = torch.where(
                allowed.any(1, keepdim=True), relation.softmax(1), torch.ones_like(relation)
            )

            if rep.device.type == "cpu":  # no device to sync with: work only on the classes that contribute
                anchors = has_hard.nonzero().squeeze(1)
            else:  # fixed shapes, no host sync; classes without hard pixels are masked out below
                anchors = torch.arange(num_classes, device=rep.device)
            queries, negatives = _reco_draws(
                valid, hard, class_probs, anchors, num_queries, num_negatives, generator
            )

        # index_select, not feats[queries]: the CPU backward of advanced indexing accumulates repeated rows
        # with atomic adds across threads (in the scheduler's order), index_select's in index order.
        qn = F.normalize(feats.index_select(0, queries.view(-1)).view(*queries.shape, dim), dim=2)  # [A,Q,D]
        num_anchors = anchors.shape[0]
        positive = (qn * protos[anchors][:, None, :]).sum(2, keepdim=True)  # [A,Q,1]
        negative = _SampledDot.apply(qn.reshape(-1, dim), keys, negatives.view(-1, num_negatives))
        logits = torch.cat([positive, negative.view(num_anchors, num_queries, num_negatives)], dim=2) / temp
        per_query = torch.logsumexp(logits, dim=2) - logits[:, :, 0]  # InfoNCE with target 0, [A,Q]
        # Each contributing class adds mean_q loss_q; the divisor counts every present class; 0 if < 2.
        contributes = has_hard[anchors] & (num_present >= 2)
        scale = contributes.float() / (num_present.clamp(min=1) * num_queries)
        return (per_query.sum(1) * scale).sum()


# ------------------------------------------------------------------------------------------------------------
# Mixing (CutOut, CutMix, ClassMix)
# ------------------------------------------------------------------------------------------------------------


def _box_masks(
    batch: int,
    img_size: tuple[int, int],
    ratio: float,
    device: torch.device | str | None,
    generator: torch.Generator | None,
) -> Tensor:
    """[B,H,W] float: 0 inside one random box per sample (area H*W/ratio), 1 outside."""
    height, width = img_size
    area = height * width / ratio
    low = int(
        width / ratio + 1
    )  # the reference's randint(W/ratio + 1, W): float low bound truncated, W excluded
    if not low < width:
        raise ValueError(f"image size {img_size} is too small for a cut-out box with ratio {ratio}")
    box_w = torch.randint(low, width, (batch,), generator=generator, device=device)
    box_h = torch.round(area / box_w.double()).long()  # round half to even, as numpy
    x0 = _uniform_below(width - box_w + 1, generator)
    y0 = _uniform_below(height - box_h + 1, generator)
    rows = torch.arange(height, device=box_w.device)[None, :, None]
    cols = torch.arange(width, device=box_w.device)[None, None, :]
    inside_rows = (rows >= y0[:, None, None]) & (rows < (y0 + box_h)[:, None, None])
    inside_cols = (cols >= x0[:, None, None]) & (cols < (x0 + box_w)[:, None, None])
    return (~(inside_rows & inside_cols)).float()


def _class_masks(labels: Tensor, generator: torch.Generator | None) -> Tensor:
    """[B,H,W] float: 1 where labels [B,H,W] (-1..255) holds one of floor(n/2) of its n values, random."""
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1) + 1  # -1 (ignore / padding) counts as a value, as in the reference
    present = torch.zeros(batch, _NUM_LABEL_VALUES, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)
    # A random key per present value; the floor(n/2) smallest keys form a uniform random subset of that size.
    keys = torch.rand(present.shape, generator=generator, device=labels.device, dtype=torch.float64)
    keys = keys.masked_fill(~present, 2.0)
    num_keep = present.sum(1) // 2
    cutoff = keys.sort(dim=1).values.gather(1, num_keep[:, None])  # the first key not kept
    keep = keys < cutoff
    return keep.gather(1, flat).view(labels.shape).float()


def generate_cutout_mask(
    img_size: tuple[int, int],
    ratio: float = 2,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[H,W] float mask: 0 inside a random box of area H*W/ratio, 1 outside."""
    return _box_masks(1, tuple(img_size), ratio, device, generator)[0]


def generate_class_mask(pseudo_label: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """[H,W] float mask: 1 on floor(n/2) of the n values (-1 included) of pseudo_label [H,W], at random."""
    return _class_masks(pseudo_label[None], generator)[0]


def generate_unsup_data(
    data: Tensor, target: Tensor, conf: Tensor, mode: str = "cutout", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Mix an unlabelled batch: data [B,3,H,W], target [B,H,W] long, conf [B,H,W] -> the same three.

    cutout: a random box of each image is cut (image 0, target IGNORE_INDEX, conf 0). cutmix / classmix: a
    box / half of the classes of image i is kept and the rest comes from image (i+1) mod B.
    """
    if mode not in MIX_MODES:
        raise ValueError(
            f"unknown mixing mode {mode!r} (--apply_aug): valid modes are {', '.join(MIX_MODES)}"
        )
    batch, _, height, width = data.shape
    if mode == "classmix":
        keep = _class_masks(target, generator) > 0
    else:
        keep = _box_masks(batch, (height, width), 2, data.device, generator) > 0
    if mode == "cutout":
        return (data * keep[:, None], target.masked_fill(~keep, IGNORE_INDEX), conf * keep)
    partner = torch.roll(torch.arange(batch, device=data.device), -1)  # (i + 1) mod B
    return (
        torch.where(keep[:, None], data, data[partner]),
        torch.where(keep, target, target[partner]),
        torch.where(keep, conf, conf[partner]),
    )


# ------------------------------------------------------------------------------------------------------------
# Helpers, teacher, schedule, metric
# ------------------------------------------------------------------------------------------------------------


def label_onehot(labels: Tensor, num_classes: int) -> Tensor:
    """One-hot [B,C,H,W] float on labels.device from labels [B,H,W] long; IGNORE_INDEX gives a class-0 row."""
    batch, height, width = labels.shape
    out = torch.zeros(batch, num_classes, height, width, device=labels.device)
    return out.scatter_(1, labels.clamp(min=0)[:, None], 1.0)


def _fused_or_loop(
    fused_name: str, method: str, targets: Sequence[Tensor], others: Sequence[Tensor], *extra: float
) -> None:
    """targets[i].<method>(others[i], *extra) for every i: one fused call (torch's private torch.<fused_name>)
    where this torch has it, else a loop of the public in-place method (one launch per tensor)."""
    fused = getattr(torch, fused_name, None)
    if fused is not None:
        fused(list(targets), list(others), *extra)
    else:
        for target, other in zip(targets, others, strict=True):
            getattr(target, method)(other, *extra)


def copy_tensors_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """targets[i].copy_(sources[i]) for every i (fused where torch has _foreach_copy_)."""
    _fused_or_loop("_foreach_copy_", "copy_", targets, sources)


def lerp_tensors_(targets: Sequence[Tensor], ends: Sequence[Tensor], weight: float) -> None:
    """targets[i].lerp_(ends[i], weight) for every i (fused where torch has _foreach_lerp_)."""
    _fused_or_loop("_foreach_lerp_", "lerp_", targets, ends, weight)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, or the model itself."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


class EMA:
    """Mean teacher: .model is a copy of the student whose parameters follow an exponential moving average.

    decay = min(1 - 1/(step+1), alpha), so the first update copies the student. Buffers (BN statistics) are
    not averaged unless average_buffers=True (then float buffers are averaged and the others copied).
    """

    def __init__(self, model: nn.Module, alpha: float, average_buffers: bool = False) -> None:
        self.model = copy.deepcopy(_unwrap(model))
        self.model.requires_grad_(False)
        self.alpha = alpha
        self.average_buffers = average_buffers
        self.step = 0

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Move the teacher towards the student by one EMA step."""
        student = _unwrap(student)
        decay = min(1 - 1 / (self.step + 1), self.alpha)
        lerp_tensors_(list(self.model.parameters()), list(student.parameters()), 1 - decay)
        if self.average_buffers:
            for mine, theirs in zip(self.model.buffers(), student.buffers()):
                if mine.is_floating_point():
                    mine.lerp_(theirs, 1 - decay)
                else:
                    mine.copy_(theirs)
        self.step += 1

    def state_dict(self) -> dict:
        """Teacher weights and step, for resuming."""
        return {"model": self.model.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """Poly schedule: lr = max(base_lr * (1 - t/max_iters)^power, min_lr), t = number of step() calls."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        power: float = 0.9,
        min_lr: float = 1e-6,
        last_epoch: int = -1,
    ) -> None:
        self.max_iters = max_iters
        self.power = power
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        # Past max_iters the factor stays at 0 (min_lr) instead of raising a negative number to a power.
        factor = max(1 - self.last_epoch / self.max_iters, 0.0) ** self.power
        return [max(base * factor, self.min_lr) for base in self.base_lrs]


class ConfMatrix:
    """Confusion matrix .mat [C,C] int64 (rows ground truth, columns prediction) and the mIoU over it."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Count pred [N..] long against target [N..] long; targets outside 0..C-1 ignored. No host sync."""
        if self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
        target, pred = target.reshape(-1), pred.reshape(-1)
        keep = (target >= 0) & (target < self.num_classes)
        index = torch.where(keep, target * self.num_classes + pred, 0)
        self.mat.view(-1).index_add_(0, index, keep.long())

    def reduce_from_all_processes(self) -> None:
        """Sum the matrix over all torch.distributed ranks (no-op when not initialised)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def _iou(self) -> Tensor:
        mat = self.mat.double()
        diag = mat.diag()
        union = mat.sum(0) + mat.sum(1) - diag
        return torch.where(union > 0, diag / union.clamp(min=1), torch.full_like(diag, float("nan")))

    def iou_per_class(self) -> list[float]:
        """IoU of every class; nan for a class absent from both ground truth and prediction."""
        return self._iou().tolist()

    def get_metrics(self) -> tuple[float, float]:
        """(mIoU over the classes present in ground truth or prediction, pixel accuracy); 0 without pixels."""
        iou = self._iou()
        seen = ~iou.isnan()
        miou = iou[seen].mean().item() if bool(seen.any()) else 0.0
        total = self.mat.sum().item()
        acc = self.mat.diag().sum().item() / total if total else 0.0
        return miou, acc
