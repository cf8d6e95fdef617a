#!/usr/bin/env python3
"""Benchmarks ``Moog.step`` latency and FLOPs per preset against this machine's matmul peak.

Prints one table row per (preset, decode) pair: parameters, FLOPs per step (``FlopCounterMode``),
latency p50 / p95 at batch 1 under ``torch.inference_mode()`` after warm-up, and the achieved
FLOP/s as a fraction of a measured fp32 matmul peak. Run when the machine is quiet; ``--repeats``
takes the minimum of several p50 measurements to reduce noise from other processes.

Example:
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_model.py --presets small paper --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moog_ros.model import PRESETS, Moog, get_config


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, size: int, iters: int, dtype: torch.dtype) -> float:
    """Best observed FLOP/s of a square ``size`` x ``size`` matmul."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float('inf')
    for _ in range(iters):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def step_flops(model: Moog, frame: torch.Tensor, coords: torch.Tensor | None) -> int:
    """FLOPs of one step (matmuls, convs, attention) as counted by ``FlopCounterMode``.

    Counted with SDPA's math backend: ``FlopCounterMode`` has no formula for the fused CPU
    attention kernel and would count attention as zero; the math backend runs it as bmm ops.
    """
    state = model.init_state(1, frame.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter, sdpa_kernel(SDPBackend.MATH):
        model.step(frame, state, coords)
    return counter.get_total_flops()


def time_steps(model: Moog, frame: torch.Tensor, coords: torch.Tensor | None, iters: int,
               warmup: int, max_seconds: float) -> list[float]:
    """Per-step (wall, process CPU) times in seconds; the state is carried, as in streaming use.

    Process CPU time is the contention-free figure with one thread: on a shared machine the wall
    time also counts the time other processes held the cores. Stops early (after at least 3 timed
    steps) once ``max_seconds`` of timed steps have passed, so slow presets such as 'paper' on a
    CPU finish in bounded time.
    """
    device = frame.device
    times = []
    with torch.inference_mode():
        state = model.init_state(1, device)
        for i in range(warmup + iters):
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            _, state = model.step(frame, state, coords)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start, time.process_time() - start_cpu))
                if len(times) >= 3 and sum(t for t, _ in times) > max_seconds:
                    break
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--presets', nargs='+', default=['small', 'paper'],
                        choices=sorted(PRESETS), help='model presets to benchmark')
    parser.add_argument('--iters', type=int, default=50, help='timed steps per measurement')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps before timing')
    parser.add_argument('--max-seconds', type=float, default=20.0,
                        help='stop a measurement after this many timed seconds (min 3 steps)')
    parser.add_argument('--repeats', type=int, default=3,
                        help='measurements per row; the one with the lowest p50 is reported')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch.set_num_threads (default: leave torch's choice)")
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda[:i]'")
    parser.add_argument('--decode', nargs='+', default=['none', 'eval'],
                        choices=['none', 'train', 'eval', 'full'],
                        help="RGB decode per step: 'none' (plain step) or a decode mode")
    parser.add_argument('--bf16', action='store_true',
                        help='run under torch.autocast(bfloat16) (mostly useful on CUDA)')
    parser.add_argument('--peak-size', type=int, default=2048,
                        help='matrix size of the fp32 matmul used as the peak reference')
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    peak = matmul_peak_flops(device, args.peak_size, 10, torch.float32)
    rows = []
    for name in args.presets:
        cfg = get_config(name)
        model = Moog(cfg).to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        frame = torch.rand(1, *cfg.image_size, 3, device=device)
        for decode in args.decode:
            coords = None if decode == 'none' else model.decode_coords(1, decode, device=device)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                flops = step_flops(model, frame, coords)
                runs = [time_steps(model, frame, coords, args.iters, args.warmup,
                                   args.max_seconds) for _ in range(args.repeats)]
            best = min(runs, key=lambda run: statistics.median(t for t, _ in run))
            rows.append((name, decode, params, cfg, flops, best))
    # Other processes share the machine: the best of a peak measured before and after is the
    # closer estimate of what an undisturbed matmul reaches.
    peak = max(peak, matmul_peak_flops(device, args.peak_size, 10, torch.float32))

    print(f'device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, '
          f'fp32 matmul peak {peak / 1e9:.1f} GFLOP/s ({args.peak_size}^2)')
    header = (f'{"preset":<11} {"decode":<6} {"params":>8} {"tokens":>8} {"GFLOP":>7} '
              f'{"p50 ms":>8} {"p95 ms":>8} {"cpu ms":>8} {"steps":>5} {"GFLOP/s":>8} '
              f'{"% peak":>7}')
    print(header)
    print('-' * len(header))
    for name, decode, params, cfg, flops, times in rows:
        wall = [t for t, _ in times]
        p50, p95 = statistics.median(wall), percentile(wall, 95)
        cpu_p50 = statistics.median(c for _, c in times)
        achieved = flops / p50
        print(f'{name:<11} {decode:<6} {params / 1e6:>7.2f}M '
              f'{cfg.num_tokens:>4}x{cfg.token_size:<3} {flops / 1e9:>7.3f} '
              f'{p50 * 1e3:>8.2f} {p95 * 1e3:>8.2f} {cpu_p50 * 1e3:>8.2f} {len(times):>5} '
              f'{achieved / 1e9:>8.1f} {100.0 * achieved / peak:>6.1f}%')
    print('p50/p95: wall time per step (best p50 of --repeats); cpu ms: process CPU time p50 '
          '(with 1 thread, the figure an idle machine would show)')


if __name__ == '__main__':
    main()
