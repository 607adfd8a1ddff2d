"""lrmt_fast: Learning to Remember from a Multi-Task Teacher, with fused meta-update kernels."""
__version__ = "0.1.0"
