"""aslcal.fitting."""
