//! Helpers shared by the protocol tests.

pub(crate) mod spec_examples;
