"""The benchmark harness, by stage: ``data``, ``loop``, ``report``, ``studies``, and the ``cli``.

``config`` (the run configuration, a leaf), ``resolve`` (a configuration against the registries),
``errors``, ``io``, ``environment``, ``progress`` and ``usage`` serve every stage.
"""

from optimizers import __version__  # one version for the library and the harness

__all__ = ["__version__"]
