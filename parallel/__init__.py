"""Process groups and layouts, the CPU backend, pool placement and gradient sync, launch.

``parallel`` never imports ``moue``. Importing it prepares Megatron-Core's import on machines
without Triton (see ``parallel.compat``).
"""

from parallel.compat import install_paged_stash_stand_in

install_paged_stash_stand_in()
