"""File input and output: NIfTI images and atomic text/JSON/scalar writers.

Importing this package imports nibabel and NumPy only (never numba or CuPy).

Public API
----------
OutputSet
    Several outputs that appear together on success, or not at all.
atomic_output
    Context manager: write to a temporary file in the destination folder, rename
    over the destination when complete.
write_text, write_json, write_scalar
    Atomic writers for text, JSON (NumPy-aware, NaN -> null) and one-number files.
Image, load_image, save_image
    NIfTI images: a checked, fully read in-memory image, and an atomic writer.
"""

from __future__ import annotations

from .atomic import OutputSet, atomic_output, write_json, write_scalar, write_text
from .nifti import Image, load_image, save_image

__all__ = [
    "Image",
    "OutputSet",
    "atomic_output",
    "load_image",
    "save_image",
    "write_json",
    "write_scalar",
    "write_text",
]
