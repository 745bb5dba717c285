"""`python -m jaxsae ...`: the `jaxsae` command, for environments whose scripts directory is
not on PATH."""

import sys

from jaxsae.cli import main

if __name__ == "__main__":
    sys.exit(main())
