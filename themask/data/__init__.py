"""Video data: dataset descriptions, video reader, clips, transforms, loaders, the toy dataset
and data checks. Import from the modules; ``vspw``, ``clips``, ``video_io`` and ``resize`` are
torch-free (the ONNX Runtime predictor uses them without torch)."""
