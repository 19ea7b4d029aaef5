//! Shared helpers for the interop tests: spawning livesnapd and its QEMU peers.
