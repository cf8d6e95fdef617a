"""rclpy lives only here: pure message conversions, the node, diagnostics."""
