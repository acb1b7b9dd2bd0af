//! Which plugins each character uses, in order, with their per-character config.

use super::{decode_record, encode_record, Store, StoreError};
use redb::{Durability, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

/// character id → the character's plugin bindings.
pub(crate) const PLUGIN_BINDINGS: TableDefinition<u128, &[u8]> =
    TableDefinition::new("plugin_bindings");

/// One plugin attached to a character.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = PluginBinding)]
pub struct PluginBindingRecord {
    pub name: String,
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default = "enabled_default")]
    pub enabled: bool,
}

fn enabled_default() -> bool {
    true
}

impl Store {
    /// A character's plugin bindings, in call order.
    pub fn plugin_bindings(&self, character: u128) -> Result<Vec<PluginBindingRecord>, StoreError> {
        self.bindings.get_or_load(&character, || {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(PLUGIN_BINDINGS)?;
            Ok(match t.get(character)? {
                Some(raw) => decode_record(raw.value())?,
                None => Vec::new(),
            })
        })
    }

    /// Replaces a character's plugin bindings.
    pub fn set_plugin_bindings(
        &self,
        character: u128,
        bindings: &[PluginBindingRecord],
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut t = txn.open_table(PLUGIN_BINDINGS)?;
            if bindings.is_empty() {
                t.remove(character)?;
            } else {
                t.insert(character, encode_record(&bindings.to_vec())?.as_slice())?;
            }
        }
        txn.commit()?;
        self.bindings.changed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(name: &str) -> PluginBindingRecord {
        PluginBindingRecord {
            name: name.into(),
            config: serde_json::Value::Null,
            enabled: true,
        }
    }

    #[test]
    fn cached_bindings_follow_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.redb"), &Default::default()).unwrap();
        assert!(store.plugin_bindings(7).unwrap().is_empty());
        store.set_plugin_bindings(7, &[binding("a")]).unwrap();
        assert_eq!(store.plugin_bindings(7).unwrap(), vec![binding("a")]);
        // Served from the cache now; a change must still show at once.
        assert_eq!(store.plugin_bindings(7).unwrap(), vec![binding("a")]);
        store
            .set_plugin_bindings(7, &[binding("b"), binding("a")])
            .unwrap();
        assert_eq!(
            store.plugin_bindings(7).unwrap(),
            vec![binding("b"), binding("a")]
        );
        store.set_plugin_bindings(7, &[]).unwrap();
        assert!(store.plugin_bindings(7).unwrap().is_empty());
    }
}
