"""End to end: a few training steps per pretext method, and the demo's command line."""
from __future__ import annotations

import importlib
import json
import os

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
