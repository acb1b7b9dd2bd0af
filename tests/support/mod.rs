//! Test support: start the real `taproom` binary on 127.0.0.1 with a temp data dir, mint
//! tokens, talk HTTP.
#![allow(dead_code)]

pub mod app;
pub mod fake_upstream;
pub mod sse;
