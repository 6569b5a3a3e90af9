"""Benchmarks of the portal against Orthanc directly (issue 8): ``./pacs bench``.

``run`` is the command line; ``stack`` starts the portal on a data directory of its own;
``data`` makes the material with pydicom; ``measure`` times interleaved runs of both ways;
``clients`` holds what the simulated clients do and how answers become digests; ``scenarios``
holds the six scenarios; ``report`` prints the table and writes the JSON and the plot.
Not a test: timings never fail anything. tests/test_bench_smoke.py runs it on tiny data so that
it keeps working.
"""
