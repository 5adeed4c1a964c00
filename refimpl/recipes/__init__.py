"""Long experiments as functions with a small default budget (run from the shell as ``python -m refimpl <recipe>``)."""
