//! Whose a dedup record is: the key names the sender as well as the client id, so nobody can
//! claim another user's client seqs.
//!
//! A dedup record is keyed by a [`DedupId`], the first 16 bytes of SHA-256 over the sender's
//! name and the client id. Before format 2 the key held the client id alone, which every
//! message showed: anyone could send under a victim's next client seqs first, and the victim's
//! real sends were then answered "duplicate" and stored nowhere. [`migrate`] rewrites records
//! of the earlier format once, at open and after a snapshot install, finding each record's
//! sender in the message it points at.

use rocksdb::{WriteBatch, WriteOptions};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::command::ClientId;
use crate::format::{self, META_DEDUP_FORMAT, PREFIX_DEDUP};
use crate::store::{self, Store};
use crate::Error;

/// The layout of the dedup records this build writes (the value of [`META_DEDUP_FORMAT`]).
pub(crate) const DEDUP_FORMAT: u64 = 2;

/// The sender and client id a dedup record belongs to, hashed to the 16 bytes its key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DedupId(pub(crate) [u8; 16]);

impl DedupId {
    /// The id of `client_id`'s sends as `sender`. The sender's length goes first so that no
    /// two (sender, client id) pairs hash the same input.
    pub(crate) fn of(sender: &str, client_id: &ClientId) -> DedupId {
        let mut hash = Sha256::new();
        hash.update(b"cellchat dedup v2\0");
        hash.update([sender.len() as u8]);
        hash.update(sender.as_bytes());
        hash.update(client_id.0);
        let digest = hash.finalize();
        DedupId(digest[..16].try_into().expect("SHA-256 is 32 bytes"))
    }
}

fn rocks(op: &'static str) -> impl Fn(rocksdb::Error) -> Error {
    move |source| Error::Rocks { op, source }
}

/// Rewrites every dedup record of the earlier format into this one, in one atomic
/// `WriteBatch` together with the format marker, so a crash leaves either format whole.
/// Returns how many records were rewritten (0 when the store is already in this format).
///
/// Memory: the batch holds every record twice (a delete and a put), about 100 bytes per sent
/// message, once per store.
///
/// # Errors
/// [`Error::Rocks`]; [`Error::Corrupt`] for a record whose message is missing or unreadable.
pub(crate) fn migrate(store: &Store) -> Result<u64, Error> {
    let db = store.db();
    let format = db.get(META_DEDUP_FORMAT).map_err(rocks("get"))?;
    if let Some(value) = format {
        let found = format::decode_u64_value(&value, "dedup_format")?;
        if found == DEDUP_FORMAT {
            return Ok(0);
        }
        return Err(Error::UnsupportedVersion {
            what: "dedup records",
            found: found.min(u64::from(u8::MAX)) as u8,
        });
    }
    let mut moves = Vec::new();
    let mut it = db.raw_iterator_cf_opt(store.dedup_cf(), store::total_order());
    it.seek([PREFIX_DEDUP]);
    let mut message_key = Vec::new();
    while let (Some(key), Some(value)) = (it.key(), it.value()) {
        let corrupt = |reason: String| Error::Corrupt {
            what: "dedup",
            reason,
        };
        if key.len() != 25 || key[0] != PREFIX_DEDUP {
            return Err(corrupt(format!("bad key of {} bytes", key.len())));
        }
        let client = ClientId(key[1..17].try_into().expect("length checked"));
        let client_seq = u64::from_be_bytes(key[17..25].try_into().expect("length checked"));
        let (seq, _, channel) = format::decode_dedup_value(value)?;
        format::message_key(&mut message_key, channel, seq);
        let message = db.get(&message_key).map_err(rocks("get"))?.ok_or_else(|| {
            corrupt(format!(
                "the record of a client points at {channel}/{seq}, which is missing"
            ))
        })?;
        let sender = format::decode_message_value(&message)?.sender;
        let mut new_key = Vec::with_capacity(25);
        format::dedup_key(&mut new_key, &DedupId::of(sender, &client).0, client_seq);
        moves.push((key.to_vec(), new_key, value.to_vec()));
        it.next();
    }
    it.status().map_err(rocks("iterate"))?;
    let mut wb = WriteBatch::default();
    // Every delete before every put: a new key can never be clobbered by an old one's delete.
    for (old, _, _) in &moves {
        wb.delete_cf(store.dedup_cf(), old);
    }
    for (_, new, value) in &moves {
        wb.put_cf(store.dedup_cf(), new, value);
    }
    wb.put(META_DEDUP_FORMAT, format::encode_u64_value(DEDUP_FORMAT));
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(wb, &opts).map_err(rocks("write"))?;
    if !moves.is_empty() {
        info!(
            records = moves.len(),
            "dedup records rewritten to name their sender"
        );
    }
    Ok(moves.len() as u64)
}
