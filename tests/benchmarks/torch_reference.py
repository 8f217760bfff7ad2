"""Eager PyTorch timing of the reference PixelDiT at the benchmark's mid config, for the
comparison row of `bench.py` (run with a Python that has torch; torch is never a
dependency of this project).

    python tests/benchmarks/torch_reference.py --reference DIR [--repeats 7]

`DIR` holds the reference's `pixdit_core` package (NVlabs/PixelDiT). Times, like
`bench.py`: median wall time of the forward pass and of forward+backward (the gradient of
an MSE loss in the parameters, `loss.backward()`, gradients set to None between calls)
of the class-to-image model, float32, batch 8, at 64x64 and 128x128, after warm-up; and,
in a fresh process, the peak resident set of building the model and running 10
forward+backward steps at 64x64. Prints one JSON object.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mid import BATCH, MID  # noqa: E402


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _setup(reference: str, hw: int):
    import torch

    sys.path.insert(0, reference)
    from pixdit_core.pixeldit_c2i import PixDiT

    torch.manual_seed(0)
    model = PixDiT(**MID)
    # The reference zero-initialises its final layer and modulations; random values do
    # not change the work, but keep every gradient non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    x = torch.randn(BATCH, MID["in_channels"], hw, hw)
    t = torch.linspace(0.1, 0.9, BATCH)
    y = torch.arange(BATCH) % MID["num_classes"]
    return torch, model, (x, t, y)


def _forward_backward(torch, model, args):
    x = args[0]
    loss = torch.mean((model(*args) - x) ** 2)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss


def memory(reference: str, steps: int = 10) -> float:
    torch, model, args = _setup(reference, 64)
    for _ in range(steps):
        _forward_backward(torch, model, args)
    return _peak_rss_mib()


def speed(reference: str, hw: int, repeats: int) -> dict:
    torch, model, args = _setup(reference, hw)
    out = {}

    def forward():
        with torch.no_grad():
            model(*args)

    for name, fn in (("forward", forward), ("forward_backward", lambda: _forward_backward(torch, model, args))):
        fn()
        fn()  # warm-up: the reference builds its position tables on first use
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = {"median_s": statistics.median(times), "times_s": times}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="directory holding the reference's pixdit_core")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps({"peak_rss_mib": memory(args.reference)}))
        return
    import torch

    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "speed": {hw: speed(args.reference, hw, args.repeats) for hw in (64, 128)},
    }
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--reference", args.reference, "--memory"],
        capture_output=True,
        text=True,
        check=True,
    )
    result["peak_rss_mib"] = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
