"""flowbus benchmarks: ``python -m bench`` (``make bench``).

One run on one machine, against a private server it starts: a plain redis-py consumer as the
baseline, flowbus throughput, publish-to-handler latency, and takeover after ``kill -9``. The
results are printed as a table and written to ``bench/results.json``. Not part of the tests.
"""
