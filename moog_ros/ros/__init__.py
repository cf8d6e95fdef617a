"""rclpy lives only here: pure message conversions, the node, diagnostics."""
import os

# OpenMP threads that spin while waiting for work steal the cores the node's other threads (the
# executor taking camera frames) and every other process need; on a busy 2-core machine that
# made a 2-thread model step 5x slower (p95 30x). libgomp reads this once, when torch loads it,
# so it is set here, before the node's modules import torch (no effect if torch is loaded).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
