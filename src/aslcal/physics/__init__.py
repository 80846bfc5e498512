"""aslcal.physics."""
