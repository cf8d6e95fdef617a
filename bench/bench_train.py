"""Pretraining throughput: optimisation steps/s and samples/s for 1 and N ranks (gloo or nccl).

Runs the real entry point (``python -m moog_ros.training.pretrain``, or ``torchrun`` for several
ranks) for a few steps on synthetic clips written to a temporary folder, and reads the
``samples_per_s`` it logs per step (data loading, forward, backward, all-reduce and optimiser
included; checkpoint writing and start-up excluded; the first ``--warmup`` steps are dropped).

    python bench/bench_train.py                       # small and tiny, 1 and 2 ranks, CPU
    python bench/bench_train.py --presets small --ranks 1 --steps 10 --device cuda

CPU threads are split between ranks (``--threads`` in total, default: all cores).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import socket
import subprocess
import sys
import tempfile

import numpy as np

from moog_ros import clips

REPO = Path(__file__).resolve().parents[1]


def write_clips(directory: Path, count: int, T: int, H: int, W: int) -> None:
    """Random-texture clips with a moving square (content does not change the speed)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        video = rng.integers(0, 255, (T, H, W, 3), dtype=np.uint8)
        for t in range(T):
            video[t, 10 + t:40 + t, 20 + 2 * t:50 + 2 * t] = 200
        clips.save_clip(directory / f'clip_{i:03d}.npz', clips.Clip(
            video=video, depth=np.full((T, H, W), np.nan, np.float32),
            intrinsics=np.array([[100, 0, W / 2], [0, 100, H / 2], [0, 0, 1]], np.float32),
            tracks_xy=np.zeros((0, T, 2), np.float32), tracks_visible=np.zeros((0, T), bool),
            boxes_xyxy=np.zeros((0, T, 4), np.float32), boxes_valid=np.zeros((0, T), bool)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run_case(preset: str, ranks: int, args: argparse.Namespace, clip_dir: Path,
             work: Path) -> dict:
    """One pretraining run; returns its throughput figures."""
    out = work / f'{preset}_{ranks}'
    threads = max(1, args.threads // ranks)
    overrides = [f'model.preset={preset}', f'train.steps={args.steps}',
                 f'train.batch_size={args.batch_size}', f'data.num_frames={args.num_frames}',
                 'data.val_fraction=0', 'data.workers=0', 'train.log_interval=1',
                 f'train.eval_interval={args.steps}', f'train.checkpoint_interval={args.steps}',
                 'train.keep_interval=0', f'train.threads={threads}',
                 f'train.device={args.device}']
    settings = ['--config', str(REPO / 'config' / 'pretrain_small.yaml'), '--data', str(clip_dir),
                '--out', str(out)]
    for override in overrides:
        settings += ['--set', override]
    if ranks == 1:
        command = [sys.executable, '-m', 'moog_ros.training.pretrain', *settings]
    else:
        command = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={ranks}',
                   '--master_addr=127.0.0.1', f'--master_port={free_port()}',
                   '-m', 'moog_ros.training.pretrain', *settings]
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'GLOO_SOCKET_IFNAME': 'lo'}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f'{preset} x {ranks} rank(s) failed:\n{result.stderr[-3000:]}')
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    rates = [r['samples_per_s'] for r in rows if r['kind'] == 'train'][args.warmup:]
    samples_per_s = float(np.median(rates))
    global_batch = args.batch_size * ranks
    return {'preset': preset, 'ranks': ranks, 'threads': threads, 'global_batch': global_batch,
            'steps_per_s': samples_per_s / global_batch, 'samples_per_s': samples_per_s,
            'ms_per_step': 1000 * global_batch / samples_per_s, 'measured_steps': len(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--presets', default='small,tiny', help='comma-separated model presets')
    parser.add_argument('--ranks', default='1,2', help='comma-separated rank counts to run')
    parser.add_argument('--steps', type=int, default=8, help='optimisation steps per run')
    parser.add_argument('--warmup', type=int, default=2, help='first steps not measured')
    parser.add_argument('--batch-size', type=int, default=4, help='windows per step per rank')
    parser.add_argument('--num-frames', type=int, default=8, help='frames per window')
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1,
                        help='CPU threads in total, split evenly between ranks')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'auto'")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error('--steps must exceed --warmup')
    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
        work = Path(tmp)
        clip_dir = work / 'clips'
        clip_dir.mkdir()
        # 160x128 frames: the random crop + resize to 128x128 (or 32x32) is part of the cost.
        write_clips(clip_dir, count=6, T=max(12, args.num_frames), H=128, W=160)
        results = []
        for preset in args.presets.split(','):
            for ranks in (int(r) for r in args.ranks.split(',')):
                print(f'running {preset} x {ranks} rank(s) ...', file=sys.stderr, flush=True)
                results.append(run_case(preset, ranks, args, clip_dir, work))
    print(f'\npretraining throughput ({args.device}, {args.num_frames} frames/window, batch '
          f'{args.batch_size}/rank, median of {args.steps - args.warmup} steps)')
    header = (f'{"preset":<8} {"ranks":>5} {"thr/rank":>8} {"batch":>6} {"steps/s":>8} '
              f'{"samples/s":>10} {"ms/step":>9}')
    print(header)
    print('-' * len(header))
    for r in results:
        print(f'{r["preset"]:<8} {r["ranks"]:>5} {r["threads"]:>8} {r["global_batch"]:>6} '
              f'{r["steps_per_s"]:>8.3f} {r["samples_per_s"]:>10.2f} {r["ms_per_step"]:>9.0f}')


if __name__ == '__main__':
    main()
