"""Exceptions and warnings shared by the whole library (no imports: every layer may use them)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, edited, of another version, or for another model.

    A ``ValueError`` subclass, so ``except ValueError`` written for earlier versions still catches it.
    The message names the file and, where one is at fault, the layer and the field.
    """


class NumericalWarning(UserWarning):
    """Quantization lost information it should not have (a layer zeroed, blocks flushed to zero)."""
