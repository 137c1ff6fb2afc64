"""The ``"large_ep"`` section of a JSON config: parsing (``config.py``) and its placement files (``placement.py``).
Imports no framework: a config can be checked anywhere."""
