"""MooG on a live ROS 2 camera: off-the-grid video tokens with depth, point-track and box readouts."""
