//! Dice roller plugin.
//!
//! - A message that starts with `/roll` (e.g. `/roll 2d6+1`, `/roll d20`, `/roll 4d6-2`) is
//!   answered by the plugin itself; the upstream is never called.
//! - `{{roll:2d6}}` anywhere in a message is replaced by the rolled total before generation, so
//!   the character reacts to the result.
//!
//! Config (all optional): `{"maxDice": 100, "maxSides": 1000, "prefix": "🎲"}`.

use taproom_plugin_sdk::{config, host, plugin, unchanged, BeforeContext, BeforeResult, Plugin};

/// A parsed `NdS±K` expression.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dice {
    count: u32,
    sides: u32,
    modifier: i64,
}

/// Limits from the character's config.
struct Limits {
    max_dice: u32,
    max_sides: u32,
}

fn parse(expr: &str, limits: &Limits) -> Result<Dice, String> {
    let expr: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let expr = expr.to_ascii_lowercase();
    let (count, rest) = expr
        .split_once('d')
        .ok_or_else(|| format!("`{expr}` is not a dice expression like 2d6+1"))?;
    let count: u32 = if count.is_empty() {
        1
    } else {
        count
            .parse()
            .map_err(|_| format!("bad dice count `{count}`"))?
    };
    let (sides, modifier) = match rest.find(['+', '-']) {
        Some(i) => {
            let m: i64 = rest[i + 1..]
                .parse()
                .map_err(|_| format!("bad modifier `{}`", &rest[i..]))?;
            (&rest[..i], if &rest[i..i + 1] == "-" { -m } else { m })
        }
        None => (rest, 0),
    };
    let sides: u32 = sides
        .parse()
        .map_err(|_| format!("bad die size `{sides}`"))?;
    if count == 0 || count > limits.max_dice {
        return Err(format!("roll between 1 and {} dice", limits.max_dice));
    }
    if sides < 2 || sides > limits.max_sides {
        return Err(format!("dice need 2 to {} sides", limits.max_sides));
    }
    Ok(Dice {
        count,
        sides,
        modifier,
    })
}

fn roll(d: Dice) -> (Vec<u32>, i64) {
    let rolls: Vec<u32> = (0..d.count).map(|_| host::roll(d.sides)).collect();
    let total = rolls.iter().map(|&r| i64::from(r)).sum::<i64>() + d.modifier;
    (rolls, total)
}

fn describe(expr: &str, d: Dice, rolls: &[u32], total: i64, prefix: &str) -> String {
    let list: Vec<String> = rolls.iter().map(u32::to_string).collect();
    let modifier = match d.modifier {
        0 => String::new(),
        m if m > 0 => format!(" + {m}"),
        m => format!(" - {}", -m),
    };
    format!("{prefix} {expr}: [{}]{modifier} = {total}", list.join(", "))
}

/// Replaces every `{{roll:EXPR}}` with its total; unparsable expressions are left as written.
fn expand(text: &str, limits: &Limits) -> Option<String> {
    const OPEN: &str = "{{roll:";
    if !text.contains(OPEN) {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        match after.find("}}") {
            Some(end) => {
                match parse(&after[..end], limits) {
                    Ok(d) => out.push_str(&roll(d).1.to_string()),
                    Err(_) => out.push_str(&rest[start..start + OPEN.len() + end + 2]),
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    Some(out)
}

struct DiceRoller;

impl Plugin for DiceRoller {
    fn before_generate(ctx: BeforeContext) -> Result<BeforeResult, String> {
        let cfg = config(&ctx.base);
        let limits = Limits {
            max_dice: cfg["maxDice"]
                .as_u64()
                .map_or(100, |v| v.min(10_000) as u32),
            max_sides: cfg["maxSides"]
                .as_u64()
                .map_or(1000, |v| v.min(1_000_000) as u32),
        };
        let prefix = cfg["prefix"].as_str().unwrap_or("🎲");
        let message = ctx.base.user_message.trim();
        let mut out = unchanged();
        if let Some(expr) = message.strip_prefix("/roll") {
            let expr = match expr.trim() {
                "" => "1d20",
                e => e,
            };
            out.reply = Some(match parse(expr, &limits) {
                Ok(d) => {
                    let (rolls, total) = roll(d);
                    describe(expr, d, &rolls, total, prefix)
                }
                Err(e) => format!("{prefix} cannot roll: {e}"),
            });
        } else {
            out.user_message = expand(&ctx.base.user_message, &limits);
        }
        Ok(out)
    }
}

plugin!(DiceRoller);
