"""``python -m infoscreen.notify_failure UNIT``: same as the ``infoscreen-notify-failure`` script."""

import sys

from infoscreen.notify_failure.main import main

sys.exit(main())
