"""``python -m forkyard.cli``: how `forkyard up` starts its processes with this interpreter."""

from forkyard.cli import main

main()
