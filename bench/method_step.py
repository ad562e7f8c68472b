"""Replays a step fixture of UniMatch's or FixMatch's own code through this project's step, in float64.

    python bench/method_step.py --fixture tests/data/unimatch_step

A fixture (format unibench-step-v1; its README.md says how it was recorded) holds the batches, CutMix
boxes, dropout keep-masks and learning rates of a few optimiser steps, the loss terms the authors' code
computed, statistics of every parameter and buffer after each step, and a rule for the initial weights. This
rebuilds the weights by the rule on --backbone deeplabv3p_unimatch, runs methods.method_step (the training
loop's step), methods.method_optimizer and methods.poly_lr on the recorded data, and prints one JSON line:
  loss_rel_diff   largest |ours - theirs| / |theirs| over every loss term of every step
  state_rel_diff  largest difference over every post-step statistic (sum, l2, abs sum, and the same of the
                  step's change), each relative to its own magnitude (a sum to its abs sum)
  lr_match, init_match, images_match, pseudo_match   exact checks (learning rates, rule weights' sha256,
                  normalised images' sha256, the weak view's pseudo-labels)
  within_tolerance  every loss and statistic inside the fixture's own tolerances
  steps           per step: learning rates, each loss term and the mask ratio, ours and theirs
"""

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without PYTHONPATH

import torch  # noqa: E402

import methods  # noqa: E402
from helpers import UserError, run_cli  # noqa: E402
from module_list import IGNORE_INDEX  # noqa: E402
from network import build_model  # noqa: E402

FORMAT = "unibench-step-v1"
VOID = 255  # the fixtures' void and padding value
# The fixture's loss names -> ours ('loss' is the step's total).
LOSS_NAMES = {
    "unimatch": {
        "loss": "loss",
        "loss_x": "sup",
        "loss_u_s1": "unsup_s1",
        "loss_u_s2": "unsup_s2",
        "loss_u_w_fp": "unsup_fp",
    },
    "fixmatch": {"loss": "loss", "loss_x": "sup", "loss_u_s": "unsup_s"},
}
# Per stats column (sum, l2, abs, dsum, dl2, dabs): the column that gives its magnitude.
SCALE_COLUMN = (2, 1, 2, 5, 4, 5)


def sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in C order (little-endian on every machine torch runs on)."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def rule_weights(keys: list, rule: dict) -> dict[str, torch.Tensor]:
    """The initial state_dict by the fixture's weight rule (unibench-rule-v1, in its README)."""
    shapes = {name: shape for name, shape, _ in keys}
    out = {}
    for index, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros(shape, dtype=torch.int64)
        elif name.endswith("running_mean"):
            out[name] = torch.zeros(shape)
        elif name.endswith("running_var"):
            out[name] = torch.ones(shape)
        elif len(shape) == 4:
            gain = rule["classifier_gain"] if name == "classifier.weight" else rule["conv_gain"]
            scale = torch.tensor(math.sqrt(gain / math.prod(shape[1:])), dtype=torch.float32)
            out[name] = _randn(shape, index) * scale
        elif name.endswith(".bias") and len(shapes.get(name[: -len("bias")] + "weight", ())) == 4:
            out[name] = _randn(shape, index) * torch.tensor(rule["conv_bias_std"], dtype=torch.float32)
        else:  # BatchNorm gamma and beta
            out[name] = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
    return out


