"""Thin layers over the foundation models' own packages (imported lazily): building the
architectures, strict checkpoint loading, and the exact speed-ups used by the plugins."""
