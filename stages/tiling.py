"""Tile grids and feathered blending, shared by the upscaler and the refiner."""

import torch


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` shared pixels."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    offsets = list(range(0, length - tile, stride))
    offsets.append(length - tile)  # the last tile ends exactly at the border
    return offsets


def boxes(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) boxes of an overlapping grid over a width x height image, row by row."""
    return [
        (x, y, min(tile, width), min(tile, height))
        for y in starts(height, tile, overlap)
        for x in starts(width, tile, overlap)
    ]


def _ramp(length: int, lo: int, hi: int, from_zero: bool) -> torch.Tensor:
    """1 in the middle, rising over `lo` pixels at the start and falling over `hi` at the end."""

    def rise(n: int) -> torch.Tensor:
        # from_zero: the edge pixel gets weight 0, so a blend into the original is continuous there;
        # otherwise weights stay positive, so normalising an accumulation never divides by zero.
        r = torch.arange(n, dtype=torch.float32)
        return r / n if from_zero else (r + 1) / (n + 1)

    w = torch.ones(length)
    if lo:
        w[:lo] = rise(lo)
    if hi:
        w[length - hi :] = torch.minimum(w[length - hi :], rise(hi).flip(0))
    return w


def feather(w: int, h: int, left: int, top: int, right: int, bottom: int, from_zero: bool = False) -> torch.Tensor:
    """[1, 1, h, w] weights with linear ramps of the given widths on each side (0 = no ramp)."""
    return (_ramp(h, top, bottom, from_zero)[:, None] * _ramp(w, left, right, from_zero)[None, :])[None, None]


def ramps(box: tuple[int, int, int, int], width: int, height: int, ramp: int) -> tuple[int, int, int, int]:
    """Ramp widths (left, top, right, bottom) for a box: `ramp` on sides inside the image, 0 at its borders."""
    x, y, w, h = box
    r = min(ramp, w // 2, h // 2)
    return (r if x > 0 else 0, r if y > 0 else 0, r if x + w < width else 0, r if y + h < height else 0)
