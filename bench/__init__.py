"""matspool benchmarks: ``python -m bench [--quick]`` (see bench/README.md).

Nothing is imported here: producer processes started with ``spawn`` import this package.
"""
