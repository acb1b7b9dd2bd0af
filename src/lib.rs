//! Taproom: a character-chat gateway that sits beside NextChat and in front of character generation.
//!
//! # Layout
//! - `model`: the spec's Character entity, PersonalityProfile and the lorebook types.

pub mod model;
