//! Whose a dedup record is: the key names the sender as well as the client id, so nobody can
//! claim another user's client seqs.
//!
//! A dedup record is keyed by a [`DedupId`], the first 16 bytes of SHA-256 over the sender's
//! name and the client id. Before format 2 the key held the client id alone, which every
//! message showed: anyone could send under a victim's next client seqs first, and the victim's
//! real sends were then answered "duplicate" and stored nowhere. [`migrate`] rewrites records
//! of the earlier format once, at open and after a snapshot install, finding each record's
//! sender in the message it points at. Format 3 adds the expiry index (`b'e'` keys, see
//! `retention.rs`); [`migrate`] builds it once for records written without one.

use rocksdb::{WriteBatch, WriteOptions};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::command::ClientId;
use crate::format::{self, META_DEDUP_FORMAT, PREFIX_DEDUP};
use crate::store::{self, Store};
use crate::Error;

/// The layout of the dedup records this build writes (the value of [`META_DEDUP_FORMAT`]).
pub(crate) const DEDUP_FORMAT: u64 = 3;

/// The earlier layout: records keyed by dedup id, without the expiry index.
const DEDUP_FORMAT_UNINDEXED: u64 = 2;

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

/// Rewrites every dedup record of an earlier format into this one (keyed by dedup id, with an
/// expiry index entry each), in one atomic `WriteBatch` together with the format marker, so a
/// crash leaves either format whole. Returns how many records were rewritten or indexed (0
/// when the store is already in this format).
///
/// Memory: the batch holds every record up to three times (a delete, a put and an index
/// entry), about 150 bytes per sent message, once per store.
///
/// # Errors
/// [`Error::Rocks`]; [`Error::Corrupt`] for a record whose message is missing or unreadable.
pub(crate) fn migrate(store: &Store) -> Result<u64, Error> {
    let db = store.db();
    let format = db.get(META_DEDUP_FORMAT).map_err(rocks("get"))?;
    let keyed_by_id = match format {
        None => false,
        Some(value) => match format::decode_u64_value(&value, "dedup_format")? {
            DEDUP_FORMAT => return Ok(0),
            DEDUP_FORMAT_UNINDEXED => true,
            found => {
                return Err(Error::UnsupportedVersion {
                    what: "dedup records",
                    found: found.min(u64::from(u8::MAX)) as u8,
                })
            }
        },
    };
    let mut moves = Vec::new();
    let mut index = Vec::new();
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
        let client_seq = u64::from_be_bytes(key[17..25].try_into().expect("length checked"));
        let (seq, at_ms, channel) = format::decode_dedup_value(value)?;
        if keyed_by_id {
            let id = key[1..17].try_into().expect("length checked");
            let mut entry = Vec::with_capacity(format::EXPIRY_KEY_LEN);
            format::expiry_key(&mut entry, at_ms, &id, client_seq);
            index.push(entry);
            it.next();
            continue;
        }
        let client = ClientId(key[1..17].try_into().expect("length checked"));
        format::message_key(&mut message_key, channel, seq);
        let message = db.get(&message_key).map_err(rocks("get"))?.ok_or_else(|| {
            corrupt(format!(
                "the record of a client points at {channel}/{seq}, which is missing"
            ))
        })?;
        let sender = format::decode_message_value(&message)?.sender;
        let id = DedupId::of(sender, &client).0;
        let mut new_key = Vec::with_capacity(25);
        format::dedup_key(&mut new_key, &id, client_seq);
        moves.push((key.to_vec(), new_key, value.to_vec()));
        let mut entry = Vec::with_capacity(format::EXPIRY_KEY_LEN);
        format::expiry_key(&mut entry, at_ms, &id, client_seq);
        index.push(entry);
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
    for entry in &index {
        wb.put(entry, [format::VALUE_VERSION]);
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
    if !index.is_empty() {
        info!(records = index.len(), "dedup records indexed for expiry");
    }
    Ok(index.len() as u64)
}
