"""MooG on a live ROS 2 camera.

Off-the-grid video tokens (arXiv 2411.05927) with depth, point-track and box readouts.
"""
