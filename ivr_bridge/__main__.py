import sys

from ivr_bridge.cli import main

sys.exit(main())
