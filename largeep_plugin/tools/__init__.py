"""What serves the command line, the demo and the benchmarks rather than the layer: the local launcher, the
progress bar, charts, the layer and placement benchmarks, load recording. Never imported by ``layer/`` or
``placement/``; imports no framework (stand-ins that need one live in ``integrations/``)."""
