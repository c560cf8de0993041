"""Time one MAML meta-gradient (25 sinusoid tasks, 10 shots, 1 inner step): vmapped against a per-task loop.

Both paths call ``gradient_meta.functional.meta_gradient`` in the same run on the same tasks; the loop
path takes ``torch.func.grad`` of one task at a time. Prints medians and the speed-up ratio.
    python scripts/bench_maml.py [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from gradient_meta.functional import meta_gradient
from gradient_meta.meta_sgd import init_step_sizes
from gradient_meta.sinusoid import SineNet, mse_loss_fn, sample_points, sample_tasks


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first calls trace the torch.func transforms
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=25)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = SineNet()
    loss, params = mse_loss_fn(model), dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    amp, phase = sample_tasks(args.tasks, g)
    support, query = sample_points(amp, phase, args.shots, g), sample_points(amp, phase, args.shots, g)
    lrs = init_step_sizes(params, 0.01)

    print(f"{args.tasks} tasks x {args.shots} shots, 1 inner step, 1-40-40-1 net, torch {torch.__version__}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}; median of {args.repeats}")
    for name, kwargs in (("MAML", dict(step_size=0.01)), ("first-order MAML", dict(step_size=0.01, first_order=True)),
                         ("Meta-SGD", dict(step_size=lrs, learn_step_size=True))):
        vec = median_ms(lambda: meta_gradient(loss, loss, params, support, query, vectorise=True, **kwargs), args.repeats)
        loop = median_ms(lambda: meta_gradient(loss, loss, params, support, query, vectorise=False, **kwargs),
                         args.repeats)
        print(f"{name:17s} vmapped {vec:7.2f} ms   per-task loop {loop:7.2f} ms   speed-up {loop / vec:5.1f}x")


if __name__ == "__main__":
    main()
