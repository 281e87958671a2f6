"""`python -m pcd`: the same command line as `pcd`."""

from pcd.cli import main

main()
