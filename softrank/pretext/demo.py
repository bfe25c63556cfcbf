"""Shuffle-and-reorder self-supervision at small scale: soft rank vs its baselines.

Reproduces, on data that needs no download, the comparison of Carr et al.
(2021), "Shuffle to Learn": pre-train a small patch encoder by

- ``soft_rank``: reorder shuffled patches through ``softrank.torch.soft_rank``
  (any of the ``n!`` permutations, :func:`~softrank.pretext.losses.reorder_loss`);
- ``classification``: classify which of ``K`` fixed permutations (maximal
  Hamming distance) shuffled the patches, for each ``K`` of
  ``--num-permutations`` (default 100 and 1000, capped at ``n!``);
- ``sinkhorn``: predict the permutation matrix by Gumbel-Sinkhorn;
- ``none``: no pre-training (the random initial encoder, the same weights every
  other method starts from),

then fit a linear probe (logistic regression on the frozen, concatenated patch
embeddings) with a few labels per class and with all training labels, on
held-out test accuracy. Data sets: scikit-learn's digits (images), generated
harmonic-tone spectrograms (audio; the class is the timbre) and generated
videos of moving shapes (frames). ``--patches`` picks the image split (``grid``
3x3, ``vertical`` or ``horizontal`` strips, 6 each) and the matching
spectrogram split (time-frequency tiles 3x3, 6 time segments, 6 frequency
bands); videos are always split into their 8 frames.

Per seed, the train/test split, the few-label subset, the initial encoder and
the batch order are shared by all methods (paired comparison). The data sets
themselves are fixed (generator seed 0).

Usage::

    softrank-pretext-demo --quick --json results.json
    softrank-pretext-demo --patches vertical --plot vertical.png

(``softrank-pretext-demo`` is ``python -m softrank.pretext.demo`` as an
installed console script, which also runs from a source checkout's root
without the uncompiled ``./softrank`` shadowing the installed package.)

Several processes
-----------------
The demo runs unchanged under ``torchrun``, with DistributedDataParallel on the
gloo backend (CPU)::

    torchrun --nproc_per_node=2 -m softrank.pretext.demo --quick

Every process draws the same global batch (same generators) and trains on its
``1/world_size`` slice; DDP averages the gradients, which equals the gradient
of the global batch, so the run matches one process up to floating-point
summation order (the slices' losses are averaged rather than summed at once).
The probes are fitted identically on every process and only rank 0 prints,
plots and writes JSON. ``--batch-size`` is the global batch and must be a
multiple of the number of processes. Each process uses one torch thread
(``--threads``), so ``--nproc_per_node`` is the number of cores used.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
try:
    import torch
except ImportError as exc:
    raise ImportError("softrank.pretext needs PyTorch: pip install 'softrank[pretext]'") from exc

from softrank.pretext import patches as patching
from softrank.pretext.losses import DEFAULT_EPS, sample_gumbel
from softrank.pretext.models import PatchEncoder, PretextModel
from softrank.pretext.permutations import (
    _checked_pool_size,
    apply_permutations,
    hamming_permutation_set,
    hamming_set_summary,
    random_permutations,
)

__all__ = ["main", "run_demo", "DemoConfig", "pretrain", "linear_probe", "DATASETS"]

DATASETS = ("digits", "spectrograms", "videos")
METHOD_ORDER = ("soft_rank", "classification", "sinkhorn", "none")


@dataclass
class DemoConfig:
    """Everything that defines a demo run (the command line, parsed)."""

    datasets: Tuple[str, ...] = DATASETS
    methods: Tuple[str, ...] = METHOD_ORDER
    seeds: Tuple[int, ...] = (0, 1, 2)
    num_permutations: Tuple[int, ...] = (100, 1000)
    patches: str = "grid"
    pretrain_steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 1e-3
    eps: float = DEFAULT_EPS
    embedding_dim: int = 64
    hidden_dim: int = 128
    num_examples: int = 1800
    few_labels_per_class: int = 10
    test_fraction: float = 0.3
    probe_c: float = 1.0
    sinkhorn_temperature: float = 1.0
    sinkhorn_iterations: int = 20
    show_progress: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that no run could use.

        Called by :func:`run_demo`, so that a bad value fails before any data is
        generated rather than as an internal error deep in training or probing.
        """
        for name in ("pretrain_steps", "batch_size", "embedding_dim", "hidden_dim", "num_examples",
                     "few_labels_per_class", "sinkhorn_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be an integer >= 1, got {value!r}")
        for name, low in (("seeds", 0), ("num_permutations", 1)):
            values = getattr(self, name)
            valid = [not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= low for v in values]
            if not values or not all(valid):
                raise ValueError(f"DemoConfig.{name} must be a non-empty tuple of integers >= {low}, got {values!r}")
        if any(seed > _MAX_SEED for seed in self.seeds):
            raise ValueError(f"DemoConfig.seeds must be <= {_MAX_SEED} (scikit-learn's limit), got {self.seeds!r}")
        for name in ("learning_rate", "eps", "probe_c", "sinkhorn_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not (
                math.isfinite(value) and value > 0
            ):
                raise ValueError(f"DemoConfig.{name} must be a finite number > 0, got {value!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"DemoConfig.test_fraction must lie strictly between 0 and 1, got {self.test_fraction!r}")
        for name, allowed in (("datasets", DATASETS), ("methods", METHOD_ORDER)):
            values = getattr(self, name)
            if not values or any(v not in allowed for v in values):
                raise ValueError(f"DemoConfig.{name} must be a non-empty tuple drawn from {allowed}, got {values!r}")
        for name in ("datasets", "methods", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                # A repeated seed would count one run as two independent ones (and shrink the std).
                raise ValueError(f"DemoConfig.{name} must not repeat an entry, got {values!r}")
        if self.patches not in patching.IMAGE_KINDS:
            raise ValueError(f"DemoConfig.patches must be one of {patching.IMAGE_KINDS}, got {self.patches!r}")


QUICK = dict(pretrain_steps=1000)

_MAX_SEED = 2**32 - 1  # scikit-learn's random_state and numpy's legacy seeding accept 0..2**32 - 1


class _DataConfigError(ValueError):
    """A :class:`DemoConfig` field that only the data refutes (found before any training).

    A ``ValueError`` naming the field for :func:`run_demo`'s callers; ``option``
    and ``usage`` let :func:`main` report it as a usage error naming the option
    (it used to end in a traceback, after the data were made).
    """

    def __init__(self, field_name: str, usage: str, *, separator: str = "="):
        # DemoConfig.few_labels_per_class=10 exceeds ... / --few-labels-per-class: 10 exceeds ...
        super().__init__(f"DemoConfig.{field_name}{separator}{usage}")
        self.option = "--" + field_name.replace("_", "-")
        self.usage = usage


def _import_extra(module: str, package: str):
    """Import ``module``, or say which extra provides it, as the torch guard above does.

    (A missing tqdm or scikit-learn used to end in a bare ``ModuleNotFoundError``.)
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"softrank.pretext.demo needs {package}: pip install 'softrank[pretext]'") from exc


class _NoProgress:
    """What the progress bar's callers use of tqdm, doing nothing: no tqdm is needed without a bar."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class PatchedData:
    """One data set, already split into patches in their natural order."""

    name: str
    patches: torch.Tensor  # (N, n, *patch_shape) float32
    labels: np.ndarray  # (N,) int64
    split: str  # human-readable description of the patch split

    @property
    def num_patches(self) -> int:
        return int(self.patches.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def load_patched(name: str, patches: str, num_examples: int) -> PatchedData:
    """Generate or load data set ``name`` and split it as ``--patches`` says.

    Returns
    -------
    PatchedData
        ``patches`` of shape (N, n, *patch_shape), float32.
    """
    from softrank.pretext import datasets

    if name == "digits":
        images, labels = datasets.make_digits(size=12)
        grid = (3, 3) if patches == "grid" else 6
        split = patching.split_image(torch.from_numpy(images), patches, grid)
        return PatchedData(name, split.contiguous(), labels, f"image {patches} {grid}")
    if name == "spectrograms":
        spectrograms, labels = datasets.make_spectrograms(num_examples, seed=0)
        kind = {"grid": "both", "vertical": "time", "horizontal": "frequency"}[patches]
        grid = (3, 3) if kind == "both" else 6
        split = patching.split_spectrogram(torch.from_numpy(spectrograms), kind, grid)
        return PatchedData(name, split.contiguous(), labels, f"spectrogram {kind} {grid}")
    if name == "videos":
        videos, labels = datasets.make_videos(num_examples, seed=0)
        split = patching.split_video(torch.from_numpy(videos)).squeeze(2)  # (N, 8, 1, 16, 16)
        return PatchedData(name, split.contiguous(), labels, "video frames 8")
    raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")


# ----------------------------------------------------------------------------- distribution


@dataclass
class Distributed:
    """This process's place in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, global_batch: int) -> slice:
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def init_distributed() -> Distributed:
    """Join the torchrun process group (gloo) when WORLD_SIZE > 1; else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def _wrap_ddp(model: torch.nn.Module, dist_info: Distributed) -> torch.nn.Module:
    if dist_info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


# ----------------------------------------------------------------------------- training


@dataclass
class PretrainResult:
    step_seconds: List[float] = field(default_factory=list)
    final_loss: float = float("nan")

    @property
    def step_ms(self) -> float:
        """Median wall time of one training step, after 10 warm-up steps, in ms."""
        timed = self.step_seconds[10:] or self.step_seconds
        return 1000.0 * statistics.median(timed)


def pretrain(
    model: PretextModel,
    train_patches: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    permutation_set: Optional[torch.Tensor] = None,
    dist_info: Optional[Distributed] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> PretrainResult:
    """Train ``model`` (encoder + pretext head) on shuffled ``train_patches`` with Adam.

    Every step draws ``batch_size`` examples (with replacement) and one
    permutation per example: uniform over all ``n!`` for ``soft_rank`` and
    ``sinkhorn``, uniform over ``permutation_set`` for ``classification``.
    All draws use generators seeded by ``seed`` and are identical on every
    process; a process trains on its slice of the global batch.

    Parameters
    ----------
    model : PretextModel
    train_patches : torch.Tensor, shape (N, n, *patch_shape), float32
    steps, batch_size : int
        Both >= 1; ``batch_size`` is global and must be a multiple of the world size.
    learning_rate : float
    seed : int
    permutation_set : torch.Tensor, shape (K, n), int64, optional
        Required for ``classification``.
    dist_info : Distributed, optional
        This process's rank and the world size; default a single process.
    on_step : callable (step, loss) -> None, optional

    Returns
    -------
    PretrainResult
        Per-step wall times (sampling, forward, backward, update) and the last loss.

    Raises
    ------
    ValueError
        If ``steps`` or ``batch_size`` is below 1, ``batch_size`` does not divide
        among the processes, or ``permutation_set`` is missing for classification.
    """
    dist_info = dist_info or Distributed()
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        # steps = 0 would leave no loss and no step time to report; batch_size = 0 no example.
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if model.method == "classification":
        if permutation_set is None:
            raise ValueError("permutation_set is required for method='classification'")
        expected = (model.num_permutations, model.num_patches)
        if tuple(permutation_set.shape) != expected:
            # (a smaller set leaves classes untrained; a larger one draws labels the head lacks)
            raise ValueError(f"permutation_set must have shape (K, n) = {expected}, the "
                             f"model's head, got {tuple(permutation_set.shape)}")
    if batch_size % dist_info.world_size:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the world size {dist_info.world_size}")
    trained = _wrap_ddp(model, dist_info)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    batch_generator = torch.Generator().manual_seed(1_000_003 * seed + 1)
    permutation_generator = torch.Generator().manual_seed(1_000_003 * seed + 2)
    noise_generator = torch.Generator().manual_seed(1_000_003 * seed + 3)
    num_examples, num_patches = train_patches.shape[:2]
    local = dist_info.local_slice(batch_size)
    result = PretrainResult()
    model.train()
    for step in range(steps):
        start = time.perf_counter()
        indices = torch.randint(num_examples, (batch_size,), generator=batch_generator)[local]
        labels = None
        noise = None
        if model.method == "classification":
            labels = torch.randint(len(permutation_set), (batch_size,), generator=permutation_generator)[local]
            permutations = permutation_set[labels]
        else:
            permutations = random_permutations(batch_size, num_patches, generator=permutation_generator)[local]
        if model.method == "sinkhorn":
            noise = sample_gumbel((batch_size, num_patches, num_patches), generator=noise_generator)[local]
        shuffled = apply_permutations(train_patches[indices], permutations)
        loss = trained(shuffled, permutations, labels, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.step_seconds.append(time.perf_counter() - start)
        if on_step is not None:
            on_step(step, loss.item())
    result.final_loss = loss.item()
    model.eval()
    return result


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    c: float = 1.0,
    max_iterations: int = 200,
) -> float:
    """Test accuracy of an l2-regularised multinomial logistic regression.

    Features are standardised with the training mean and standard deviation;
    the probe minimises ``C * sum_i cross_entropy_i + ||W||^2 / 2`` (the
    objective of scikit-learn's ``LogisticRegression``, bias unpenalised) by
    full-batch L-BFGS in float64, at most ``max_iterations`` iterations. It is
    deterministic and takes well under a second on the demo's data.

    Parameters
    ----------
    train_features : numpy.ndarray, shape (N_train, D), float
    train_labels : numpy.ndarray, shape (N_train,), int
    test_features : numpy.ndarray, shape (N_test, D), float
    test_labels : numpy.ndarray, shape (N_test,), int
    c : float, default 1.0
        Inverse regularisation strength, the same for every method and label budget.
    max_iterations : int, default 200

    Returns
    -------
    float
        Accuracy on the test set, in [0, 1].
    """
    train = torch.as_tensor(train_features, dtype=torch.float64)
    mean = train.mean(0)
    std = train.std(0, unbiased=False).clamp_min(1e-12)
    train = (train - mean) / std
    test = (torch.as_tensor(test_features, dtype=torch.float64) - mean) / std
    targets = torch.as_tensor(train_labels, dtype=torch.int64)
    num_classes = int(max(int(targets.max()), int(np.max(test_labels)))) + 1
    weight = torch.zeros(train.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iterations, tolerance_grad=1e-6, history_size=20,
        line_search_fn="strong_wolfe",
    )
    scale = 1.0 / (c * len(train))  # the objective divided by C * N, so its size does not grow with N

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weight + bias, targets) + 0.5 * scale * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        predicted = (test @ weight + bias).argmax(1).numpy()
    return float(np.mean(predicted == np.asarray(test_labels)))


def _splits(labels: np.ndarray, seed: int, test_fraction: float, few_per_class: int):
    """Stratified train/test indices and a few-label subset of train, all from ``seed``."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=labels)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(train)
    few = np.concatenate([shuffled[labels[shuffled] == c][:few_per_class] for c in np.unique(labels)])
    return np.sort(train), np.sort(test), np.sort(few)


@dataclass
class MethodSpec:
    method: str
    num_permutations: Optional[int] = None

    @property
    def label(self) -> str:
        return f"classification K={self.num_permutations}" if self.method == "classification" else self.method


def method_specs(config: DemoConfig, num_patches: int) -> List[MethodSpec]:
    """The methods to run on a data set with ``num_patches`` patches (K capped at n!)."""
    specs: List[MethodSpec] = []
    for method in config.methods:
        if method == "classification":
            ks = sorted({min(k, math.factorial(num_patches)) for k in config.num_permutations})
            specs += [MethodSpec("classification", k) for k in ks]
        else:
            specs.append(MethodSpec(method))
    return specs


def run_demo(config: DemoConfig, dist_info: Optional[Distributed] = None) -> List[Dict]:
    """Pre-train, probe and summarise every data set x method x seed of ``config``.

    Returns
    -------
    list of dict
        One entry per (dataset, method, K, label budget); see :func:`main` for
        the keys.

    Raises
    ------
    ValueError
        If a field of ``config`` is out of range (:meth:`DemoConfig.validate`),
        or, before any training, the data refute it:
        ``few_labels_per_class`` above a class's training examples, or a ``K``
        of ``num_permutations`` whose Hamming set would take too long to choose.
    ImportError
        If scikit-learn, or tqdm while the progress bar shows, is missing.
    """
    config.validate()
    dist_info = dist_info or Distributed()
    # Imported first, so that a missing package fails before any data is made.
    _import_extra("sklearn", "scikit-learn")  # (the splits and the digits)
    show_progress = config.show_progress and dist_info.is_main
    tqdm = _import_extra("tqdm.auto", "tqdm").tqdm if show_progress else None
    data = {name: load_patched(name, config.patches, config.num_examples) for name in config.datasets}
    # Every run's (train, test, few) split, made once, before any training, so
    # that a few-label budget the data cannot meet fails first.
    splits = {
        (name, seed): _splits(data[name].labels, seed, config.test_fraction, config.few_labels_per_class)
        for name in config.datasets for seed in config.seeds
    }
    for (name, seed), (_, _, few) in splits.items():
        smallest = int(np.unique(data[name].labels[few], return_counts=True)[1].min())
        if smallest < config.few_labels_per_class:
            # Fewer were used than asked for, and the results said the number asked for.
            raise _DataConfigError(
                "few_labels_per_class",
                f"{config.few_labels_per_class} exceeds the {smallest} training examples of the "
                f"smallest class of {name!r} (seed {seed}); use at most {smallest}",
            )
    if "classification" in config.methods:
        # Each seed chooses its Hamming set just before it trains on it: a K too
        # large for its n (capped at n!) seemed to hang after other runs had finished.
        for name in config.datasets:
            n = data[name].num_patches
            for k in config.num_permutations:
                capped = min(k, math.factorial(n))
                try:
                    _checked_pool_size(capped, n, None)
                except ValueError as exc:
                    cap = f", capped at {n}! = {capped}" if capped < k else ""
                    raise _DataConfigError(
                        "num_permutations", f"{k} is too many for {name!r} ({n} patches{cap}): {exc}",
                        separator=": ",  # (the field is a tuple; this names one of its entries)
                    ) from None
    plan = [(name, spec) for name in config.datasets for spec in method_specs(config, data[name].num_patches)]
    total_steps = sum(config.pretrain_steps for _, spec in plan if spec.method != "none") * len(config.seeds)
    if show_progress:
        progress = tqdm(total=total_steps, desc="pre-training", unit="step", mininterval=1.0, file=sys.stderr)
    else:
        progress = _NoProgress()
    per_run: Dict[Tuple[str, str], Dict[str, list]] = {}
    # (dataset, K) -> the (min, mean) pairwise Hamming distance of each seed's set
    hamming_info: Dict[Tuple[str, int], List[Tuple[int, float]]] = {}
    for name in config.datasets:
        dataset = data[name]
        n = dataset.num_patches
        patch_shape = tuple(dataset.patches.shape[2:])
        for seed in config.seeds:
            train, test, few = splits[(name, seed)]
            torch.manual_seed(seed)
            initial_encoder = PatchEncoder(patch_shape, config.embedding_dim, config.hidden_dim)
            for spec in method_specs(config, n):
                encoder = copy.deepcopy(initial_encoder)
                step_ms = None
                if spec.method != "none":
                    permutation_set = None
                    if spec.method == "classification":
                        chosen = hamming_permutation_set(spec.num_permutations, n, seed=seed)
                        hamming_info.setdefault((name, spec.num_permutations), []).append(
                            hamming_set_summary(chosen) if len(chosen) > 1 else (0, 0.0))
                        permutation_set = torch.from_numpy(chosen)
                    torch.manual_seed(10_000 + seed)
                    model = PretextModel(
                        encoder, spec.method, n, spec.num_permutations,
                        head_hidden_dim=config.hidden_dim, eps=config.eps,
                        sinkhorn_temperature=config.sinkhorn_temperature,
                        sinkhorn_iterations=config.sinkhorn_iterations,
                    )
                    progress.set_postfix_str(f"{name} seed={seed} {spec.label}")
                    result = pretrain(
                        model, dataset.patches[torch.from_numpy(train)],
                        steps=config.pretrain_steps, batch_size=config.batch_size,
                        learning_rate=config.learning_rate, seed=seed,
                        permutation_set=permutation_set, dist_info=dist_info,
                        on_step=lambda step, loss: progress.update(1),
                    )
                    step_ms = result.step_ms
                features = encoder.features(dataset.patches).numpy()
                few_accuracy = linear_probe(features[few], dataset.labels[few], features[test], dataset.labels[test], c=config.probe_c)
                all_accuracy = linear_probe(features[train], dataset.labels[train], features[test], dataset.labels[test], c=config.probe_c)
                record = per_run.setdefault((name, spec.label), {"few": [], "all": [], "step_ms": [], "spec": spec})
                record["few"].append(few_accuracy)
                record["all"].append(all_accuracy)
                if step_ms is not None:
                    record["step_ms"].append(step_ms)
    progress.close()

    results = []
    for (name, label), record in per_run.items():
        spec = record["spec"]
        dataset = data[name]
        for budget in ("few", "all"):
            accuracies = record[budget]
            entry = {
                "dataset": name,
                "method": spec.method,
                "num_permutations": spec.num_permutations,
                "labels": budget,
                "labels_per_class": config.few_labels_per_class if budget == "few" else None,
                "probe_accuracy_mean": float(np.mean(accuracies)),
                "probe_accuracy_std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
                "probe_accuracy_per_seed": accuracies,
                "step_ms": float(np.mean(record["step_ms"])) if record["step_ms"] else None,
                "seeds": list(config.seeds),
                "num_patches": dataset.num_patches,
                "patches": dataset.split,
                "pretrain_steps": 0 if spec.method == "none" else config.pretrain_steps,
            }
            if spec.method == "soft_rank":
                entry["eps"] = config.eps
            if spec.method == "classification":
                # Each seed draws its own set: the smallest distance over all
                # of them, the mean of their means, and each seed's pair.
                per_seed = hamming_info[(name, spec.num_permutations)]
                entry["hamming_min"] = min(low for low, _ in per_seed)
                entry["hamming_mean"] = float(np.mean([mean for _, mean in per_seed]))
                entry["hamming_per_seed"] = [[low, mean] for low, mean in per_seed]
            results.append(entry)
    return results


# ----------------------------------------------------------------------------- reporting


def _find(results: Sequence[Dict], dataset: str, method: str, budget: str, k: Optional[int] = None) -> Optional[Dict]:
    for entry in results:
        if (entry["dataset"], entry["method"], entry["labels"]) == (dataset, method, budget) and (
            k is None or entry["num_permutations"] == k
        ):
            return entry
    return None


def _label(entry: Dict) -> str:
    if entry["method"] == "classification":
        return f"classification K={entry['num_permutations']}"
    return entry["method"]


def format_table(results: Sequence[Dict]) -> str:
    """The results as a text table: probe accuracy (mean +- std over seeds), step time."""
    lines = []
    header = f"{'dataset':<13} {'method':<24} {'few labels':>15} {'all labels':>15} {'step ms':>9} {'vs cls':>7}"
    lines += [header, "-" * len(header)]
    for entry in results:
        if entry["labels"] != "few":
            continue
        other = _find(results, entry["dataset"], entry["method"], "all", entry["num_permutations"])
        reference = _reference_classification(results, entry["dataset"])
        ratio = ""
        if entry["step_ms"] is not None and reference is not None and reference["step_ms"]:
            ratio = f"{entry['step_ms'] / reference['step_ms']:.2f}x"
        step = f"{entry['step_ms']:.2f}" if entry["step_ms"] is not None else "-"
        lines.append(
            f"{entry['dataset']:<13} {_label(entry):<24} "
            f"{100 * entry['probe_accuracy_mean']:6.1f} +- {100 * entry['probe_accuracy_std']:4.1f} "
            f"{100 * other['probe_accuracy_mean']:6.1f} +- {100 * other['probe_accuracy_std']:4.1f} "
            f"{step:>9} {ratio:>7}"
        )
    return "\n".join(lines)


def _reference_classification(results: Sequence[Dict], dataset: str) -> Optional[Dict]:
    """The classification run step times are compared with: K = 100, else the smallest K."""
    candidates = [e for e in results if e["dataset"] == dataset and e["method"] == "classification" and e["labels"] == "few"]
    for entry in candidates:
        if entry["num_permutations"] == 100:
            return entry
    return min(candidates, key=lambda e: e["num_permutations"]) if candidates else None


def claims(results: Sequence[Dict]) -> List[str]:
    """One line per data set and label budget: does soft_rank beat the baselines?"""
    lines = []
    for dataset in dict.fromkeys(e["dataset"] for e in results):
        for budget in ("few", "all"):
            ours = _find(results, dataset, "soft_rank", budget)
            if ours is None:
                continue
            rivals = [e for e in results if e["dataset"] == dataset and e["labels"] == budget and e["method"] != "soft_rank"]
            verdicts = []
            for rival in rivals:
                difference = ours["probe_accuracy_mean"] - rival["probe_accuracy_mean"]
                spread = math.hypot(ours["probe_accuracy_std"], rival["probe_accuracy_std"])
                word = "beats" if difference > 0 else "loses to" if difference < 0 else "ties with"
                clear = " (within noise)" if abs(difference) <= spread else ""
                verdicts.append(f"{word} {_label(rival)} by {100 * difference:+.1f} pts{clear}")
            lines.append(f"{dataset}, {budget} labels: soft_rank " + "; ".join(verdicts))
        ours = _find(results, dataset, "soft_rank", "few")
        reference = _reference_classification(results, dataset)
        if ours and reference and ours["step_ms"] and reference["step_ms"]:
            ratio = ours["step_ms"] / reference["step_ms"]
            verdict = "within" if ratio <= 1.25 else "NOT within"
            lines.append(
                f"{dataset}: soft_rank step {ours['step_ms']:.2f} ms = {ratio:.2f}x classification "
                f"K={reference['num_permutations']} ({verdict} 1.25x)"
            )
    return lines


def save_plot(results: Sequence[Dict], path: str) -> None:
    """Bar chart of probe accuracy (mean +- std) per data set, method and label budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(e["dataset"] for e in results))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        few = [e for e in results if e["dataset"] == dataset and e["labels"] == "few"]
        labels = [_label(e) for e in few]
        x = np.arange(len(few))
        for offset, budget in ((-0.2, "few"), (0.2, "all")):
            entries = [_find(results, dataset, e["method"], budget, e["num_permutations"]) for e in few]
            ax.bar(
                x + offset, [100 * e["probe_accuracy_mean"] for e in entries], width=0.4,
                yerr=[100 * e["probe_accuracy_std"] for e in entries], capsize=3,
                label=f"{budget} labels",
            )
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{dataset} ({few[0]['patches']})", fontsize=9)
        ax.set_ylabel("linear probe test accuracy (%)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Linear probe after pre-training, mean +- std over {len(results[0]['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def _bounded_int(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type`` for integers in ``[low, high]``.

    A bad value becomes argparse's usage error naming the option (exit code 2),
    instead of a traceback from deep inside training (``--steps 0`` used to end
    in a ``StatisticsError``, ``--batch-size 0`` in a reshape error).
    """
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value

    parse.__name__ = "integer"  # what argparse calls the type in its own messages
    return parse


def _positive_float(text: str) -> float:
    """An argparse ``type`` for finite floats > 0 (``float()`` alone accepts "nan" and "inf")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`; every numeric option is range-checked while parsing.

    Returns
    -------
    argparse.ArgumentParser
    """
    defaults = DemoConfig()
    positive = _bounded_int(1)
    parser = argparse.ArgumentParser(
        prog="softrank-pretext-demo",
        description="Pre-train a patch encoder by reordering shuffled patches (soft rank) "
        "and by its baselines, then compare them with a linear probe.",
    )
    parser.add_argument("--quick", action="store_true", help=f"fewer pre-training steps ({QUICK['pretrain_steps']})")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(defaults.datasets))
    parser.add_argument("--methods", nargs="+", choices=METHOD_ORDER, default=list(defaults.methods))
    parser.add_argument("--seeds", nargs="+", type=_bounded_int(0, _MAX_SEED), default=list(defaults.seeds))
    parser.add_argument("--num-permutations", nargs="+", type=positive, default=list(defaults.num_permutations),
                        help="K values of the classification baseline (capped at n!; a K whose "
                        "Hamming set would take over a minute to choose, as K > 10000 for 9 patches, is refused)")
    parser.add_argument("--patches", choices=patching.IMAGE_KINDS, default=defaults.patches,
                        help="image split; spectrograms follow: grid=time-frequency tiles, "
                        "vertical=time segments, horizontal=frequency bands")
    parser.add_argument("--steps", type=positive, default=None, help="pre-training steps per run (>= 1)")
    parser.add_argument("--batch-size", type=positive, default=defaults.batch_size,
                        help="global batch size (>= 1, a multiple of the number of processes)")
    parser.add_argument("--eps", type=_positive_float, default=defaults.eps, help="soft_rank strength (> 0)")
    parser.add_argument("--few-labels-per-class", type=positive, default=defaults.few_labels_per_class)
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", default=None, help="write a PNG plot of the results")
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch threads per process (default 1: the models are so small that "
                        "intra-op threads cost more than they give, badly so on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    config = DemoConfig(
        datasets=tuple(dict.fromkeys(args.datasets)),  # a repeated entry runs once, as methods and K do
        methods=tuple(m for m in METHOD_ORDER if m in args.methods),
        seeds=tuple(dict.fromkeys(args.seeds)),
        num_permutations=tuple(args.num_permutations),
        patches=args.patches,
        batch_size=args.batch_size,
        eps=args.eps,
        few_labels_per_class=args.few_labels_per_class,
        show_progress=not args.no_progress,
    )
    if args.quick:
        config.pretrain_steps = QUICK["pretrain_steps"]
    if args.steps is not None:
        config.pretrain_steps = args.steps
    return config


def _check_output_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, as a usage error naming the option, an output file that could not be written.

    The files are written only after training (a full run takes 15 minutes or
    more), where a missing directory used to end in a traceback that lost the
    results; so the directory, and matplotlib for ``--plot``, are checked first.
    """
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if not path:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            parser.error(f"argument {option}: {path!r} is a directory, not a file")
        if not os.path.isdir(directory):
            parser.error(f"argument {option}: directory {directory!r} of {path!r} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            parser.error(f"argument {option}: directory {directory!r} of {path!r} is not writable")
    if args.plot:
        try:
            importlib.import_module("matplotlib")  # (save_plot imports it again, after training)
        except ImportError:
            parser.error("argument --plot: needs matplotlib: pip install 'softrank[pretext]'")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m softrank.pretext.demo``).

    Prints the table and the verdict on each claim; with ``--json PATH`` writes
    the results and then, with ``--plot PATH``, saves the plot (nothing is
    written unless asked for; both directories, and matplotlib, are checked
    before training). The JSON is ``{"results": [...], "plot": PATH, "config": {...},
    "wall_time_s": ..., "world_size": ...}``, where each result has ``dataset``,
    ``method`` (soft_rank | classification | sinkhorn | none),
    ``num_permutations`` (K, classification only), ``labels`` (few | all),
    ``probe_accuracy_mean``, ``probe_accuracy_std`` (over seeds, ddof 1),
    ``probe_accuracy_per_seed``, ``step_ms`` (median step time, averaged over
    seeds; null for none), ``seeds``, ``num_patches``, ``patches`` and
    ``pretrain_steps``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world_size:
        # Checked before the process group is joined, so every process stops with the same usage error.
        parser.error(f"argument --batch-size: {args.batch_size} is not a multiple of the {world_size} processes")
    _check_output_paths(parser, args)
    config = config_from_args(args)
    dist_info = init_distributed()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        results = run_demo(config, dist_info)
    except _DataConfigError as exc:
        # Raised before any training, alike on every process, so each stops with this usage error.
        parser.error(f"argument {exc.option}: {exc.usage}")
    wall_time = time.perf_counter() - start
    if dist_info.is_main:
        print(format_table(results))
        print()
        for line in claims(results):
            print(line)
        if args.json:
            # Written before the plot, so that a plot that fails still leaves the results.
            payload = {
                "results": results,
                "plot": args.plot,
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
                "wall_time_s": wall_time,
                "world_size": dist_info.world_size,
            }
            with open(args.json, "w") as handle:
                json.dump(payload, handle, indent=2)
        if args.plot:
            save_plot(results, args.plot)
            print(f"\nplot: {args.plot}")
        print(f"\nwall time {wall_time:.0f} s on {dist_info.world_size} process(es), "
              f"{torch.get_num_threads()} thread(s) each")
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
