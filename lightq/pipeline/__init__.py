"""The Wan2.1 generation pipeline: text / image encoding, the DiT denoising loop (``sampler``), VAE decoding.

Importing this package imports nothing heavy; each stage lives in its own module.
"""
