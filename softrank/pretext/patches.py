"""Split examples into patches and merge patches back, exactly.

Every ``split_*`` function turns a batch of examples into a batch of patch
sequences ``(..., n, *patch_shape)`` and its ``merge_*`` partner is its exact
inverse (a pure reshape/transpose: no arithmetic, so the round trip is bitwise).
Patches are numbered in row-major order of the grid they come from: for an
image grid, patch ``i * cols + j`` is the one in grid row ``i``, column ``j``.

The functions work on ``torch.Tensor`` and on ``numpy.ndarray`` alike, keep the
dtype and device, and raise ``ValueError`` naming the argument when a size does
not divide evenly, and ``TypeError`` when a count is not an integer (a float
such as 2.7 is refused, not truncated; numpy integers are accepted).

- image ``(..., C, H, W)``, ``"grid"`` rows x cols:
  ``(..., rows*cols, C, H/rows, W/cols)``; ``"vertical"`` n strips:
  ``(..., n, C, H, W/n)``; ``"horizontal"`` n strips: ``(..., n, C, H/n, W)``;
- spectrogram ``(..., F, T)``, ``"time"`` n segments: ``(..., n, F, T/n)``;
  ``"frequency"`` n bands: ``(..., n, F/n, T)``; ``"both"`` nf x nt tiles:
  ``(..., nf*nt, F/nf, T/nt)``;
- video ``(..., T, C, H, W)``, n clips of frames: ``(..., n, T/n, C, H, W)``;
- signal ``(..., L)``, n segments: ``(..., n, L/n)``.

Examples
--------
>>> import torch
>>> images = torch.arange(2 * 1 * 4 * 6.0).reshape(2, 1, 4, 6)
>>> patches = split_image(images, "grid", (2, 3))
>>> tuple(patches.shape)
(2, 6, 1, 2, 2)
>>> bool((merge_image(patches, "grid", (2, 3)) == images).all())
True
"""
from __future__ import annotations

import operator
from typing import Any, Sequence, Tuple, Union
from softrank.pretext._checks import as_count

__all__ = [
    "IMAGE_KINDS",
    "SPECTROGRAM_KINDS",
    "split_image",
    "merge_image",
    "split_spectrogram",
    "merge_spectrogram",
    "split_video",
    "merge_video",
    "split_signal",
    "merge_signal",
    "image_grid",
    "spectrogram_grid",
]

IMAGE_KINDS = ("grid", "vertical", "horizontal")
SPECTROGRAM_KINDS = ("time", "frequency", "both")

GridSpec = Union[int, Tuple[int, int], Sequence[int]]


def _transpose(array: Any, order: Sequence[int]) -> Any:
    """``array`` with its axes in ``order``; torch and numpy spell this differently."""
    if hasattr(array, "permute"):
        return array.permute(*order)
    return array.transpose(order)


def _check_array(array: Any, name: str) -> None:
    if not (hasattr(array, "shape") and hasattr(array, "reshape")):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(array).__name__}")


