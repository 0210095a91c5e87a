"""The seed project's entry point, kept so that its README's command lines run verbatim:
``python main.py --dataset cifar10 --sam_type SAM ...`` is ``python launch.py --dataset cifar10 --sam_type SAM ...``."""

from bench.cli.main import run

if __name__ == "__main__":
    run()
