"""Entry point: ``python launch.py`` runs the default suite; see ``python launch.py --help``."""

from bench.cli.main import run

if __name__ == "__main__":
    run()
