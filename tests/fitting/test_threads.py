"""Fits launched from several threads at once.

numba's ``workqueue`` threading layer (its fallback where neither TBB nor OpenMP can be
loaded) aborts the whole process when two threads launch a parallel kernel at once; a
Dask worker with several threads, or a user's own thread pool, does exactly that.  The
check runs in a child process forced onto that layer (an abort would take the test
runner with it), with three threads fitting at once; the truth is the saturation-recovery
signal written here, and each thread's fit must equal a fit made alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import threading
    import numpy as np
    import numba
    from aslcal import fit_satrecov

    tis = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    rng = np.random.default_rng(0)
    t1 = rng.uniform(0.8, 4.0, 20000)
    data = (1000.0 * (1.0 - np.exp(-tis / t1[:, None]))).reshape(20, 1000, 1, 5)
    alone = fit_satrecov(data, tis, backend="numba")
    assert numba.threading_layer() == "workqueue", numba.threading_layer()
    assert np.allclose(alone.t1t.ravel(), t1, rtol=1e-6)
    results, errors = [], []

    def fit():
        try:
            for _ in range(4):
                results.append(fit_satrecov(data, tis, backend="numba").t1t)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=fit) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 12 and all(np.array_equal(r, alone.t1t) for r in results)
    print("ok")
""")


def test_fits_from_three_threads_at_once_on_the_workqueue_layer():
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stdout, done.stderr[-2000:])
