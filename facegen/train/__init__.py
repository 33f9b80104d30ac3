"""Face-recognition training: Partial FC margin heads, curriculum data, checkpoints, the loop, export.

Modules: ``heads`` (margins, full softmax), ``partial_fc`` (sharded centres), ``data`` and
``augment`` (batches), ``checkpoint``, ``validation``, ``fit`` (one worker's loop, no Ray),
``loop`` (Ray Train), ``export`` (ONNX, arcface_torch). Nothing is imported here, so that
``facegen.train.partial_fc`` loads with torch alone (GPU benchmarks) and nothing imports Ray.
"""
