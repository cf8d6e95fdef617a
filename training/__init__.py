"""Offline training, data generation, conversion and evaluation (no rclpy)."""
