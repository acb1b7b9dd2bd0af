//! Taproom: a character-chat gateway that sits beside NextChat and in front of character generation.
//!
//! # Layout
//! - `model`: the spec's Character entity, PersonalityProfile and the lorebook types.
//! - `cards`: character card import/export (PNG, JSON V1/V2/V3, CharX), World Info lorebooks;
//!   pure, no IO.

pub mod cards;
pub mod model;
