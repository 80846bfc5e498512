"""``aslcal info``: versions, backends and GPU of this installation."""

from __future__ import annotations

import json
import platform
from importlib import metadata

from .. import __version__

PACKAGES = ("numpy", "numba", "numba-cuda", "cupy", "nibabel", "scipy", "array-api-compat")


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "info", parents=[common], help="show versions, available backends and GPUs",
        description="Show the versions of aslcal and its libraries, which array/kernel backends "
        "can run here (and why not), and the GPU when one is present.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _package_version(name: str) -> str | None:
    for candidate in (name, *(f"{name}-cuda{v}" for v in ("13x", "12x", "11x"))):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def _gpus() -> list[dict]:
    """GPUs seen by CuPy (name, memory, CUDA driver and runtime versions); empty without CuPy or a device."""
    try:
        import cupy
    except Exception:
        return []
    def version(v: int) -> str:  # CUDA's 1000·major + 10·minor
        return f"{v // 1000}.{v % 1000 // 10}"

    out = []
    try:
        rt = cupy.cuda.runtime
        driver, runtime = version(rt.driverGetVersion()), version(rt.runtimeGetVersion())
        for i in range(rt.getDeviceCount()):
            props = rt.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            out.append({"index": i, "name": name, "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                        "compute_capability": f"{props['major']}.{props['minor']}",
                        "cuda_driver": driver, "cuda_runtime": runtime})
    except Exception:  # no driver / no device
        return []
    return out


def report() -> dict:
    """The information shown by ``aslcal info``."""
    from ..backend import available_backends

    return {
        "aslcal": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _package_version(name) for name in PACKAGES},
        "backends": {name: {"available": ok, "reason": why} for name, (ok, why) in available_backends().items()},
        "gpus": _gpus(),
    }


def run(args) -> int:
    rep = report()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"aslcal {rep['aslcal']} (Python {rep['python']}, {rep['platform']})")
    for name, ver in rep["packages"].items():
        print(f"  {name:<17} {ver or 'not installed'}")
    print("backends:")
    for name, b in rep["backends"].items():
        print(f"  {name:<6} {'yes' if b['available'] else 'no ':<3}  {b['reason']}")
    if rep["gpus"]:
        for g in rep["gpus"]:
            print(f"GPU {g['index']}: {g['name']}, {g['memory_gib']} GiB, compute capability {g['compute_capability']}")
    else:
        print("GPU: none found")
    return 0
