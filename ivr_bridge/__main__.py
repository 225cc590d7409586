import sys

from ivr_bridge.cli import main

if __name__ == "__main__":  # the recogniser worker processes (spawned) import this module too
    sys.exit(main())
