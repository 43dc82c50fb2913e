"""The FPN 3×3 convolution's backward on this CPU: ``convolution_backward`` (channels-last, as
``nn.Conv2d`` runs it) against ``SameConv2d``'s own weight gradient (k² ``torch.mm`` products
of row ranges of the padded input; its input gradient is ``convolution_backward``'s).

    python benchmarks/conv_weight_grad.py --threads 2                  # B0 T=2 256×256: 64×64 maps
    python benchmarks/conv_weight_grad.py --threads 2 --batch 2 --side 120   # the 480×480 crop

Times the backward (input and weight gradients, as in a training step) both ways, taking turns,
and prints the median ms and the largest difference of each weight gradient from float64.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from themask.modeling import linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="maps: clips × frames")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--side", type=int, default=64, help="map height and width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.batch, args.channels, args.side, args.side)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    results = {}
    for name, patched in (("convolution_backward", True), ("row_products", False)):
        linear.WEIGHT_GRAD_ON_ONEDNN = patched  # True: SameConv2d is plain nn.Conv2d
        conv = linear.SameConv2d(args.channels, args.channels, 3)
        results[name] = (conv, conv(x))
    x64 = x.detach().double()
    times: dict[str, list[float]] = {name: [] for name in results}
    for _ in range(args.runs + 1):  # the first round warms up
        for name, (conv, out) in results.items():
            start = time.perf_counter()
            torch.autograd.grad(out, [x, conv.weight], grad, retain_graph=True)
            times[name].append(1000 * (time.perf_counter() - start))
    for name, (conv, out) in results.items():
        (got,) = torch.autograd.grad(out, [conv.weight], grad, retain_graph=True)
        w64 = conv.weight.detach().double().requires_grad_()
        (want,) = torch.autograd.grad(F.conv2d(x64, w64, padding=1), w64, grad.double())
        error = float((got.double() - want).abs().max())
        ms = round(statistics.median(times[name][1:]), 1)
        print(
            json.dumps(
                {
                    "path": name,
                    "shape": shape,
                    "threads": args.threads,
                    "backward_ms": ms,
                    "max_abs_error_weight_grad": error,
                    "max_abs_weight_grad": float(want.abs().max()),
                }
            )
        )


if __name__ == "__main__":
    main()
