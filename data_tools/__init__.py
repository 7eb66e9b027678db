"""Corpus readers, tokenizers, preprocessing to Megatron indexed datasets, dataset blends.

``data_tools`` never imports ``moue``. Importing it prepares Megatron-Core's import on machines
without Triton (``parallel.compat``), as the data commands import Megatron's dataset code.
"""

from parallel.compat import install_paged_stash_stand_in

install_paged_stash_stand_in()
