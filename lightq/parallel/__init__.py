"""Multi-process generation (``parallel`` config group): sequence parallelism (Ulysses all-to-all over heads, or
every rank's keys and values gathered, or a ring), CFG parallelism (the conditional and unconditional DiT passes
on two halves of the processes), both combined, and the VAE decode split by latent rows. ``layout`` is the
torch-free plan (checked at validation), ``runtime`` the process groups of a ``torchrun`` launch,
``sequence_parallel`` the token split and the attention that spans it, ``guidance`` the split CFG pass, ``rows``
the decode's row split, ``p2p`` the point-to-point transfers both use."""
