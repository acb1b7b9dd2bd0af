//! The small, pre-lowercased record kept in the index tables: enough to filter, search, sort and
//! count a user's characters without decoding a single Character. A hand-rolled length-prefixed
//! binary layout because it is read thousands of times per search and JSON would dominate.

use crate::model::Character;

/// Index record of one character.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub id: u128,
    pub owner: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub usage: u64,
    pub is_public: bool,
    pub is_active: bool,
    /// Lowercased name (sort key and search field).
    pub name: String,
    /// Lowercased tags.
    pub tags: Vec<String>,
    pub group_id: Option<String>,
    /// Lowercased description (search field).
    pub description: String,
}

impl Summary {
    /// The summary of a character.
    pub fn of(c: &Character, id: u128) -> Self {
        Self {
            id,
            owner: c.creator_id.clone(),
            created_ms: crate::time::rfc3339_to_ms(&c.created_at),
            updated_ms: crate::time::rfc3339_to_ms(&c.updated_at),
            usage: c.usage_count,
            is_public: c.is_public,
            is_active: c.is_active,
            name: c.name.to_lowercase(),
            tags: c.tags.iter().map(|t| t.to_lowercase()).collect(),
            group_id: c.group_id.clone(),
            description: c.description.to_lowercase(),
        }
    }

    /// Binary encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.name.len() + self.description.len());
        out.push(1u8);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        out.extend_from_slice(&self.updated_ms.to_le_bytes());
        out.extend_from_slice(&self.usage.to_le_bytes());
        out.push(u8::from(self.is_public) | (u8::from(self.is_active) << 1));
        put_str(&mut out, &self.owner);
        put_str(&mut out, &self.name);
        put_str(&mut out, self.group_id.as_deref().unwrap_or(""));
        out.extend_from_slice(&(self.tags.len() as u32).to_le_bytes());
        for t in &self.tags {
            put_str(&mut out, t);
        }
        put_str(&mut out, &self.description);
        out
    }

    /// Decodes `encode`'s output; `None` for a corrupt record.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        SummaryView::parse(bytes).map(|v| v.to_owned())
    }
}

/// A summary read in place from its encoded bytes: listing filters and sorts thousands of rows
/// per request, and borrowing saves copying every description.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryView<'a> {
    pub id: u128,
    pub owner: &'a str,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub usage: u64,
    pub is_public: bool,
    pub is_active: bool,
    pub name: &'a str,
    pub tags: Vec<&'a str>,
    pub group_id: Option<&'a str>,
    pub description: &'a str,
}

impl<'a> SummaryView<'a> {
    /// Reads `Summary::encode`'s output; `None` for a corrupt record.
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(1)?[0] != 1 {
            return None;
        }
        let id = u128::from_le_bytes(r.take(16)?.try_into().ok()?);
        let created_ms = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let updated_ms = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let usage = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let flags = r.take(1)?[0];
        let owner = r.str()?;
        let name = r.str()?;
        let group = r.str()?;
        let n = r.u32()? as usize;
        let mut tags = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            tags.push(r.str()?);
        }
        let description = r.str()?;
        Some(Self {
            id,
            owner,
            created_ms,
            updated_ms,
            usage,
            is_public: flags & 1 != 0,
            is_active: flags & 2 != 0,
            name,
            tags,
            group_id: (!group.is_empty()).then_some(group),
            description,
        })
    }

    /// Whether a lowercased query occurs in the name, description or a tag.
    pub fn matches_search(&self, needle: &str) -> bool {
        self.name.contains(needle)
            || self.tags.iter().any(|t| t.contains(needle))
            || self.description.contains(needle)
    }

    /// Whether every lowercased tag in `wanted` is one of this character's tags.
    pub fn has_all_tags(&self, wanted: &[String]) -> bool {
        wanted.iter().all(|w| self.tags.iter().any(|t| t == w))
    }

    /// The owned summary.
    pub fn to_owned(&self) -> Summary {
        Summary {
            id: self.id,
            owner: self.owner.to_string(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            usage: self.usage,
            is_public: self.is_public,
            is_active: self.is_active,
            name: self.name.to_string(),
            tags: self.tags.iter().map(|t| t.to_string()).collect(),
            group_id: self.group_id.map(str::to_string),
            description: self.description.to_string(),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = Summary {
            id: 42,
            owner: "alice".into(),
            created_ms: 1,
            updated_ms: -2,
            usage: 7,
            is_public: true,
            is_active: false,
            name: "seraphina 🌸".into(),
            tags: vec!["fantasy".into(), "".into()],
            group_id: Some("g".into()),
            description: "guardian".into(),
        };
        assert_eq!(Summary::decode(&s.encode()), Some(s));
    }

    #[test]
    fn truncated_is_none() {
        let mut s = Summary {
            id: 1,
            owner: "a".into(),
            created_ms: 0,
            updated_ms: 0,
            usage: 0,
            is_public: false,
            is_active: true,
            name: "n".into(),
            tags: vec![],
            group_id: None,
            description: "d".into(),
        }
        .encode();
        s.truncate(s.len() - 1);
        assert_eq!(Summary::decode(&s), None);
    }
}
