//! Unit tests of the daemon's decisions that need no mount.
