"""Console tools that are not training: bag-to-bag inference and the demo."""
