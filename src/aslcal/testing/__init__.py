"""aslcal.testing."""
