"""Small labelled data sets that need no download, for the pretext demo.

- :func:`make_digits`: scikit-learn's bundled 8x8 handwritten digits (1797
  images, 10 classes), resized to 12x12 so that they split into a 3x3 grid.
- :func:`make_spectrograms`: procedurally generated log-magnitude spectrograms
  of harmonic tones; the class is the timbre (the harmonic amplitude profile),
  while pitch, onset, attack, decay and noise are random.
- :func:`make_videos`: procedurally generated short grey-scale videos of one
  moving shape that leaves a fading trail; the class is the shape and the kind
  of motion (straight with bounces, or orbit). The trail gives the frames an
  arrow of time, so their order is recoverable.

Every generator is deterministic given its ``seed`` and returns float32
examples standardised to zero mean and unit variance over the whole set, and
int64 labels.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from softrank.pretext._checks import as_count

__all__ = ["make_digits", "make_spectrograms", "make_videos", "TIMBRES", "SHAPES", "MOTIONS"]

TIMBRES = ("sine", "sawtooth", "square", "bright", "formant", "hollow")
SHAPES = ("square", "disk", "cross")
MOTIONS = ("straight", "orbit")


def _standardise(examples: np.ndarray) -> np.ndarray:
    return ((examples - examples.mean()) / examples.std()).astype(np.float32)


def make_digits(size: int = 12) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, bilinearly resized to ``size x size``.

    Returns
    -------
    images : numpy.ndarray, shape (1797, 1, size, size), float32
    labels : numpy.ndarray, shape (1797,), int64, values 0..9
    """
    size = as_count(size, "size", minimum=1)
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return _standardise(images.numpy()), digits.target.astype(np.int64)


def _harmonic_profiles(num_harmonics: int) -> np.ndarray:
    """Mean amplitude of harmonics 1..num_harmonics for each timbre, shape (len(TIMBRES), H)."""
    k = np.arange(1, num_harmonics + 1, dtype=np.float64)
    odd = (k % 2 == 1).astype(np.float64)
    profiles = {
        "sine": np.where(k == 1, 1.0, 0.03),
        "sawtooth": 1.0 / k,
        "square": odd / k + 0.02,
        "bright": k ** -0.25,
        "formant": 0.15 + np.exp(-0.5 * ((k - 4.0) / 1.2) ** 2),
        "hollow": np.where(k == 1, 1.0, (1 - odd) * 0.8 / np.sqrt(k) + 0.02),
    }
    return np.stack([profiles[name] for name in TIMBRES])


