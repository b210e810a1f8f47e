"""Encrypted inference: the HE checker (``check``), the CKKS runners (``ckks`` per element,
``packed`` token-packed, sharing ``graph_walk``), encrypted runs checked against onnxruntime
(``run``) and the real-model accuracy workload (``minilm``, ``text``). The graph rewrites that
make a model HE-friendly are passes: ``edgekit/passes/poly_*.py`` and ``power_softmax.py``."""
