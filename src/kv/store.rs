//! Where the state machine's key-value map lives: the storage engine on a server
//! ([`Store::engine`]), or an ordered map in memory for unit tests and simulations
//! ([`Store::memory`]). The state machine reads and writes through a batch overlay: the writes
//! of the entries applied since the last [`Store::commit`] are held here (so a later entry of
//! the same batch reads them), and the commit writes them to the engine in one atomic batch
//! together with the sessions and the applied index. The overlay is bounded by the state
//! machine, which commits every [`MAX_BATCH_KEYS`] keys.

use std::collections::BTreeMap;

use super::engine::{Engine, EngineBatch, EngineError, EngineView};

/// The most keys one batch holds before the state machine commits it: with
/// [`MAX_BATCH_BYTES`], bounds the overlay's memory whatever the size of an apply task and
/// however long the apply thread waits between commits.
pub const MAX_BATCH_KEYS: usize = 8192;

/// The most bytes of keys and values one batch holds before the state machine commits it.
pub const MAX_BATCH_BYTES: usize = 16 << 20;

enum Base {
    Memory(BTreeMap<Vec<u8>, Vec<u8>>),
    Engine(Engine),
}

pub struct Store {
    base: Base,
    /// Writes not yet committed; `None` is a delete.
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Bytes of keys and values written into the overlay since the last commit (overwrites
    /// counted again: an upper bound of what it holds).
    overlay_bytes: usize,
}

impl Store {
    pub fn memory() -> Store {
        Store {
            base: Base::Memory(BTreeMap::new()),
            overlay: BTreeMap::new(),
            overlay_bytes: 0,
        }
    }

    pub fn engine(engine: Engine) -> Store {
        Store {
            base: Base::Engine(engine),
            overlay: BTreeMap::new(),
            overlay_bytes: 0,
        }
    }

    pub fn as_engine(&self) -> Option<&Engine> {
        match &self.base {
            Base::Engine(engine) => Some(engine),
            Base::Memory(_) => None,
        }
    }

    /// The value of `key`, as of the last write (committed or not).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        if let Some(value) = self.overlay.get(key) {
            return Ok(value.clone());
        }
        match &self.base {
            Base::Memory(map) => Ok(map.get(key).cloned()),
            Base::Engine(engine) => engine.get(key),
        }
    }

    /// A map in memory is written at once (it has no crash to be atomic against); an
    /// engine's writes wait in the overlay for the commit.
    pub fn set(&mut self, key: Vec<u8>, value: Vec<u8>) {
        match &mut self.base {
            Base::Memory(map) => {
                map.insert(key, value);
            }
            Base::Engine(_) => {
                self.overlay_bytes += key.len() + value.len();
                self.overlay.insert(key, Some(value));
            }
        }
    }

    pub fn remove(&mut self, key: Vec<u8>) {
        match &mut self.base {
            Base::Memory(map) => {
                map.remove(&key);
            }
            Base::Engine(_) => {
                self.overlay_bytes += key.len();
                self.overlay.insert(key, None);
            }
        }
    }

    /// Keys written since the last commit.
    pub fn pending_keys(&self) -> usize {
        self.overlay.len()
    }

    /// Whether the writes since the last commit reached [`MAX_BATCH_KEYS`] or
    /// [`MAX_BATCH_BYTES`]: the batch must be committed now.
    pub fn batch_is_full(&self) -> bool {
        self.overlay.len() >= MAX_BATCH_KEYS || self.overlay_bytes >= MAX_BATCH_BYTES
    }

    /// Writes the overlay, `sessions` and `meta` in one atomic batch (durable with `durable`).
    pub fn commit(&mut self, mut batch: EngineBatch, durable: bool) -> Result<(), EngineError> {
        batch.data = std::mem::take(&mut self.overlay);
        self.overlay_bytes = 0;
        match &mut self.base {
            Base::Memory(_) => Ok(()),
            Base::Engine(engine) => engine.commit(&batch, durable),
        }
    }

    /// Calls `each` for every key in order, in bounded steps on an engine (whose overlay must
    /// be empty: committed).
    pub fn for_each_committed(
        &self,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), EngineError> {
        assert!(
            self.overlay.is_empty(),
            "scan of a store with uncommitted writes"
        );
        match &self.base {
            Base::Memory(map) => {
                for (key, value) in map {
                    each(key, value);
                }
                Ok(())
            }
            Base::Engine(engine) => scan_view(&engine.view(), &mut each),
        }
    }
}

/// Every key of `view` in order, read in steps of bounded size.
pub fn scan_view(view: &EngineView, each: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), EngineError> {
    const STEP_KEYS: usize = 4096;
    let mut last: Option<Vec<u8>> = None;
    loop {
        let mut step_last = None;
        let visited = view.scan(last.as_deref(), STEP_KEYS, |key, value| {
            each(key, value);
            step_last = Some(key.to_vec());
        })?;
        if visited < STEP_KEYS {
            return Ok(());
        }
        last = step_last;
    }
}
