"""The MoUE model: topology, universal router, shared pool, balance, layers, the GPT builder.

Model math only: no process group is fetched here (the builder receives Megatron's
``pg_collection``), no training state. ``moue.model.builder.build_model`` is the entry point.
"""
