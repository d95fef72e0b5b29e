import sys

from fleetgen.launcher.cli import main

sys.exit(main())