def _split_axes(array: Any, event_ndim: int, counts: Sequence[int], name: str) -> Any:
    """Split each of the last ``event_ndim`` axes into ``counts[k]`` equal pieces.

    ``array`` has shape ``(*batch, d_0, ..., d_{e-1})``; the result has shape
    ``(*batch, prod(counts), d_0 / counts[0], ..., d_{e-1} / counts[e-1])`` with
    the pieces numbered row-major (the first axis varies slowest).
    """
    _check_array(array, name)
    shape = tuple(array.shape)
    if len(shape) < event_ndim:
        raise ValueError(
            f"{name} must have at least {event_ndim} dimensions, got shape {shape}"
        )
    batch, event = shape[: len(shape) - event_ndim], shape[len(shape) - event_ndim:]
    for size, count in zip(event, counts):
        if count < 1 or size % count:
            raise ValueError(
                f"{name} of shape {shape}: an axis of size {size} cannot be split "
                f"into {count} equal pieces"
            )
    expanded = list(batch)
    for size, count in zip(event, counts):
        expanded += [count, size // count]
    nb = len(batch)
    count_axes = [nb + 2 * k for k in range(event_ndim)]
    piece_axes = [nb + 2 * k + 1 for k in range(event_ndim)]
    moved = _transpose(array.reshape(expanded), list(range(nb)) + count_axes + piece_axes)
    num_patches = 1
    for count in counts:
        num_patches *= count
    return moved.reshape(tuple(batch) + (num_patches,) + tuple(s // c for s, c in zip(event, counts)))


def _merge_axes(patches: Any, event_ndim: int, counts: Sequence[int], name: str) -> Any:
    """Exact inverse of :func:`_split_axes`."""
    _check_array(patches, name)
    shape = tuple(patches.shape)
    if len(shape) < event_ndim + 1:
        raise ValueError(
            f"{name} must have at least {event_ndim + 1} dimensions, got shape {shape}"
        )
    num_patches = 1
    for count in counts:
        num_patches *= count
    nb = len(shape) - event_ndim - 1
    if shape[nb] < 1:  # (a count read from the shape: split_* never makes zero patches)
        raise ValueError(f"{name} of shape {shape} holds no patches along axis {nb}: nothing to merge")
    if shape[nb] != num_patches:
        raise ValueError(
            f"{name} of shape {shape} must hold {num_patches} patches along axis {nb}, "
            f"got {shape[nb]}"
        )
    batch, piece = shape[:nb], shape[nb + 1:]
    unflat = patches.reshape(tuple(batch) + tuple(counts) + tuple(piece))
    order = list(range(nb))
    for k in range(event_ndim):
        order += [nb + k, nb + event_ndim + k]
    merged = _transpose(unflat, order)
    return merged.reshape(tuple(batch) + tuple(c * p for c, p in zip(counts, piece)))


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _as_pair(grid: GridSpec, name: str) -> Tuple[int, int]:
    if isinstance(grid, bool):
        raise TypeError(f"{name} must be an int or a pair (rows, cols), got bool {grid!r}")
    if _is_integer(grid):
        count = as_count(grid, name, minimum=1)
        return count, count
    if isinstance(grid, (str, bytes)) or not hasattr(grid, "__len__"):
        raise TypeError(f"{name} must be an int or a pair (rows, cols), got {type(grid).__name__} {grid!r}")
    if len(grid) != 2:
        raise ValueError(f"{name} must be an int or a pair (rows, cols), got {grid!r}")
    return as_count(grid[0], f"{name}[0]", minimum=1), as_count(grid[1], f"{name}[1]", minimum=1)


def _as_strips(grid: GridSpec, kind: str, what: str) -> int:
    """The number of strips or pieces for a one-axis ``kind``; ``grid`` must be one integer."""
    if not _is_integer(grid):
        raise TypeError(f"grid must be the number of {what} (an int) for kind={kind!r}, got {grid!r}")
    return as_count(grid, "grid", minimum=1)


def image_grid(kind: str, grid: GridSpec) -> Tuple[int, int]:
    """The (rows, cols) grid that ``kind`` and ``grid`` describe for an image.

    ``grid``: the pair (rows, cols) or one int for a square grid (``"grid"``);
    the number of strips (``"vertical"``, ``"horizontal"``). Any integer type
    (``numpy.int64`` included) is accepted; a float or bool raises ``TypeError``.
    """
    if kind not in IMAGE_KINDS:
        raise ValueError(f"kind must be one of {IMAGE_KINDS}, got {kind!r}")
    if kind == "grid":
        return _as_pair(grid, "grid")
    strips = _as_strips(grid, kind, "strips")
    return (1, strips) if kind == "vertical" else (strips, 1)


def split_image(images: Any, kind: str, grid: GridSpec) -> Any:
    """Split images into a grid of patches, vertical strips or horizontal strips.

    Parameters
    ----------
    images : Tensor or ndarray, shape (..., C, H, W), any dtype
    kind : {"grid", "vertical", "horizontal"}
        ``"vertical"`` strips are full height (they split the width W),
        ``"horizontal"`` strips are full width (they split the height H).
    grid : int or (int, int)
        ``(rows, cols)`` (or one int for a square grid) for ``"grid"``, the number
        of strips otherwise. Must divide H and W.

    Returns
    -------
    Tensor or ndarray, shape (..., rows * cols, C, H / rows, W / cols)
        Same type, dtype and device as ``images``; row-major patch order.
    """
    rows, cols = image_grid(kind, grid)
    return _split_axes(images, 3, (1, rows, cols), "images")


def merge_image(patches: Any, kind: str, grid: GridSpec) -> Any:
    """Exact inverse of :func:`split_image` with the same ``kind`` and ``grid``.

    Parameters
    ----------
    patches : Tensor or ndarray, shape (..., rows * cols, C, h, w)

    Returns
    -------
    Tensor or ndarray, shape (..., C, rows * h, cols * w)
    """
    rows, cols = image_grid(kind, grid)
    return _merge_axes(patches, 3, (1, rows, cols), "patches")


def spectrogram_grid(kind: str, grid: GridSpec) -> Tuple[int, int]:
    """The (frequency bands, time segments) grid for a spectrogram split.

    ``grid``: the number of pieces for ``"time"`` or ``"frequency"``; the pair
    (bands, segments), or one int for both, for ``"both"``. Any integer type is
    accepted; a float or bool raises ``TypeError``.
    """
    if kind not in SPECTROGRAM_KINDS:
        raise ValueError(f"kind must be one of {SPECTROGRAM_KINDS}, got {kind!r}")
    if kind == "both":
        return _as_pair(grid, "grid")
    pieces = _as_strips(grid, kind, "pieces")
    return (1, pieces) if kind == "time" else (pieces, 1)


def split_spectrogram(spectrograms: Any, kind: str, grid: GridSpec) -> Any:
    """Split spectrograms along time, along frequency, or into time-frequency tiles.

    Parameters
    ----------
    spectrograms : Tensor or ndarray, shape (..., F, T), any dtype
        Frequency on the second-to-last axis, time on the last.
    kind : {"time", "frequency", "both"}
    grid : int or (int, int)
        Number of pieces, or (frequency bands, time segments) for ``"both"``.

    Returns
    -------
    Tensor or ndarray, shape (..., bands * segments, F / bands, T / segments)
        Row-major order: for ``"both"`` the tile of band ``i``, segment ``j`` is
        patch ``i * segments + j``.
    """
    bands, segments = spectrogram_grid(kind, grid)
    return _split_axes(spectrograms, 2, (bands, segments), "spectrograms")


def merge_spectrogram(patches: Any, kind: str, grid: GridSpec) -> Any:
    """Exact inverse of :func:`split_spectrogram`.

    Parameters
    ----------
    patches : Tensor or ndarray, shape (..., bands * segments, f, t)

    Returns
    -------
    Tensor or ndarray, shape (..., bands * f, segments * t)
    """
    bands, segments = spectrogram_grid(kind, grid)
    return _merge_axes(patches, 2, (bands, segments), "patches")


def split_video(videos: Any, num_clips: int | None = None) -> Any:
    """Split videos along time into clips of consecutive frames.

    Parameters
    ----------
    videos : Tensor or ndarray, shape (..., T, C, H, W), any dtype
    num_clips : int, optional
        Must divide T. Default T: one frame per patch.

    Returns
    -------
    Tensor or ndarray, shape (..., num_clips, T / num_clips, C, H, W)
    """
    _check_array(videos, "videos")
    frames = int(videos.shape[-4]) if len(videos.shape) >= 4 else 0
    clips = frames if num_clips is None else as_count(num_clips, "num_clips", minimum=1)
    return _split_axes(videos, 4, (clips, 1, 1, 1), "videos")


def merge_video(patches: Any, num_clips: int | None = None) -> Any:
    """Exact inverse of :func:`split_video`.

    Parameters
    ----------
    patches : Tensor or ndarray, shape (..., num_clips, t, C, H, W)

    Returns
    -------
    Tensor or ndarray, shape (..., num_clips * t, C, H, W)
    """
    _check_array(patches, "patches")
    if num_clips is not None:
        clips = as_count(num_clips, "num_clips", minimum=1)
    else:
        clips = int(patches.shape[-5]) if len(patches.shape) >= 5 else 0  # 0: _merge_axes reports the shape
    return _merge_axes(patches, 4, (clips, 1, 1, 1), "patches")


def split_signal(signals: Any, num_segments: int) -> Any:
    """Split 1-D signals into equal consecutive segments.

    Parameters
    ----------
    signals : Tensor or ndarray, shape (..., L), any dtype
    num_segments : int
        Must divide L.

    Returns
    -------
    Tensor or ndarray, shape (..., num_segments, L / num_segments)
    """
    return _split_axes(signals, 1, (as_count(num_segments, "num_segments", minimum=1),), "signals")


def merge_signal(patches: Any, num_segments: int | None = None) -> Any:
    """Exact inverse of :func:`split_signal`.

    Parameters
    ----------
    patches : Tensor or ndarray, shape (..., num_segments, l)

    Returns
    -------
    Tensor or ndarray, shape (..., num_segments * l)
    """
    _check_array(patches, "patches")
    if num_segments is not None:
        segments = as_count(num_segments, "num_segments", minimum=1)
    else:
        segments = int(patches.shape[-2]) if len(patches.shape) >= 2 else 0  # 0: _merge_axes reports the shape
    return _merge_axes(patches, 1, (segments,), "patches")
