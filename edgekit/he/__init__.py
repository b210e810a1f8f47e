"""Encrypted inference: the HE checker (``check``), the CKKS runner (``ckks``) and the
real-model accuracy workload (``minilm``, ``text``). The graph rewrites that make a model
HE-friendly are passes: ``edgekit/passes/poly_*.py`` and ``power_softmax.py``."""
