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
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PLUGIN_BINDINGS)?;
        match t.get(character)? {
            Some(raw) => decode_record(raw.value()),
            None => Ok(Vec::new()),
        }
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
        Ok(())
    }
}
