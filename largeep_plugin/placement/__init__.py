"""Expert placement: pure planning on CPU tensors, no ``torch.distributed``, nothing from ``layer/``.

    topology.py   nodes, GPUs, links, memory (from YAML or the environment)
    plan.py       ``Placement`` and ``plan_placement``; the naive, Megatron-style and EPLB-style baselines
    search.py     replica counts, seeding and local search over layouts
    figures.py    the traffic model: link loads and GPU loads of a layout
    files.py      reading JSON and YAML input files; a syntax error names the file and the line
"""
