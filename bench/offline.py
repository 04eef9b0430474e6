"""The reference offline workload; same as `nanoforge bench offline` (see --help)."""
import sys

from nanoforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "offline", *sys.argv[1:]]))
