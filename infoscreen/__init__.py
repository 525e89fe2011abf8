"""infoscreen-client: the agent on every infoscreen. Imports nothing third-party (the helper imports alone)."""
