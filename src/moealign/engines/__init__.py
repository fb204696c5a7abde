"""Drop-ins for the engines where MoE models are trained at scale.

One module per engine (``megatron``, ``torchtitan``): each wraps moealign's MPI router,
routing alignment term and routing statistics in that engine's own types, so a model built
with the engine's classes uses them without a fork. The engine is imported only inside its
module: ``import moealign.engines`` needs neither engine installed.
"""
