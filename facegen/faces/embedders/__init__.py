"""Face embedder kinds, one module each (``faces.embedder.kind``; the table is
:data:`facegen.config.faces.EMBEDDERS`).

A kind's module has ``build(settings) -> Embedder`` (:class:`facegen.faces.embed.Embedder`) and may
have ``check(settings)`` (the kind's own settings rules, run when a config loads),
``weights_file(settings)`` (what a run records; default ``settings.path``), ``PACKAGED_WEIGHTS``
(the kind works without a ``path``) and ``differentiable_model(settings, device)`` (a torch module
from 112 crops in [-1, 1] to embeddings: identity forces and the CemiFace loss may use the kind).
Top-level imports stay light (torch, onnxruntime and dlib inside functions): a config naming the
kind imports its module to check it.
"""
