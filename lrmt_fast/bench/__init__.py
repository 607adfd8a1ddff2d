"""Benchmarks of the meta-update op and of meta-training end to end (``lrmt bench``; the
pytest-benchmark suite in ``benchmarks/`` runs the same cases). Results are written under
``--out`` (default ``runs/bench``), never into the package or the repository's records."""
