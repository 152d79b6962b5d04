"""The contract between producer and consumers: names, envelope, declaration."""
