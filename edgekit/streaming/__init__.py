"""Streaming forms: parallel sequence models -> step graphs with explicit, named state.

``protocol``: how layers declare their step form; ``convert``: the step module and state
specs; ``export``: the checked step ONNX (``edgekit export MODEL --streaming``);
``equivalence``: stepping vs the parallel model (and spike flips for spiking models).
The stateful runtime is ``edgekit.runtime.StreamSession`` (numpy + TVM only).
"""
