"""Speed-ups change no result: compiled vs eager steps, the skipped representation head, NHWC, modes."""

import copy

import pytest
import torch

import acceleration
import distributed
import engine
import eval_loop
import network
import options
from dataset_table import DATASETS
from module_list import ConfMatrix

TINY = [
    "--dataset",
    "pascal",
    "--resnet_depth",
    "18",
    "--pretrained",
    "none",
    "--batch_size",
    "2",
    "--crop_size",
    "33",
    "33",
    "--output_dim",
    "16",
    "--num_queries",
    "8",
    "--num_negatives",
    "16",
]


def make_run(mode: str, *extra: str) -> engine.Run:
    args = options.resolve_args(options.get_args_parser(mode).parse_args(TINY + ["--device", "cpu", *extra]))
    return engine.build_run(args, DATASETS[args.dataset], distributed.Dist(0, 1, torch.device("cpu")))


def batches(semi: bool) -> list:
    g = torch.Generator().manual_seed(1)
    per_loader = 2 if semi else 4
    return [
        (
            torch.randn(per_loader, 3, 33, 33, generator=g),
            torch.randint(-1, 21, (per_loader, 33, 33), generator=g),
        )
        for _ in range(2 if semi else 1)
    ]


def steps(run: engine.Run, semi: bool, count: int) -> list[torch.Tensor]:
    """The logged losses of `count` optimisation steps from a fixed seed, on fixed batches."""
    torch.manual_seed(0)
    monitors = [ConfMatrix(21, torch.device("cpu")) for _ in range(2)]
    run.student.train()
    return [engine.optimisation_step(run, batches(semi), monitors)[0] for _ in range(count)]


@pytest.mark.slow
def test_compiled_semi_reco_step_matches_eager(monkeypatch, capsys):
    # Inductor's C++ code generation takes minutes on 2 cores; the aot_eager backend still runs Dynamo's
    # capture and AOTAutograd's forward/backward graphs, which is where a compiled step could go wrong.
    monkeypatch.setattr(
        acceleration, "compile_options", lambda mode: {"backend": "aot_eager", "dynamic": False}
    )
    eager = make_run("semi", "--apply_reco", "--apply_aug", "classmix", "--compile", "off")
    initial = copy.deepcopy(eager.model.state_dict())
    compiled = make_run("semi", "--apply_reco", "--apply_aug", "classmix", "--compile", "default")
    assert "compiled in" in capsys.readouterr().out and compiled.compile_s > 0 and eager.compile_s is None
    # the warm-up compiled without touching a weight, a BN statistic or a gradient
    for name, value in compiled.model.state_dict().items():
        assert torch.equal(value, initial[name]), name
    assert all(p.grad is None for p in compiled.model.parameters())
    with torch.compiler.set_stance("fail_on_recompile"):  # the warm-up's shapes are the step's
        got = steps(compiled, True, 2)
    want = steps(eager, True, 2)
    for g, w in zip(got, want):  # the second step's losses follow the first step's update
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # AOTAutograd's decomposed BatchNorm backward rounds differently: gradients agree to float noise, not bits
    for (name, a), b in zip(compiled.ema.model.state_dict().items(), eager.ema.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_compiled_unimatch_reco_step_matches_eager(monkeypatch, capsys):
    aot_eager = {"backend": "aot_eager", "dynamic": False}  # as above: Dynamo's capture, AOTAutograd's graphs
    monkeypatch.setattr(acceleration, "compile_options", lambda mode: aot_eager)
    eager = make_run("semi", "--method", "unimatch", "--apply_reco", "--compile", "off")
    compiled = make_run("semi", "--method", "unimatch", "--apply_reco", "--compile", "default")
    assert "compiled in" in capsys.readouterr().out
    g = torch.Generator().manual_seed(1)
    weak, mix = torch.rand(2, 3, 33, 33, generator=g), torch.rand(2, 3, 33, 33, generator=g)
    padding = torch.zeros(2, 33, 33, dtype=torch.bool)
    padding[:, :, 30:] = True
    batch = [batches(True)[0], (weak, padding, torch.full((2, 33, 33), -1), mix, padding)]

    def steps_of(run):
        torch.manual_seed(0)
        monitors = [ConfMatrix(21, torch.device("cpu")) for _ in range(2)]
        return [engine.optimisation_step(run, batch, monitors)[0] for _ in range(2)]

    for got, want in zip(steps_of(compiled), steps_of(eager)):  # dropout masks and views: the same draws
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_representation_head_runs_only_for_reco():
    calls = []
    for mode, reco in (
        ("sup", True),
        ("semi", False),
    ):  # semi without ReCo: neither the students nor the teacher
        run = make_run(mode, *(["--apply_reco"] if reco else []))
        run.model.representation.register_forward_hook(lambda *_: calls.append((mode, reco)))
        before = len(calls)
        steps(run, mode == "semi", 1)
        # semi: one call per student view; the teacher never needs its representation
        assert len(calls) - before == (0 if not reco else 2 if mode == "semi" else 1), (mode, reco)
        assert all(p.requires_grad == reco for p in run.model.representation.parameters())
    # nor at evaluation or prediction, whose logits are those of the full forward
    model = network.build_model("deeplabv3p", 3, 8, 18).eval()
    model.representation.register_forward_hook(lambda *_: calls.append("eval"))
    x = torch.randn(2, 3, 33, 33)
    logits = network.predict(model, x, (33, 33))
    loader = [(x, torch.randint(0, 3, (2, 33, 33)))]
    eval_loop.evaluate(model, loader, 3, torch.device("cpu"))
    assert "eval" not in calls
    with torch.no_grad():
        full, rep = model(x)
        skipped, none = model(x, with_rep=False)
    assert none is None and rep.shape == (2, 8, 9, 9) and torch.equal(full, skipped)
    torch.testing.assert_close(logits, network.upsample(full, (33, 33)))


def test_channels_last_gives_the_same_step():
    eager = steps(make_run("sup", "--apply_reco", "--channels_last", "off"), False, 1)
    run = make_run("sup", "--apply_reco", "--channels_last", "on")
    conv = run.model.resnet_conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(steps(run, False, 1), eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "requested, device, world, compiler, want, note",
    [
        ("auto", "cpu", 1, True, "off", None),
        ("off", "cuda", 1, True, "off", None),
        ("default", "cpu", 1, True, "default", None),
        ("reduce-overhead", "cpu", 1, True, "default", "CUDA only"),
        ("reduce-overhead", "cuda", 1, True, "reduce-overhead", None),
        ("reduce-overhead", "cuda", 2, True, "default", "DDP"),
        ("max-autotune", "cuda", 1, False, "off", "Triton"),
        ("default", "cpu", 1, False, "off", "C++ compiler"),
    ],
)
def test_compile_mode_per_device(monkeypatch, requested, device, world, compiler, want, note):
    monkeypatch.setattr(acceleration.importlib.util, "find_spec", lambda name: object() if compiler else None)
    monkeypatch.setattr(acceleration.shutil, "which", lambda name: "/usr/bin/g++" if compiler else None)
    mode, why = acceleration.compile_mode(requested, torch.device(device), world)
    assert mode == want and (note in why if note else why is None)
    assert acceleration.memory_format("auto", torch.device(device)) == (
        torch.channels_last if device == "cuda" else torch.contiguous_format
    )
