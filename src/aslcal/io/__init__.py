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
gzip_backend, gzip_backends
    Which gzip implementation ``.nii.gz`` uses to read and to write: by default ISA-L
    to read (when installed) and zlib to write (deterministic bytes); the environment
    variable ASLCAL_GZIP=zlib or =isal forces one for both.
BidsFieldError
    The :class:`~aslcal.errors.InputError` of :mod:`aslcal.io.bids` for one wrong BIDS
    file, with the file and field as attributes (``.file``, ``.field``).
read_asl_to_structural, asl_to_structural_world, read_flirt_matrix, read_itk_affine, is_itk_transform, ...
    Transforms: FSL FLIRT matrices and ITK/ANTs affine files (text, or ITK's binary
    MATLAB format), as world (RAS mm) point mappings (see :mod:`aslcal.io.transforms`
    for the direction conventions).
"""

from __future__ import annotations

from . import bids
from .atomic import OutputSet, atomic_output, write_json, write_scalar, write_text
from .bids import BidsFieldError
from .derivatives import DerivativesWriter, entities_from_key, subject_key, write_summary_tsv
from .nifti import Image, gzip_backend, gzip_backends, load_image, save_image
from .tissuemaps import find_tissue_maps, load_tissue_map
from .transforms import (
    asl_to_structural_world,
    flirt_scaling,
    flirt_to_world,
    is_itk_transform,
    read_asl_to_structural,
    read_flirt_matrix,
    read_itk_affine,
    world_to_flirt,
)

__all__ = [
    "BidsFieldError",
    "DerivativesWriter",
    "Image",
    "OutputSet",
    "asl_to_structural_world",
    "atomic_output",
    "bids",
    "entities_from_key",
    "flirt_scaling",
    "flirt_to_world",
    "find_tissue_maps",
    "gzip_backend",
    "gzip_backends",
    "is_itk_transform",
    "load_image",
    "load_tissue_map",
    "read_asl_to_structural",
    "read_flirt_matrix",
    "read_itk_affine",
    "save_image",
    "subject_key",
    "world_to_flirt",
    "write_json",
    "write_scalar",
    "write_summary_tsv",
    "write_text",
]
