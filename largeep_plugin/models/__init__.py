"""Small models used by the demo, the benchmarks and the integration tests (see ``tiny_moe.py``)."""
