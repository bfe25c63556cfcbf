"""End to end: a few training steps per pretext method, and the demo's command line."""
from __future__ import annotations

import importlib
import json
import os
import re
import sys

import numpy as np
import pytest


def _require(module: str):
    """Import ``module``; skip when it is missing, except under CI where it must be there."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


torch = _require("torch")
_require("softrank.torch")
from softrank.pretext import demo  # noqa: E402
from softrank.pretext.models import PatchEncoder, PretextModel  # noqa: E402
from softrank.pretext.permutations import hamming_permutation_set  # noqa: E402


def _toy_patches(num_examples=40, n=6, seed=0):
    """Patches whose content reveals their position (a ramp plus noise), so reordering is learnable."""
    g = torch.Generator().manual_seed(seed)
    position = torch.arange(n, dtype=torch.float32).view(1, n, 1)
    return position + 0.1 * torch.randn(num_examples, n, 4, generator=g)


@pytest.mark.parametrize("method", ["soft_rank", "classification", "sinkhorn"])
def test_a_few_steps_reduce_the_pretext_loss(method):
    patches = _toy_patches()
    torch.manual_seed(0)
    model = PretextModel(PatchEncoder((4,), 16, 32), method, 6, num_permutations=20, head_hidden_dim=32)
    permutation_set = torch.from_numpy(hamming_permutation_set(20, 6, seed=0)) if method == "classification" else None
    initial = [p.detach().clone() for p in model.encoder.parameters()]
    history = []
    result = demo.pretrain(
        model, patches, steps=60, batch_size=16, learning_rate=1e-2, seed=0,
        permutation_set=permutation_set, on_step=lambda step, loss: history.append(loss),
    )
    assert len(result.step_seconds) == 60 and result.step_ms > 0
    assert np.isfinite(history).all()
    assert np.mean(history[-10:]) < np.mean(history[:10])
    assert any(not torch.equal(a, b) for a, b in zip(initial, model.encoder.parameters()))
    assert not model.training


def test_pretrain_is_deterministic_given_the_seed():
    patches = _toy_patches()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = PretextModel(PatchEncoder((4,), 8, 8), "soft_rank", 6, head_hidden_dim=8)
        demo.pretrain(model, patches, steps=5, batch_size=8, learning_rate=1e-2, seed=3)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key])


def test_linear_probe_separates_separable_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(3, size=300)
    features = rng.standard_normal((300, 5)) + 4.0 * np.eye(3, 5)[labels]
    accuracy = demo.linear_probe(features[:200], labels[:200], features[200:], labels[200:])
    assert accuracy > 0.95


def test_demo_command_line_writes_table_plot_and_json(tmp_path, capsys):
    _require("sklearn")
    _require("matplotlib")
    _require("tqdm")
    json_path, plot_path = tmp_path / "results.json", tmp_path / "plot.png"
    code = demo.main([
        "--datasets", "spectrograms", "--steps", "3", "--seeds", "0", "1", "--num-permutations", "4", "100",
        "--few-labels-per-class", "2", "--batch-size", "8", "--patches", "vertical", "--no-progress",
        "--json", str(json_path), "--plot", str(plot_path), "--threads", "1",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "soft_rank" in printed and "classification K=100" in printed and "sinkhorn" in printed
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(json_path.read_text())
    assert payload["plot"] == str(plot_path)
    results = payload["results"]
    methods = {(r["method"], r["num_permutations"]) for r in results}
    assert methods == {("soft_rank", None), ("classification", 4), ("classification", 100), ("sinkhorn", None), ("none", None)}
    for entry in results:
        for key in ("dataset", "method", "probe_accuracy_mean", "probe_accuracy_std", "step_ms", "seeds", "labels"):
            assert key in entry
        assert entry["dataset"] == "spectrograms" and entry["seeds"] == [0, 1]
        assert entry["num_patches"] == 6 and "time" in entry["patches"]
        assert 0.0 <= entry["probe_accuracy_mean"] <= 1.0
        assert (entry["step_ms"] is None) == (entry["method"] == "none")
    assert {r["labels"] for r in results} == {"few", "all"}


def test_demo_writes_no_file_unless_asked(tmp_path, monkeypatch, capsys):
    _require("sklearn")
    _require("tqdm")
    monkeypatch.chdir(tmp_path)
    code = demo.main([
        "--datasets", "spectrograms", "--methods", "soft_rank", "none", "--steps", "2", "--seeds", "0",
        "--few-labels-per-class", "2", "--batch-size", "8", "--no-progress", "--threads", "1",
    ])
    assert code == 0
    assert "soft_rank" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_load_patched_shapes_for_every_split():
    _require("sklearn")
    expected = {
        ("digits", "grid"): (9, 1, 4, 4), ("digits", "vertical"): (6, 1, 12, 2),
        ("digits", "horizontal"): (6, 1, 2, 12), ("spectrograms", "grid"): (9, 8, 8),
        ("spectrograms", "vertical"): (6, 24, 4), ("spectrograms", "horizontal"): (6, 4, 24),
        ("videos", "grid"): (8, 1, 16, 16),
    }
    for (name, kind), shape in expected.items():
        data = demo.load_patched(name, kind, 60)
        assert tuple(data.patches.shape[1:]) == shape, (name, kind)
        assert data.patches.dtype == torch.float32 and len(data.labels) == len(data.patches)


@pytest.mark.parametrize("argv, option", [
    (["--steps", "0"], "--steps"),  # used to end in statistics.StatisticsError
    (["--steps", "-5"], "--steps"),  # used to end in UnboundLocalError
    (["--steps", "2.5"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),  # used to end in a RuntimeError from reshape
    (["--batch-size", "-8"], "--batch-size"),
    (["--few-labels-per-class", "0"], "--few-labels-per-class"),  # used to end in a RuntimeError from max()
    (["--num-permutations", "100", "0"], "--num-permutations"),
    (["--seeds", "0", "-1"], "--seeds"),
    (["--seeds", str(2**32)], "--seeds"),
    (["--threads", "0"], "--threads"),
    (["--eps", "0"], "--eps"),
    (["--eps", "-1"], "--eps"),
    (["--eps", "nan"], "--eps"),
    (["--eps", "inf"], "--eps"),
    (["--eps", "x"], "--eps"),
])
def test_demo_command_line_refuses_bad_numbers_with_a_usage_error(argv, option, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: ran.append(args) or [])
    for parse in (lambda: demo.build_parser().parse_args(argv), lambda: demo.main(argv)):
        with pytest.raises(SystemExit) as exit_info:
            parse()
        assert exit_info.value.code == 2  # argparse's usage error, not a traceback
        error = capsys.readouterr().err
        assert f"argument {option}:" in error and "usage: softrank-pretext-demo" in error, error
    assert ran == []  # refused before any data is made or trained on


def test_demo_command_line_refuses_a_batch_that_does_not_divide_among_processes(capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: pytest.fail("run_demo was called"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--batch-size", "64"])
    assert exit_info.value.code == 2
    assert "argument --batch-size: 64 is not a multiple of the 3 processes" in capsys.readouterr().err


def test_demo_command_line_accepts_the_boundary_values():
    args = demo.build_parser().parse_args([
        "--steps", "1", "--batch-size", "1", "--few-labels-per-class", "1", "--num-permutations", "1",
        "--seeds", "0", str(2**32 - 1), "--threads", "1", "--eps", "1e-3",
    ])
    config = demo.config_from_args(args)
    assert (config.pretrain_steps, config.batch_size, config.few_labels_per_class) == (1, 1, 1)
    assert config.num_permutations == (1,) and config.seeds == (0, 2**32 - 1) and config.eps == 1e-3
    config.validate()


def test_demo_command_line_runs_a_repeated_dataset_or_seed_once():
    # Repeated, each run was counted twice: four per-seed accuracies for two
    # seeds, and a std shrunk as if they were independent.
    args = demo.build_parser().parse_args(["--datasets", "digits", "digits", "--seeds", "1", "0", "1"])
    config = demo.config_from_args(args)
    assert config.datasets == ("digits",) and config.seeds == (1, 0)
    config.validate()


@pytest.mark.parametrize("field, value", [
    ("pretrain_steps", 0), ("batch_size", 0), ("few_labels_per_class", 0), ("num_permutations", (100, 0)),
    ("seeds", (-1,)), ("seeds", ()), ("eps", float("nan")), ("learning_rate", 0.0), ("test_fraction", 1.0),
    ("sinkhorn_iterations", 0), ("datasets", ("mnist",)), ("patches", "diagonal"),
    ("seeds", (0, 1, 0)), ("datasets", ("digits", "digits")), ("methods", ("soft_rank", "soft_rank")),
    ("few_labels_per_class", 10**6),
])
def test_run_demo_refuses_a_bad_config_before_any_work(field, value):
    config = demo.DemoConfig(**{field: value})
    with pytest.raises(ValueError, match=f"DemoConfig.{field}"):
        demo.run_demo(config)


@pytest.mark.parametrize("eps, exc", [
    (0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
    ("abc", TypeError), (None, TypeError), (True, TypeError),
])
def test_pretext_model_refuses_an_eps_that_cannot_train(eps, exc):
    # eps = 0 (hard ranks) built a model whose reorder loss has a zero gradient:
    # it trained nothing, silently; "abc" failed in float() without naming eps.
    with pytest.raises(exc, match="eps"):
        PretextModel(PatchEncoder((4,), 4, 4), "soft_rank", 6, head_hidden_dim=4, eps=eps)


def test_pretext_model_checks_eps_only_for_the_soft_rank_method():
    # The baselines never read eps: an eps of 0 there was accepted before and still is.
    PretextModel(PatchEncoder((4,), 4, 4), "classification", 6, 10, head_hidden_dim=4, eps=0.0)
    PretextModel(PatchEncoder((4,), 4, 4), "sinkhorn", 6, head_hidden_dim=4, eps=float("inf"))


def test_pretext_model_takes_any_real_eps():
    for eps in (0.5, 2, np.float32(0.25), torch.tensor(3.0)):
        model = PretextModel(PatchEncoder((4,), 4, 4), "soft_rank", 6, head_hidden_dim=4, eps=eps)
        assert type(model.eps) is float and model.eps == float(eps)


@pytest.mark.parametrize("steps, batch_size", [(0, 4), (-5, 4), (1, 0)])
def test_pretrain_refuses_no_steps_or_an_empty_batch(steps, batch_size):
    model = PretextModel(PatchEncoder((4,), 4, 4), "soft_rank", 6, head_hidden_dim=4)
    with pytest.raises(ValueError, match="steps" if steps < 1 else "batch_size"):
        demo.pretrain(model, _toy_patches(), steps=steps, batch_size=batch_size, learning_rate=1e-3, seed=0)


def test_pretrain_refuses_a_permutation_set_that_does_not_fit_the_head():
    """A smaller set trained silently without some classes; a larger one only
    failed on a step that happened to draw a label the head lacks."""
    model = PretextModel(PatchEncoder((4,), 4, 4), "classification", 6, 20, head_hidden_dim=4)
    for k in (10, 30):
        permutation_set = torch.from_numpy(hamming_permutation_set(k, 6, seed=0))
        with pytest.raises(ValueError, match=r"permutation_set must have shape \(K, n\) = \(20, 6\)"):
            demo.pretrain(model, _toy_patches(), steps=1, batch_size=4, learning_rate=1e-3, seed=0,
                          permutation_set=permutation_set)


def test_run_demo_reports_the_hamming_spread_of_every_seed():
    """Each seed trains on its own permutation set; the report kept only the
    last seed's spread. Checked against hamming_set_summary of each seed's set
    (a run of one step per seed)."""
    from softrank.pretext.permutations import hamming_set_summary

    config = demo.DemoConfig(datasets=("digits",), methods=("classification",), seeds=(0, 1),
                             num_permutations=(20,), pretrain_steps=1, batch_size=8,
                             embedding_dim=8, hidden_dim=8, show_progress=False)
    results = demo.run_demo(config)
    entries = [r for r in results if r.get("method") == "classification"]
    assert entries
    for entry in entries:  # (one per probe)
        n = entry["num_patches"]
        summaries = [hamming_set_summary(hamming_permutation_set(20, n, seed=s)) for s in (0, 1)]
        assert summaries[0] != summaries[1]  # (else the test could not tell the seeds apart)
        assert entry["hamming_per_seed"] == [[low, mean] for low, mean in summaries]
        assert entry["hamming_min"] == min(low for low, _ in summaries)
        assert entry["hamming_mean"] == pytest.approx(np.mean([mean for _, mean in summaries]))


def test_dataset_sizes_and_feature_batches_are_checked_by_name():
    """make_videos(size=4) failed with numpy's 'high - low < 0', num_frames=0
    with an IndexError, make_digits(0) inside torch's interpolate,
    make_spectrograms(0) divided by the std of nothing (RuntimeWarnings only),
    and features(batch_size=0) with range()'s own error."""
    from softrank.pretext import datasets

    for call, name in ((lambda: datasets.make_videos(10, size=4), "size"),
                       (lambda: datasets.make_videos(10, num_frames=0), "num_frames"),
                       (lambda: datasets.make_videos(0), "num_examples"),
                       (lambda: datasets.make_digits(0), "size"),
                       (lambda: datasets.make_spectrograms(0), "num_examples"),
                       (lambda: datasets.make_spectrograms(4, num_bins=0), "num_bins")):
        with pytest.raises(ValueError, match=rf"^{name} must be >= "):
            call()
    videos, labels = datasets.make_videos(3, size=9, num_frames=2)
    assert videos.shape == (3, 2, 1, 9, 9) and np.isfinite(videos).all()
    encoder = PatchEncoder((4,), 4, 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        encoder.features(torch.randn(3, 2, 4), batch_size=0)


def _usage_error(capsys, argv) -> str:
    """Run the command line, check it stops with argparse's usage error (exit code 2), return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: softrank-pretext-demo" in error, error
    return error


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_demo_command_line_checks_the_output_paths_before_training(option, tmp_path, capsys, monkeypatch):
    """The files were opened only after training (15 minutes or more): a missing
    directory ended there in a FileNotFoundError traceback, with the results lost."""
    _require("matplotlib")
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: pytest.fail("run_demo was called"))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # (root may write anywhere, so the unwritable directory is simulated)
    monkeypatch.setattr(demo.os, "access", lambda path, mode, **kwargs: (
        False if os.fspath(path) == str(locked) else real_access(path, mode, **kwargs)))
    for path, words in ((tmp_path / "missing" / "out", "does not exist"), (tmp_path, "is a directory"),
                        (locked / "out", "is not writable")):
        error = _usage_error(capsys, [option, str(path), "--no-progress"])
        assert f"argument {option}:" in error and words in error, error


def test_demo_command_line_needs_matplotlib_for_a_plot_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: pytest.fail("run_demo was called"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (import matplotlib now raises ImportError)
    error = _usage_error(capsys, ["--plot", str(tmp_path / "plot.png"), "--no-progress"])
    assert "argument --plot: needs matplotlib: pip install 'softrank[pretext]'" in error, error


def test_demo_writes_the_json_before_the_plot(tmp_path, monkeypatch):
    """The plot was saved first, so a plot that failed lost the JSON too."""
    _require("matplotlib")

    def failing_plot(results, path):
        raise OSError("the plot failed")

    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: [])
    monkeypatch.setattr(demo, "save_plot", failing_plot)
    json_path = tmp_path / "results.json"
    with pytest.raises(OSError, match="the plot failed"):
        demo.main(["--json", str(json_path), "--plot", str(tmp_path / "plot.png"), "--no-progress"])
    assert json.loads(json_path.read_text())["results"] == []


def test_demo_command_line_refuses_too_few_labels_as_a_usage_error(capsys, monkeypatch):
    """It ended in a ValueError traceback (exit code 1); the library still raises that ValueError."""
    _require("sklearn")
    monkeypatch.setattr(demo, "pretrain", lambda *args, **kwargs: pytest.fail("pretrain was called"))
    error = _usage_error(capsys, [
        "--datasets", "spectrograms", "--seeds", "0", "--few-labels-per-class", "1000", "--no-progress",
    ])
    assert re.search(r"argument --few-labels-per-class: 1000 exceeds the (\d+) training examples of the "
                     r"smallest class of 'spectrograms' \(seed 0\); use at most \1$", error.strip()), error


def test_demo_refuses_a_permutation_set_too_slow_to_choose_before_training(capsys, monkeypatch):
    """K = 1e8 is capped at 9! = 362880 for 9 patches, whose greedy Hamming set
    (K * pool = 1.3e11 steps) seemed to hang, after the runs before it."""
    _require("sklearn")
    monkeypatch.setattr(demo, "pretrain", lambda *args, **kwargs: pytest.fail("pretrain was called"))
    monkeypatch.setattr(demo, "hamming_permutation_set", lambda *args, **kwargs: pytest.fail("a set was chosen"))
    argv = ["--datasets", "digits", "--methods", "soft_rank", "classification", "--seeds", "0",
            "--num-permutations", "100", "100000000", "--no-progress"]
    error = _usage_error(capsys, argv)
    assert ("argument --num-permutations: 100000000 is too many for 'digits' (9 patches, capped at 9! = 362880): "
            "choosing num_permutations=362880") in error, error
    config = demo.DemoConfig(datasets=("digits",), methods=("classification",), seeds=(0,),
                             num_permutations=(100, 10**8), show_progress=False)
    with pytest.raises(ValueError, match=r"^DemoConfig.num_permutations: 100000000 is too many for 'digits'"):
        demo.run_demo(config)
    # Without the classification method, K is never used and nothing is refused.
    config.methods = ("none",)
    assert {entry["method"] for entry in demo.run_demo(config)} == {"none"}


def test_demo_needs_no_tqdm_without_a_progress_bar(monkeypatch, capsys):
    """tqdm was imported even under --no-progress: without it, a bare ModuleNotFoundError."""
    _require("sklearn")
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    code = demo.main(["--datasets", "spectrograms", "--methods", "none", "--seeds", "0",
                      "--few-labels-per-class", "2", "--no-progress"])
    assert code == 0 and "none" in capsys.readouterr().out
    monkeypatch.setattr(demo, "load_patched", lambda *args, **kwargs: pytest.fail("data was made"))
    with pytest.raises(ImportError, match=r"^softrank.pretext.demo needs tqdm: pip install 'softrank\[pretext\]'$"):
        demo.run_demo(demo.DemoConfig(datasets=("spectrograms",), show_progress=True))


def test_demo_names_the_extra_when_scikit_learn_is_missing(monkeypatch):
    monkeypatch.setattr(demo, "load_patched", lambda *args, **kwargs: pytest.fail("data was made"))
    for module in ("sklearn", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"^softrank.pretext.demo needs scikit-learn: pip install 'softrank\[pretext\]'$"):
        demo.run_demo(demo.DemoConfig(datasets=("spectrograms",), show_progress=False))
