"""A frozen dataclass that travels between the ensemble's steps as one row of a tensor: its fields, in order."""

from __future__ import annotations

import dataclasses

import numpy as np


class TensorRow:
    """Mixin for a frozen dataclass of int and float fields. The row layout is the field order, so a tensor's
    length (`row_length`) and the config.pbtxt dims derive from the class and cannot drift from it."""

    ROW_DTYPE = np.float64

    def to_vector(self) -> np.ndarray:
        """[row_length] of ROW_DTYPE, in field order."""
        return np.array(dataclasses.astuple(self), dtype=self.ROW_DTYPE)

    @classmethod
    def from_vector(cls, v: np.ndarray):
        """Inverse of `to_vector`. Raises ValueError on a vector of the wrong length."""
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        fields = dataclasses.fields(cls)
        if v.size != len(fields):
            raise ValueError(f"{cls.__name__.lower()} vector has {v.size} values, expected {len(fields)}")
        return cls(*(int(x) if f.type == "int" else float(x) for f, x in zip(fields, v)))

    @classmethod
    def row_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
