"""Video data: descriptions, readers, clips, transforms, loaders, the toy dataset, checks. Import
from the modules; ``vspw``, ``clips``, ``video_io``, ``resize`` are torch-free (ONNX runtime)."""
