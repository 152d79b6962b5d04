"""Local servers that speak third-party provider APIs, with fault knobs, for tests and benches."""
