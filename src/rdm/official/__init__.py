"""The official CompVis RDM release (Blattmann, Rombach et al. 2022) read into rdm's formats.

The release ships PyTorch Lightning checkpoints, ``.npz`` database parts and ``nn_memory``
pickles that only the 2021 research code runs. Nothing here imports that code or executes a
pickle's globals beyond an allowlist (:mod:`rdm.official.unpickle`):

- :mod:`rdm.official.unpickle`   the allowlisting unpickler for ``.ckpt`` and ``.p`` files
- :mod:`rdm.official.checkpoint` the Lightning checkpoint + ``config.yaml`` -> an rdm run directory
"""
