"""Deployment: ONNX export (needs torch) and a torch-free ONNX Runtime video predictor."""
