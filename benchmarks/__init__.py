"""Scripts that measure carousel's parts side by side with references (``python -m benchmarks.<name>``)."""
