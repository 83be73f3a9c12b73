"""`python -m app.cli`: how `crucible up` starts its children, without the installed script."""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
