"""aslcal.cli."""