def _randn(shape: list, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def build_network(fixture: dict, dtype: torch.dtype) -> tuple[torch.nn.Module, bool]:
    """UniMatch's network for the fixture's config, with the rule's weights, in dtype; and whether they hash
    as init_sha256 says."""
    config = fixture["config"]
    backbone = config["backbone"]
    if (
        not backbone.startswith("resnet")
        or config["replace_stride_with_dilation"] != [False, False, True]
        or list(config["dilations"]) != [6, 12, 18]
    ):
        raise UserError(
            f"--fixture: the network {backbone}, dilation "
            f"{config['replace_stride_with_dilation']}, ASPP {config['dilations']} is not "
            f"UniMatch's DeepLabv3+ at output stride 16 with rates 6/12/18, the only one "
            f"deeplabv3p_unimatch builds; pass a fixture of that network"
        )
    depth = int(backbone.removeprefix("resnet"))
    model = build_model("deeplabv3p_unimatch", config["nclass"], resnet_depth=depth)
    ours = [
        [k, list(v.shape), str(v.dtype).removeprefix("torch.")]
        for k, v in model.state_dict().items()
        if not k.startswith("representation.")
    ]
    if ours != fixture["state_dict_keys"]:
        raise UserError("--fixture: its state_dict_keys are not deeplabv3p_unimatch's (names, shapes, order)")
    weights = rule_weights(fixture["state_dict_keys"], fixture["weight_rule"])
    init_match = all(sha256(weights[k]) == digest for k, digest in fixture["init_sha256"].items())
    model.load_state_dict({**model.state_dict(), **weights}, strict=True)  # every UniMatch key is replaced
    model.representation.requires_grad_(False)  # as the training loop does without ReCo
    return model.to(dtype), init_match


def settings_for(fixture: dict) -> methods.MethodSettings:
    """The step settings the fixture's config describes."""
    config = fixture["config"]
    if fixture["method"] not in methods.ONLINE_METHODS:
        raise UserError(
            f"--fixture: method {fixture['method']!r} is none of {', '.join(methods.ONLINE_METHODS)}"
        )
    criterion = config["criterion"]
    if criterion["kwargs"].get("ignore_index", VOID) != VOID:
        raise UserError(f"--fixture: ignore_index {criterion['kwargs']['ignore_index']} is not {VOID}")
    if criterion["name"] == "CELoss":
        extra = {"criterion": "ce"}
    elif criterion["name"] == "OHEM":
        extra = {
            "criterion": "ohem",
            "ohem_thresh": float(criterion["kwargs"].get("thresh", 0.7)),
            "ohem_min_kept": int(criterion["kwargs"].get("min_kept", 256)),
        }
    else:
        raise UserError(f"--fixture: criterion {criterion['name']!r} is neither CELoss nor OHEM")
    return methods.MethodSettings(method=fixture["method"], conf_thresh=float(config["conf_thresh"]), **extra)


class Tensors:
    """The fixture's tensors of one step, images normalised in the fixture's dtype as its README says."""

    def __init__(self, tensors: dict, step: int, normalisation: dict, dtype: torch.dtype):
        self.tensors, self.prefix, self.dtype = tensors, f"step{step}.", dtype
        self.mean = torch.tensor(normalisation["mean"], dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(normalisation["std"], dtype=dtype).view(1, 3, 1, 1)

    def raw(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(self.prefix + name)

    def image(self, name: str) -> torch.Tensor | None:
        pixels = self.raw(name)
        return None if pixels is None else ((pixels.to(self.dtype) / 255) - self.mean) / self.std

    def mask(self, name: str) -> torch.Tensor | None:
        mask = self.raw(name)
        return None if mask is None else mask.bool()

    def batch(self) -> methods.MethodBatch:
        labels = self.raw("mask_x").long()
        return methods.MethodBatch(
            images_x=self.image("img_x"),
            labels_x=labels.masked_fill(labels == VOID, IGNORE_INDEX),
            weak=self.image("img_u_w"),
            strong1=self.image("img_u_s1"),
            strong2=self.image("img_u_s2"),
            padding=self.raw("ignore_mask") == VOID,
            box1=self.mask("cutmix_box1"),
            box2=self.mask("cutmix_box2"),
            mix_weak=self.image("img_u_w_mix"),
            mix_strong1=self.image("img_u_s1_mix"),
            mix_strong2=self.image("img_u_s2_mix"),
            mix_padding=self.raw("ignore_mask_mix") == VOID,
        )


def statistics(state: dict[str, torch.Tensor], before: dict[str, torch.Tensor], key: str) -> list[float]:
    """[sum, l2, abs_sum, delta_sum, delta_l2, delta_abs_sum] of one tensor in float64."""
    x = state[key].double()
    d = x - before[key].double()
    return [float(v) for v in (x.sum(), x.norm(), x.abs().sum(), d.sum(), d.norm(), d.abs().sum())]


def relative(ours: float, theirs: float, scale: float) -> float:
    """|ours - theirs| / scale, or the plain difference where the magnitude is 0."""
    diff = abs(ours - theirs)
    return diff / scale if scale > 0 else diff


def within(ours: list[float], theirs: list[float], tol: dict) -> bool:
    """The fixture README's tolerance on one tensor's six statistics."""
    _, l2, a, _, dl2, da = theirs
    limits = (
        tol["state_rel"] * a + tol["delta_rel"] * da,
        tol["state_rel"] * l2 + tol["delta_rel"] * dl2,
        tol["state_rel"] * a + tol["delta_rel"] * da,
        tol["delta_rel"] * da + tol["ulp_rel"] * a,
        tol["delta_rel"] * dl2 + tol["ulp_rel"] * l2,
        tol["delta_rel"] * da + tol["ulp_rel"] * a,
    )
    return all(abs(x - r) <= limit for x, r, limit in zip(ours, theirs, limits))


def replay(folder: Path) -> dict:
    """Replay the fixture in `folder` and compare; the dict printed as JSON."""
    started = time.perf_counter()
    fixture = json.loads((folder / "fixture.json").read_text(encoding="utf-8"))
    if fixture.get("format") != FORMAT:
        raise UserError(f"--fixture {folder}: format {fixture.get('format')!r} is not {FORMAT}")
    tensors = torch.load(folder / "tensors.pt", weights_only=True)
    method, config, tol = fixture["method"], fixture["config"], fixture["tolerance"]
    dtype = getattr(torch, fixture["dtype"])
    settings = settings_for(fixture)
    model, init_match = build_network(fixture, dtype)
    net = methods.PerturbedNet(model)
    optimizer = methods.method_optimizer(model, config["lr"], config["lr_multi"])
    names = {k for k, _, _ in fixture["state_dict_keys"]}
    images_match, lr_match, pseudo_match, ok = True, True, True, True
    loss_rel, state_rel, steps = 0.0, 0.0, []
    for record in fixture["steps_recorded"]:
        data = Tensors(tensors, record["step"], fixture["image_normalisation"], dtype)
        images_match &= all(
            sha256(data.image(name.removeprefix(data.prefix))) == digest
            for name, digest in fixture["image_sha256"].items()
            if name.startswith(data.prefix)
        )
        step = record["epoch"] * fixture["len_loader_u"] + record["i"]
        lr = methods.poly_lr(config["lr"], step, fixture["total_iters"])
        methods.set_lr(optimizer, lr, config["lr_multi"])
        lrs = [group["lr"] for group in optimizer.param_groups]
        lr_match &= lrs == record["lr"]
        keep = [data.raw(mask["name"]) for mask in record["fp_masks"]] or None  # drawn on c1, then on c4
        if method == "unimatch" and (keep is None or len(keep) != 2):
            raise UserError(f"--fixture {folder}: step {record['step']} has no pair of fp keep-masks")
        before = {k: v.clone() for k, v in model.state_dict().items() if k in names}

        out = methods.method_step(net, data.batch(), settings, keep)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

        terms = dict(zip(methods.TERMS[method], out.terms.tolist()), loss=out.loss.item())
        losses = {name: [terms[ours], record["losses"][name]] for name, ours in LOSS_NAMES[method].items()}
        for x, r in losses.values():
            loss_rel = max(loss_rel, relative(x, r, abs(r)))
            ok &= abs(x - r) <= tol["loss_rel"] * abs(r) + tol["loss_abs"]
        if data.raw("mask_u_w") is not None:  # a debug tensor
            pseudo_match &= torch.equal(out.pseudo, data.raw("mask_u_w").long())
        state = model.state_dict()
        for key, theirs in record["stats_after"].items():
            ours = statistics(state, before, key)
            state_rel = max(
                state_rel,
                *(relative(x, r, theirs[column]) for x, r, column in zip(ours, theirs, SCALE_COLUMN)),
            )
            ok &= within(ours, theirs, tol)
        steps.append(
            {
                "step": step,
                "lr": {"ours": lrs, "theirs": record["lr"]},
                "losses": losses,
                "mask_ratio": [terms["mask_ratio"], record["mask_ratio"]],
            }
        )
    return {
        "fixture": str(folder),
        "method": method,
        "backbone": config["backbone"],
        "loss_rel_diff": loss_rel,
        "state_rel_diff": state_rel,
        "lr_match": lr_match,
        "init_match": init_match,
        "images_match": images_match,
        "pseudo_match": pseudo_match,
        "within_tolerance": ok,
        "seconds": round(time.perf_counter() - started, 1),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", type=Path, required=True, help="folder with fixture.json and tensors.pt")
    args = parser.parse_args(argv)
    for name in ("fixture.json", "tensors.pt"):
        if not (args.fixture / name).is_file():
            raise UserError(f"--fixture {args.fixture}: no {name} there; pass a step fixture folder")
    print(json.dumps(replay(args.fixture)), flush=True)


if __name__ == "__main__":
    run_cli(main)
