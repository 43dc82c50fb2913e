"""Deployment: ONNX export (``export``, needs torch) and a torch-free ONNX Runtime video
predictor (``runtime``, needs only onnxruntime, numpy, av and pillow). ``manifest`` is the
JSON contract between the two."""
