"""lightq: quantized inference of Wan2.1 video-diffusion pipelines, driven by Hydra configs.

Map of the package (each module states its own contract in its docstring):

- ``lightq.quant.schemes``   the numerics: how weights and activations become fp8 / int8 / int4 and back
- ``lightq.quant.linear``    ``QLinear`` and the skip-pattern driven module swap
- ``lightq.backends``        the backend contract (``spec``), the entry-point registry, the built-in torch backend
- ``lightq.hardware``        device profiles (cpu, sm80, sm89, sm90, sm100) and detection
- ``lightq.plan``            mode -> backend resolution, torch-free, with a reason for every rejection
- ``lightq.config``          the typed (structured) config every run composes into
- ``lightq.app``             ``python -m lightq``: compose, plan, build the pipeline graph, run, write result.json
"""

__version__ = "0.1.0"
