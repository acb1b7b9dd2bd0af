//! Shared integration-test helpers.

pub mod fake_upstream;
