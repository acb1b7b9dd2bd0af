//! Taproom: a character-chat gateway that sits beside NextChat and in front of character generation.
//!
//! # Layout
//! - `model`: the spec's Character entity, PersonalityProfile and the lorebook types.
//! - `prompt`: SillyTavern-compatible prompt building: tokens, macros, lorebook, assembly.

pub mod model;
pub mod prompt;
