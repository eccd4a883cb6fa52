"""The Wan2.1 pipeline's models, in the official architectures and checkpoint key layouts."""
