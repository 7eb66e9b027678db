"""moue: pretraining of Mixture-of-Universal-Experts language models on Megatron-Core."""

import parallel  # noqa: F401  (prepares Megatron-Core's import; see parallel.compat)

__version__ = "0.1.0.dev0"
