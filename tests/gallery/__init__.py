"""Model gallery and conformance matrix (issue 10): every technique x every gallery model."""
