"""Encrypted inference: the HE checker (``check``), the CKKS runners (``ckks`` per element,
``packed`` token-packed, sharing ``graph_walk``), encrypted runs checked against onnxruntime
(``run``), the client/server cut that moves a standard export's embedding lookup to the client
(``cut``) and the real-model accuracy workload (``minilm``, ``text``). The graph rewrites that
make a model HE-friendly are passes: ``edgekit/passes/poly_*.py`` and ``power_softmax.py``."""
