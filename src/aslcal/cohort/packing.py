"""Pack the fit jobs of many subjects into one launch per design.

One subject's brain (30k-300k voxels) underfills a GPU and pays a kernel launch and
the compile/dispatch overhead per call; a batch of subjects acquired with the same
protocol shares one design, so their masked voxels are concatenated into one
``(n_vox, n_obs)`` block and fitted in one :func:`aslcal.fit_satrecov` call.  Jobs with
different designs or priors (:attr:`FitJob.group`) get one launch per group.  Voxel
fits are independent, so a voxel's result does not depend on what it was packed with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backend import to_device
from .subject import CohortOptions, FitJob

__all__ = ["fit_packed"]


def fit_packed(jobs: Sequence[FitJob], options: CohortOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fit every job; one :func:`~aslcal.fit_satrecov` launch per group of equal designs.

    Parameters
    ----------
    jobs : sequence of FitJob
    options : CohortOptions
        ``backend``, ``dtype``, ``fix_a``, ``model``.

    Returns
    -------
    results : list of dict
        One per job, in order: 1-D ``m0t``, ``m0t_se``, ``t1t``, ``a``, ``g``, ``rss``,
        ``status`` over the job's voxels (on the fit's device) and ``backend``, ``dtype``,
        ``n_fitted``, ``status_counts`` and ``design`` (the
        :class:`~aslcal.fitting.FitDesign`).
    launches : list of dict
        One per launch: ``n_jobs``, ``n_vox``, ``n_obs``, ``backend``, ``seconds``.
    """
    from ..fitting import fabber_priors, fit_satrecov
    from ..fitting.satrecov import status_counts

    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.group, []).append(i)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    launches = []
    for (tis, fa, lfa, dt, prior_t1, nphases), members in groups.items():
        blocks = [jobs[i].series for i in members]
        data = np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
        # 2-D multi-slice readouts: every voxel's slice delay (3-D readouts: 0).
        shift = None
        if any(jobs[i].ti_shift is not None for i in members):
            shift = np.concatenate([jobs[i].ti_shift if jobs[i].ti_shift is not None
                                    else np.zeros(jobs[i].n_vox) for i in members])
        if options.backend == "cuda":
            data = to_device(data, "gpu")
        fit = fit_satrecov(
            data, list(tis), fa=fa, lfa=lfa, dt=dt, nphases=nphases, ti_shift=shift, fix_a=options.fix_a,
            model=options.model,
            priors=fabber_priors(prior_t1) if prior_t1 is not None else None,
            backend=options.backend, dtype=options.dtype,
        )
        launches.append({"n_jobs": len(members), "n_vox": int(data.shape[0]), "n_obs": int(data.shape[1]),
                         "backend": fit.backend, "dtype": fit.dtype, "timings_s": dict(fit.timings)})
        start = 0
        for i in members:
            stop = start + jobs[i].n_vox
            part = {name: getattr(fit, name)[start:stop] for name in ("m0t", "m0t_se", "t1t", "a", "g", "rss", "status")}
            part.update(backend=fit.backend, dtype=fit.dtype, n_fitted=stop - start,
                        status_counts=status_counts(part["status"]), design=fit.design)
            results[i] = part
            start = stop
    return [r for r in results if r is not None], launches
