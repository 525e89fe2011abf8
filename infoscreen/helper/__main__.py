"""`python -m infoscreen.helper` runs the helper (same as the `infoscreen-helper` script)."""
from infoscreen.helper.server import main

main()
