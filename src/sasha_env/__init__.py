"""sasha_env: slides, features, the Sasha-WSI-v0 environment and the ``sasha`` command line."""

__version__ = "0.1.0"
