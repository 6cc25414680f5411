"""`python -m stc_transformers ...` runs the `stc` command line (see `stc_transformers.cli`)."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
