"""`python -m infoscreen.workers.mqtt`: the MQTT worker, started by the supervisor."""

import sys

from .worker import main

if __name__ == "__main__":
    sys.exit(main())
