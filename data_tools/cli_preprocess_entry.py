"""``python -m data_tools.cli_preprocess_entry ...``: moue-preprocess without the console script."""

import sys

from data_tools.cli import preprocess_main

if __name__ == "__main__":
    sys.exit(preprocess_main())
