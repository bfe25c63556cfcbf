"""softrank.pretext.patches: every split has an exact inverse and numbers patches row-major."""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

from softrank.pretext import patches as P


def _require(module: str):
    """Import ``module``; skip when it is missing, except under CI where it must be there."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def _arange(shape):
    return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)


@pytest.mark.parametrize("kind, grid, expected", [
    ("grid", (3, 2), (5, 2, 6, 1, 2, 3)),
    ("grid", 2, (5, 2, 4, 1, 3, 3)),
    ("vertical", 3, (5, 2, 3, 1, 6, 2)),
    ("horizontal", 3, (5, 2, 3, 1, 2, 6)),
])
def test_image_round_trip_and_shape(kind, grid, expected):
    images = _arange((5, 2, 1, 6, 6))
    patches = P.split_image(images, kind, grid)
    assert patches.shape == expected
    np.testing.assert_array_equal(P.merge_image(patches, kind, grid), images)


def test_image_grid_patches_are_row_major_tiles():
    images = _arange((2, 3, 6, 4))  # (B, C, H, W)
    patches = P.split_image(images, "grid", (3, 2))  # tiles of 2 x 2
    for i in range(3):
        for j in range(2):
            np.testing.assert_array_equal(patches[:, i * 2 + j], images[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2])


def test_strips_are_full_height_or_width():
    images = _arange((1, 1, 4, 6))
    vertical = P.split_image(images, "vertical", 3)
    np.testing.assert_array_equal(vertical[0, 1, 0], images[0, 0, :, 2:4])
    horizontal = P.split_image(images, "horizontal", 2)
    np.testing.assert_array_equal(horizontal[0, 1, 0], images[0, 0, 2:4, :])


@pytest.mark.parametrize("kind, grid, expected", [
    ("time", 4, (3, 4, 6, 2)),
    ("frequency", 3, (3, 3, 2, 8)),
    ("both", (3, 4), (3, 12, 2, 2)),
    ("both", 2, (3, 4, 3, 4)),
])
def test_spectrogram_round_trip_and_shape(kind, grid, expected):
    spectrograms = _arange((3, 6, 8))  # (B, F, T)
    patches = P.split_spectrogram(spectrograms, kind, grid)
    assert patches.shape == expected
    np.testing.assert_array_equal(P.merge_spectrogram(patches, kind, grid), spectrograms)


def test_spectrogram_time_segments_are_consecutive_frames():
    spectrograms = _arange((1, 6, 8))
    patches = P.split_spectrogram(spectrograms, "time", 4)
    np.testing.assert_array_equal(patches[0, 3], spectrograms[0, :, 6:8])
    tiles = P.split_spectrogram(spectrograms, "both", (3, 4))
    np.testing.assert_array_equal(tiles[0, 1 * 4 + 2], spectrograms[0, 2:4, 4:6])


@pytest.mark.parametrize("num_clips", [None, 8, 4, 2, 1])
def test_video_round_trip(num_clips):
    videos = _arange((2, 8, 3, 4, 5))  # (B, T, C, H, W)
    patches = P.split_video(videos, num_clips)
    clips = 8 if num_clips is None else num_clips
    assert patches.shape == (2, clips, 8 // clips, 3, 4, 5)
    np.testing.assert_array_equal(P.merge_video(patches, num_clips), videos)
    np.testing.assert_array_equal(patches[:, -1, -1], videos[:, -1])


@pytest.mark.parametrize("num_segments", [1, 2, 3, 12])
def test_signal_round_trip(num_segments):
    signals = _arange((4, 2, 12))
    patches = P.split_signal(signals, num_segments)
    assert patches.shape == (4, 2, num_segments, 12 // num_segments)
    np.testing.assert_array_equal(P.merge_signal(patches, num_segments), signals)
    np.testing.assert_array_equal(P.merge_signal(patches), signals)


def test_no_batch_dimensions():
    image = _arange((1, 6, 6))
    assert P.split_image(image, "grid", 3).shape == (9, 1, 2, 2)
    np.testing.assert_array_equal(P.merge_image(P.split_image(image, "grid", 3), "grid", 3), image)
    signal = _arange((10,))
    np.testing.assert_array_equal(P.merge_signal(P.split_signal(signal, 5)), signal)


def test_torch_tensors_keep_dtype_and_round_trip_bitwise():
    torch = _require("torch")
    images = torch.randn(4, 3, 12, 12, dtype=torch.float32)
    for kind, grid in (("grid", (3, 4)), ("vertical", 6), ("horizontal", 4)):
        patches = P.split_image(images, kind, grid)
        assert patches.dtype == torch.float32
        assert torch.equal(P.merge_image(patches, kind, grid), images)
    spectrograms = torch.randn(2, 24, 24, dtype=torch.float64)
    for kind, grid in (("time", 6), ("frequency", 8), ("both", (3, 3))):
        assert torch.equal(P.merge_spectrogram(P.split_spectrogram(spectrograms, kind, grid), kind, grid), spectrograms)
    videos = torch.randn(2, 8, 1, 4, 4)
    assert torch.equal(P.merge_video(P.split_video(videos)), videos)


@pytest.mark.parametrize("call", [
    lambda: P.split_image(np.zeros((1, 1, 7, 6)), "grid", 3),
    lambda: P.split_image(np.zeros((1, 1, 6, 6)), "vertical", 4),
    lambda: P.split_image(np.zeros((1, 1, 6, 6)), "diagonal", 2),
    lambda: P.split_image(np.zeros((6, 6)), "grid", 2),
    lambda: P.split_spectrogram(np.zeros((2, 6, 7)), "time", 2),
    lambda: P.split_spectrogram(np.zeros((2, 6, 8)), "spectral", 2),
    lambda: P.merge_image(np.zeros((1, 5, 1, 2, 2)), "grid", 2),
    lambda: P.split_video(np.zeros((2, 8, 1, 4, 4)), 3),
    lambda: P.split_signal(np.zeros((2, 10)), 0),
])
def test_bad_sizes_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("call, match", [
    # merge_* took counts that split_* refuses: numpy's or torch's reshape
    # errors, or, with no patches, an empty "image".
    (lambda: P.merge_image(np.zeros((1, 1, 2, 2)), "grid", -1), "grid must be >= 1, got -1"),
    (lambda: P.merge_image(_require("torch").zeros((4, 1, 2, 2)), "grid", -2), "grid must be >= 1, got -2"),
    (lambda: P.merge_image(np.zeros((1, 3, 1, 2, 2)), "grid", (-1, -3)), r"grid\[0\] must be >= 1"),
    (lambda: P.merge_image(np.zeros((1, 1, 2, 2)), "vertical", 0), "grid must be >= 1, got 0"),
    (lambda: P.merge_spectrogram(_require("torch").zeros((1, 2, 2)), "both", (-1, -1)), r"grid\[0\] must be >= 1"),
    (lambda: P.merge_spectrogram(np.zeros((1, 2, 2)), "time", -1), "grid must be >= 1"),
    (lambda: P.merge_signal(np.zeros((0, 4))), r"shape \(0, 4\) holds no patches"),
    (lambda: P.merge_signal(np.zeros((3, 4)), -3), "num_segments must be >= 1, got -3"),
    (lambda: P.merge_image(np.zeros((0, 1, 2, 2)), "grid", 0), "grid must be >= 1, got 0"),
    (lambda: P.merge_video(np.zeros((0, 1, 1, 2, 2))), "holds no patches"),
    (lambda: P.merge_video(np.zeros((2, 1, 1, 2, 2)), -2), "num_clips must be >= 1"),
    (lambda: P.split_image(np.zeros((1, 1, 2, 2)), "grid", 0), "grid must be >= 1, got 0"),
    (lambda: P.split_video(np.zeros((2, 1, 1, 2, 2)), 0), "num_clips must be >= 1"),
])
def test_counts_below_one_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()



@pytest.mark.parametrize("call, match", [
    (lambda: P.split_image(np.zeros((1, 4, 6)), "grid", (2.7, 3)), r"grid\[0\] must be an int, got float 2.7"),
    (lambda: P.split_image(np.zeros((1, 4, 6)), "grid", (2, 3.0)), r"grid\[1\] must be an int"),
    (lambda: P.split_image(np.zeros((1, 4, 6)), "grid", 2.0), "grid"),
    (lambda: P.split_image(np.zeros((1, 4, 6)), "grid", True), "grid must be an int or a pair"),
    (lambda: P.split_image(np.zeros((1, 4, 6)), "vertical", 2.0), "number of strips"),
    (lambda: P.split_image(np.zeros((1, 4, 6)), "horizontal", (2,)), "number of strips"),
    (lambda: P.merge_image(np.zeros((1, 6, 1, 2, 2)), "grid", (2.7, 3)), r"grid\[0\]"),
    (lambda: P.split_spectrogram(np.zeros((4, 6)), "both", (2, 1.5)), r"grid\[1\]"),
    (lambda: P.split_spectrogram(np.zeros((4, 6)), "time", 3.0), "number of pieces"),
    (lambda: P.split_video(np.zeros((8, 1, 2, 2)), 2.0), "num_clips must be an int"),
    (lambda: P.merge_video(np.zeros((2, 4, 1, 2, 2)), 2.5), "num_clips must be an int"),
    (lambda: P.split_signal(np.zeros(6), 2.0), "num_segments must be an int"),
    (lambda: P.merge_signal(np.zeros((2, 3)), True), "num_segments must be an int"),
    (lambda: P.split_signal([1.0, 2.0, 3.0, 4.0], 2), "signals must be a torch.Tensor or numpy.ndarray"),
    (lambda: P.merge_video([[0.0]]), "patches must be a torch.Tensor or numpy.ndarray"),
])
def test_non_integer_counts_are_refused_not_truncated(call, match):
    # (2.7, 3) used to split silently into a 2 x 3 grid.
    with pytest.raises(TypeError, match=match):
        call()


def test_numpy_integer_counts_split_like_python_ints():
    images = _arange((2, 1, 4, 6))
    for kind, grid, same in [
        ("vertical", np.int64(3), 3), ("horizontal", np.int32(2), 2),
        ("grid", (np.int64(2), np.int16(3)), (2, 3)), ("grid", np.int64(2), 2),
    ]:
        patches = P.split_image(images, kind, grid)
        np.testing.assert_array_equal(patches, P.split_image(images, kind, same))
        np.testing.assert_array_equal(P.merge_image(patches, kind, grid), images)
    spectrograms = _arange((2, 4, 6))
    for kind, grid, same in [
        ("time", np.int64(3), 3), ("frequency", np.uint8(2), 2), ("both", np.array([2, 3]), (2, 3)),
    ]:
        np.testing.assert_array_equal(P.split_spectrogram(spectrograms, kind, grid),
                                      P.split_spectrogram(spectrograms, kind, same))
    # Independent reference: strip j of a vertical split is columns 2j..2j+1.
    strips = P.split_image(images, "vertical", np.int64(3))
    for j in range(3):
        np.testing.assert_array_equal(strips[:, j], images[..., 2 * j:2 * j + 2])
    np.testing.assert_array_equal(P.split_signal(_arange((2, 6)), np.int64(3)), _arange((2, 6)).reshape(2, 3, 2))
    videos = _arange((2, 8, 1, 2, 2))
    np.testing.assert_array_equal(P.merge_video(P.split_video(videos, np.int64(4)), np.int64(4)), videos)
