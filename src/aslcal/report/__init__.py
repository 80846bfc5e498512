"""Reports of a calibration run: QC figures (PNG).

Importing this package never imports matplotlib (an optional dependency:
``pip install 'aslcal[report]'``); :func:`qc_figure` imports it when it draws, and
raises :class:`ReportUnavailableError` (an :class:`~aslcal.errors.AslcalError` and an
:class:`ImportError`) with an install hint when it is missing.

Public API
----------
qc_figure
    PNG of the reference and brain masks outlined on axial slices of the calibration
    image, with voxel counts; written atomically.
ReportUnavailableError
    Raised when an optional package a report needs is not installed.
"""

from __future__ import annotations

from .qc import BRAIN_COLOUR, REF_COLOUR, ReportUnavailableError, qc_figure

__all__ = ["BRAIN_COLOUR", "REF_COLOUR", "ReportUnavailableError", "qc_figure"]
