"""The provscope release number, read by the build and by ``provscope --version``."""

__version__ = "0.1.0"
