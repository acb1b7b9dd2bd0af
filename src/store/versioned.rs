//! A small read-through cache for rows that change rarely but are read on every turn (plugin
//! bindings, slugs): each entry remembers the generation it was read at and is served only
//! while that generation is current. Writers move the generation on after committing; a reader
//! notes it before opening its read transaction, so a row read before a commit is never served
//! after it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::group_commit::lock;

/// Rows by key, valid while the generation they were read at is current.
pub(crate) struct Versioned<K, V> {
    generation: AtomicU64,
    rows: Mutex<HashMap<K, (u64, V)>>,
    /// Entries kept before the map starts over; bounds memory only.
    capacity: usize,
}

impl<K: Eq + Hash, V: Clone> Versioned<K, V> {
    /// An empty cache that holds up to `capacity` rows.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            generation: AtomicU64::new(0),
            rows: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The cached row for `key`, or what `load` reads from the database (then cached).
    pub(crate) fn get_or_load<Q, E>(
        &self,
        key: &Q,
        load: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ToOwned<Owned = K> + ?Sized,
    {
        // Read before the database: a change committed meanwhile moves it on, and the row
        // stored below is then never served.
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((g, row)) = lock(&self.rows).get(key) {
            if *g == generation {
                return Ok(row.clone());
            }
        }
        let row = load()?;
        let mut rows = lock(&self.rows);
        if rows.len() >= self.capacity {
            rows.clear();
        }
        rows.insert(key.to_owned(), (generation, row.clone()));
        Ok(row)
    }

    /// Marks every cached row stale; call after committing a change to the rows.
    pub(crate) fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_served_until_the_generation_moves_on() {
        let cache: Versioned<String, u32> = Versioned::new(8);
        let mut reads = 0;
        let mut read = |v: u32| {
            reads += 1;
            Ok::<_, ()>(v)
        };
        assert_eq!(cache.get_or_load("a", || read(1)), Ok(1));
        assert_eq!(cache.get_or_load("a", || read(2)), Ok(1));
        cache.changed();
        assert_eq!(cache.get_or_load("a", || read(3)), Ok(3));
        assert_eq!(reads, 2);
    }

    #[test]
    fn a_row_read_before_a_change_is_not_served_after_it() {
        let cache: Versioned<String, u32> = Versioned::new(8);
        // The commit lands while the row is being read: the old value is returned to this
        // reader but must not be served to the next one.
        let stale = cache.get_or_load("a", || {
            cache.changed();
            Ok::<_, ()>(1)
        });
        assert_eq!(stale, Ok(1));
        assert_eq!(cache.get_or_load("a", || Ok::<_, ()>(2)), Ok(2));
    }

    #[test]
    fn a_full_cache_starts_over_instead_of_growing() {
        let cache: Versioned<u32, u32> = Versioned::new(2);
        for k in 0..5 {
            cache.get_or_load(&k, || Ok::<_, ()>(k)).unwrap();
        }
        assert!(lock(&cache.rows).len() <= 2);
    }
}
