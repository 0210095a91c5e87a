"""Entry point: ``python launch.py`` runs the default suite; see ``python launch.py --help``."""

import sys

from bench.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
