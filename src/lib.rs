//! Taproom: a character-chat gateway that sits beside NextChat and in front of character generation.
//!
//! # Layout
//! - `model`: the spec's Character entity, PersonalityProfile and the lorebook types.
//! - `upstream`: clients for SillyTavern and OpenAI-compatible upstreams, with retries and a
//!   circuit breaker.

pub mod model;
pub mod upstream;
