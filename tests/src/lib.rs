//! End-to-end tests of Skiff live in `tests/tests/`; this library holds their shared helpers.
