"""Where inference's full-size scores land in glibc's heap, call after call (Linux, glibc ≥ 2.33).

    python benchmarks/heap_layout.py --preset themask_mit_b1_t2 --size 480x864 --frames 2 --calls 4

The peak RSS of CPU inference is about the heap's extent plus what lies outside it, and the
(B, T, K, H, W) output is usually the last large block: it starts above the highest block still
in use, so that block's address sets the peak (benchmarks/README.md, eighth session). For each
call this prints, in MiB from the heap's start: the heap's size just before the upsampling, where
the upsampling's input and output begin, the bytes in use then, and the process's peak RSS
after the call; one JSON line per call. Run it in several fresh processes: the layout differs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource

import torch
import torch.nn.functional as F

import themask.modeling.themask as themask_module
from themask.modeling.build import build_model
from themask.precision import keep_freed_memory

MIB = 2**20


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``: ``arena`` the main heap's size, ``uordblks`` bytes in use."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks".split()
        + ["keepcost"]
    ]


def libc_with_mallinfo2() -> ctypes.CDLL:
    """glibc with ``mallinfo2()`` returning ``MallInfo2`` and ``sbrk(0)`` the heap's top."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.sbrk.restype = ctypes.c_void_p
    return libc


class _Functional:
    """``torch.nn.functional`` with some functions replaced."""

    def __init__(self, **replaced) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str):
        return getattr(F, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="themask_mit_b1_t2")
    parser.add_argument("--size", default="480x864", help="HxW")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    libc = libc_with_mallinfo2()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keep_freed_memory()  # as the CLI
    model = build_model(args.preset).eval().requires_grad_(False)
    height, width = (int(side) for side in args.size.split("x"))
    clip = torch.randn(1, args.frames, 3, height, width)
    seen: list[dict[str, float]] = []
    interpolate = F.interpolate

    def spy(x: torch.Tensor, *rest, **kwargs) -> torch.Tensor:
        info, top = libc.mallinfo2(), libc.sbrk(0)
        start = top - info.arena  # the main arena is one contiguous heap under the break
        out = interpolate(x, *rest, **kwargs)
        seen.append(
            {
                "heap_mib": round(info.arena / MIB, 1),
                "in_use_mib": round(info.uordblks / MIB, 1),
                "input_at_mib": round((x.data_ptr() - start) / MIB, 1),
                "output_at_mib": round((out.data_ptr() - start) / MIB, 1),
                "output_mib": round(out.numel() * out.element_size() / MIB, 1),
            }
        )
        return out

    themask_module.F = _Functional(interpolate=spy)  # type: ignore[assignment]
    try:
        for call in range(args.calls):
            with torch.inference_mode():
                model(clip)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB
            print(json.dumps({"call": call, **seen[-1], "peak_rss_mib": round(peak, 1)}))
    finally:
        themask_module.F = F


if __name__ == "__main__":
    main()
