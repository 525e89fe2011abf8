"""infoscreen-client: the agent on every infoscreen. Imports nothing third-party (the helper imports alone)."""

# The one place of the version: the Python package (pyproject.toml reads it), the Debian package
# (scripts/build-deb), every program's --version and the health payload's `agent` block.
__version__ = "0.1.0"
