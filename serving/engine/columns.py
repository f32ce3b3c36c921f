"""Named columns of the small matrices that carry a step's per-row data from the host to the device.

Each host-to-device transfer costs host time on the dispatch path, so a step's per-row fields travel
packed in a few matrices (one i32 matrix of row fields, one i32 and one f32 matrix of sampling options)
and are unpacked inside the jitted step. `Columns` declares such a matrix's columns once, by name and
width; the host packs by name and the device unpacks by name, so no column is ever read by position.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


class Columns:
    """The layout of a `[rows, width]` matrix: named column ranges, in declaration order.

    A width-1 column unpacks to a `[rows]` vector, a wider one to `[rows, width]`.
    """

    def __init__(self, **widths: int):
        self.widths = dict(widths)
        self.slices: dict[str, slice] = {}
        start = 0
        for name, width in widths.items():
            self.slices[name] = slice(start, start + width)
            start += width
        self.width = start

    def __getitem__(self, name: str) -> slice:
        return self.slices[name]

    def index(self, name: str) -> int:
        """The column of a width-1 field."""
        assert self.widths[name] == 1, name
        return self.slices[name].start

    def empty(self, rows: int, dtype: np.dtype, defaults: Mapping[str, object]) -> np.ndarray:
        """A `[rows, width]` matrix holding each column's default (0 for columns without one)."""
        matrix = np.zeros((rows, self.width), dtype)
        for name, value in defaults.items():
            matrix[:, self.slices[name]] = value
        return matrix

    def write(self, matrix: np.ndarray, row: int, values: Mapping[str, object]) -> None:
        """Set one row's columns from `values` (one value per name, or `width` values)."""
        for name, value in values.items():
            matrix[row, self.slices[name]] = value

    def unpack(self, matrix: jax.Array) -> dict[str, jax.Array]:
        """Every column of a `[rows, >= width]` matrix by name (inside jit)."""
        return {name: matrix[:, s.start] if self.widths[name] == 1 else matrix[:, s]
                for name, s in self.slices.items()}