def make_spectrograms(
    num_examples: int = 1800,
    *,
    num_bins: int = 24,
    num_frames: int = 24,
    seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Log-magnitude spectrograms of harmonic tones; the class is the timbre.

    Each tone has a random fundamental (1.2 to 3 frequency bins; harmonic ``k``
    sits at ``k * f0``), a random onset, a linear attack and an exponential
    decay that is faster for higher harmonics, per-harmonic amplitude jitter
    (log-normal, sigma 0.3) and additive noise. The class sets the mean
    harmonic profile (see :data:`TIMBRES`).

    Returns
    -------
    spectrograms : numpy.ndarray, shape (num_examples, num_bins, num_frames), float32
        Frequency on axis 1, time on axis 2.
    labels : numpy.ndarray, shape (num_examples,), int64, values 0..len(TIMBRES)-1
    """
    num_examples = as_count(num_examples, "num_examples", minimum=1)
    num_bins = as_count(num_bins, "num_bins", minimum=1)
    num_frames = as_count(num_frames, "num_frames", minimum=1)
    rng = np.random.default_rng(seed)
    num_harmonics = 16
    profiles = _harmonic_profiles(num_harmonics)
    labels = rng.integers(len(TIMBRES), size=num_examples)
    k = np.arange(1, num_harmonics + 1, dtype=np.float64)
    f0 = rng.uniform(1.2, 3.0, size=(num_examples, 1))
    amplitudes = profiles[labels] * np.exp(0.3 * rng.standard_normal((num_examples, num_harmonics)))
    amplitudes *= (k * f0 < num_bins + 1)  # harmonics above the top bin are cut off
    onset = rng.uniform(0.0, 4.0, size=(num_examples, 1, 1))
    attack = rng.uniform(1.0, 3.0, size=(num_examples, 1, 1))
    decay = rng.uniform(0.04, 0.15, size=(num_examples, 1, 1)) * (1.0 + 0.15 * k)[None, :, None]
    t = np.arange(num_frames, dtype=np.float64)[None, None, :]
    since_onset = t - onset
    envelope = np.clip(since_onset / attack, 0.0, 1.0) * np.exp(-decay * np.clip(since_onset - attack, 0.0, None))
    freqs = np.arange(num_bins, dtype=np.float64)
    line_shape = np.exp(-0.5 * ((freqs[None, None, :] - (k[None, :] * f0)[:, :, None]) / 0.6) ** 2)
    magnitude = np.einsum("nh,nhf,nht->nft", amplitudes, line_shape, envelope)
    magnitude += 0.02 * np.abs(rng.standard_normal(magnitude.shape))
    return _standardise(np.log(0.01 + magnitude)), labels.astype(np.int64)


def _render(shape_ids: np.ndarray, centres: np.ndarray, size: int, radius: float) -> np.ndarray:
    """Anti-aliased shapes: ``shape_ids`` (N,), ``centres`` (N, T, 2) -> (N, T, size, size)."""
    grid = np.arange(size, dtype=np.float64) + 0.5
    dy = grid[None, None, :, None] - centres[:, :, 0, None, None]
    dx = grid[None, None, None, :] - centres[:, :, 1, None, None]
    square = np.clip(radius + 0.5 - np.maximum(np.abs(dx), np.abs(dy)), 0.0, 1.0)
    disk = np.clip(radius + 0.5 - np.hypot(dx, dy), 0.0, 1.0)
    arm = np.clip(1.5 - np.minimum(np.abs(dx), np.abs(dy)), 0.0, 1.0)
    cross = np.minimum(arm, np.clip(radius + 1.0 - np.maximum(np.abs(dx), np.abs(dy)), 0.0, 1.0))
    stacked = np.stack([square, disk, cross])
    return stacked[shape_ids, np.arange(len(shape_ids))]


def make_videos(
    num_examples: int = 1800,
    *,
    num_frames: int = 8,
    size: int = 16,
    seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Grey-scale videos of one moving shape with a fading trail.

    Class ``shape * len(MOTIONS) + motion``: the shape (:data:`SHAPES`) and the
    motion (:data:`MOTIONS`): ``"straight"`` at a constant random velocity
    (0.8 to 1.4 pixels per frame) reflected at the borders, or ``"orbit"``
    around a random centre (radius 3 to 4.5 pixels, 0.5 to 0.8 radians per
    frame, either sense). Each frame shows the shape at full intensity over
    the trail of its past positions (decaying by 0.6 per frame, at half
    intensity), plus Gaussian noise (sigma 0.05).

    Returns
    -------
    videos : numpy.ndarray, shape (num_examples, num_frames, 1, size, size), float32
    labels : numpy.ndarray, shape (num_examples,), int64, values 0..5
    """
    num_examples = as_count(num_examples, "num_examples", minimum=1)
    num_frames = as_count(num_frames, "num_frames", minimum=1)
    size = as_count(size, "size", minimum=9)  # (shapes start 4 pixels or more from the border)
    rng = np.random.default_rng(seed)
    shape_ids = rng.integers(len(SHAPES), size=num_examples)
    motion_ids = rng.integers(len(MOTIONS), size=num_examples)
    t = np.arange(num_frames, dtype=np.float64)[None, :]
    low, high = 3.0, size - 3.0
    start = rng.uniform(low + 1, high - 1, size=(num_examples, 2))
    angle = rng.uniform(0, 2 * np.pi, size=num_examples)
    speed = rng.uniform(0.8, 1.4, size=num_examples)
    velocity = speed[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)
    unfolded = start[:, None, :] - low + velocity[:, None, :] * t[..., None]
    span = high - low
    straight = low + span - np.abs(np.mod(unfolded, 2 * span) - span)  # reflection at the borders
    centre = rng.uniform(size / 2 - 2, size / 2 + 2, size=(num_examples, 1, 2))
    orbit_radius = rng.uniform(3.0, 4.5, size=(num_examples, 1))
    angular = rng.uniform(0.5, 0.8, size=(num_examples, 1)) * rng.choice([-1.0, 1.0], size=(num_examples, 1))
    phase = angle[:, None] + angular * t
    orbit = centre + orbit_radius[..., None] * np.stack([np.sin(phase), np.cos(phase)], axis=2)
    centres = np.where(motion_ids[:, None, None] == 0, straight, orbit)
    shapes = _render(shape_ids, centres, size, radius=2.5)
    frames = np.empty_like(shapes)
    trail = np.zeros_like(shapes[:, 0])
    for frame in range(num_frames):
        frames[:, frame] = np.maximum(shapes[:, frame], 0.5 * trail)
        trail = np.maximum(0.6 * trail, shapes[:, frame])
    frames += 0.05 * rng.standard_normal(frames.shape)
    labels = shape_ids * len(MOTIONS) + motion_ids
    return _standardise(frames[:, :, None]), labels.astype(np.int64)
