"""The only code that imports a framework, one subpackage each:

    section/    the ``"large_ep"`` JSON section (read strictly) and its placement files; imports no framework,
                shared by the DeepSpeed adapter and the Megatron-LM route
    deepspeed/  ``initialize`` (DeepSpeed's engine with large-EP layers), the stock-MoE stand-in of the benchmarks
    megatron/   ``LargeEPMoELayer`` and its router, dispatcher, specs, checkpoint layout, balancing and the
                Megatron-LM route; CPU stand-ins for Megatron's DDP and fused attention
    hf/         Hugging Face Transformers MoE blocks: ``convert_model``, ``from_pretrained``, ``save_pretrained``
    torchtitan/ torchtitan's MoE layers through its ``--override.imports`` mechanism (``override.large_ep``)
"""
