"""aslcal.io."""
