"""napo's version, in a module of its own so that any part of napo can read it without importing the
package's ``__init__`` (which imports most of napo)."""

__version__ = "0.1.0"
