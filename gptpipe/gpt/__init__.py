"""G.pt itself (no I/O): the diffusion transformer (``model``), its diffusion process (``diffusion``),
training pairs of checkpoints (``pairs``), the training loop (``trainer``) and multi-process set-up
(``distributed``)."""
