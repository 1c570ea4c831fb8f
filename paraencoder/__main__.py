"""``python -m paraencoder ARGS`` = the ``paraencoder`` command (:mod:`paraencoder.apps.cli`)."""

import sys

from paraencoder.apps.cli import command

sys.exit(command())
