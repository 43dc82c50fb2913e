"""fp32 matrix products on this CPU: the BLAS behind ``torch.addmm`` / ``F.linear`` against oneDNN's
inner product (``torch.ops.mkldnn._linear_pointwise``, what ``themask.modeling.linear`` uses),
same matrices, same threads; and each one's largest error against a float64 product.

    python benchmarks/gemm_backends.py --threads 2

If oneDNN is not faster on your CPU, ``THEMASK_ONEDNN=0`` keeps the layers on ``F.linear``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [  # (M, K, N): square, then the network's layers (one 480×864 frame)
    (2048, 2048, 2048),
    (8505, 256, 1024),  # pixel-decoder FFN in
    (8505, 1024, 256),  # pixel-decoder FFN out
    (8505, 256, 256),  # deformable attention projections
    (25920, 64, 256),  # MiT-B1 stage 1 Mix-FFN
    (200, 256, 2048),  # transformer decoder FFN
]


def blas(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.addmm(bias, x, weight.t())


def onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def best_seconds(product, args: tuple, runs: int) -> float:
    product(*args)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        product(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads")
    for m, k, n in SHAPES:
        operands = (torch.randn(m, k), torch.randn(n, k), torch.randn(n))
        exact = blas(*(t.double() for t in operands))
        row: dict = {"m": m, "k": k, "n": n}
        for name, product in (("blas", blas), ("onednn", onednn)):
            seconds = best_seconds(product, operands, args.runs)
            row[f"{name}_gflops"] = round(2 * m * k * n / seconds / 1e9, 1)
            row[f"{name}_max_error"] = float((product(*operands).double() - exact).abs().max())
        print(json.dumps(row))


if __name__ == "__main__":
    main()
