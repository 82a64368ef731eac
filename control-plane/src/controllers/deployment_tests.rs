//! Unit tests of the deployment decision (pure; no I/O).

use super::*;

#[test]
fn placeholder_until_the_suite_lands() {
    assert_eq!(Rollout::default().place, 0);
}
