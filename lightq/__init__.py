"""lightq: quantized inference of Wan2.1 and Wan2.2 video-diffusion pipelines, driven by Hydra configs.

Map of the package: docs/ARCHITECTURE.md (the floors, the flow of one job, where to add a backend, a scheme, an
attention mode or a model family). Each module states its own contract in its docstring.
"""

__version__ = "0.1.0"
