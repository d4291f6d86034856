use crate::Record;

/// Why a [`Fold`] could not fold a record.
pub type FoldError = Box<dyn std::error::Error + Send + Sync>;

/// Turns an object's snapshot state and the next record for that object into
/// its new state. Used by compaction; the log itself does not interpret
/// payloads. Returning `None` removes the object's snapshot (a tombstone).
pub trait Fold {
    fn fold(
        &self,
        key: &str,
        state: Option<&[u8]>,
        record: &Record,
    ) -> Result<Option<Vec<u8>>, FoldError>;
}

/// Keeps an object's changes as the concatenation of their payloads, and
/// drops it on a tombstone. Concatenated automerge changes load as one
/// document, so this folder is valid for CRDT payloads as well as for
/// opaque ones.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConcatFold;

impl Fold for ConcatFold {
    fn fold(
        &self,
        _key: &str,
        state: Option<&[u8]>,
        record: &Record,
    ) -> Result<Option<Vec<u8>>, FoldError> {
        Ok(match record.kind {
            crate::PayloadKind::Tombstone => None,
            _ => {
                let mut out = state.map(<[u8]>::to_vec).unwrap_or_default();
                out.extend_from_slice(&record.payload);
                Some(out)
            }
        })
    }
}
