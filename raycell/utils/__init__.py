"""Small helpers shared by every stage: atomic file writes, run folders, logging."""
