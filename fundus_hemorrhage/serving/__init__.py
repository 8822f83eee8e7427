"""Helpers of serve.py that run beside Triton."""
