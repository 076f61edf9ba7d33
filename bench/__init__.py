"""`python -m bench`: side-by-side inference measurements in one run (needs the [train] extra and wrk)."""
