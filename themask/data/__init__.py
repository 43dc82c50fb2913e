"""Video data (import from the modules; ``vspw``, ``clips``, ``video_io``, ``resize``: no torch)."""
