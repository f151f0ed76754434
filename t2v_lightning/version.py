"""The package's version, defined here and nowhere else.

``setup.cfg`` reads it (``version = attr: t2v_lightning.version.__version__``), the package root
re-exports it, artifacts record it in their metadata and ``t2v --version`` prints it.
"""

__version__ = "0.1.0"
