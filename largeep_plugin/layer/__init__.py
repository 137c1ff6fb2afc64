"""The MoE layer and its parallel wiring: router, dispatch, experts, combine, process groups, gradient reduction.

Imports torch and the standard library only (and ``largeep_plugin.placement``, which says where experts live);
never ``integrations/`` or ``tools/``. ``moe_layer.py`` is the one place that wires the pieces together.
"""
