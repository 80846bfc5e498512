"""aslcal.backend."""
