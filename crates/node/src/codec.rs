//! Versioned encodings of the openraft values this node persists: log entries, votes, log ids
//! and memberships. Every encoding starts with a one-byte format version so the layout can
//! change later without misreading old bytes.
//!
//! | version | what changed |
//! |---------|--------------|
//! | 1 | first layout: version byte + postcard of the openraft value |
//! | 2 | `Member` gained `name` (last field); membership entries and stored memberships change |
//!
//! Everything is written as version 2. Version 1 (the release before node names, see
//! `tests/upgrade.rs`) still decodes: votes and log ids have the same body in both versions,
//! and entries and memberships go through [`v1`]'s types, whose members get an empty name.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Serialize};

use crate::types::{Entry, LogId, Member, StoredMembership, Vote};

/// Version byte of every value this build writes.
pub const FORMAT_VERSION: u8 = 2;
/// The version before `Member` had a name; still read.
pub const FORMAT_VERSION_V1: u8 = 1;

/// Why a persisted value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The value was empty.
    #[error("empty value")]
    Empty,
    /// The value was written by a format this build does not know.
    #[error("unsupported format version {found} (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The bytes after the version did not decode.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The codec's complaint.
        reason: String,
    },
}

fn malformed(what: &'static str, reason: impl std::fmt::Display) -> DecodeError {
    let reason = reason.to_string();
    DecodeError::Malformed { what, reason }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard cannot fail on these plain-data types; a failure would be a programming error.
    let mut out = vec![FORMAT_VERSION];
    out.extend(postcard::to_allocvec(value).expect("openraft values always serialize"));
    out
}

/// Decodes `bytes` as `V2` if written as version 2, else as `V1` and upgraded by `upgrade`. An
/// unknown version is refused.
fn decode<V2, V1>(
    what: &'static str,
    bytes: &[u8],
    upgrade: impl FnOnce(V1) -> Result<V2, DecodeError>,
) -> Result<V2, DecodeError>
where
    V2: DeserializeOwned,
    V1: DeserializeOwned,
{
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let invalid = |e| malformed(what, e);
    match version {
        FORMAT_VERSION => postcard::from_bytes(body).map_err(invalid),
        FORMAT_VERSION_V1 => upgrade(postcard::from_bytes(body).map_err(invalid)?),
        found => Err(DecodeError::UnsupportedVersion { found }),
    }
}

/// Encodes a log entry for `raft_log`.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    encode(entry)
}

/// Decodes a log entry read back from `raft_log`, of either version.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, DecodeError> {
    decode("log entry", bytes, v1::upgrade_entry)
}

/// Encodes a vote.
pub fn encode_vote(vote: &Vote) -> Vec<u8> {
    encode(vote)
}

/// Decodes a vote.
pub fn decode_vote(bytes: &[u8]) -> Result<Vote, DecodeError> {
    decode("vote", bytes, Ok)
}

/// Encodes an optional log id (committed, last applied, last purged).
pub fn encode_log_id(log_id: &Option<LogId>) -> Vec<u8> {
    encode(log_id)
}

/// Decodes an optional log id.
pub fn decode_log_id(bytes: &[u8]) -> Result<Option<LogId>, DecodeError> {
    decode("log id", bytes, Ok)
}

/// Encodes a stored membership.
pub fn encode_membership(membership: &StoredMembership) -> Vec<u8> {
    encode(membership)
}

/// Decodes a stored membership, of either version.
pub fn decode_membership(bytes: &[u8]) -> Result<StoredMembership, DecodeError> {
    decode("membership", bytes, |old: v1::StoredMembershipV1| {
        let membership = v1::upgrade_membership(old.membership())?;
        Ok(StoredMembership::new(*old.log_id(), membership))
    })
}

/// The version 1 layout, kept only to read old bytes: the same openraft types over a `Member`
/// without a name.
pub mod v1 {
    use serde::{Deserialize, Serialize};

    use super::{malformed, BTreeMap, DecodeError, Member};
    use crate::types::{Entry, Membership, NodeId};

    /// `Member` as version 1 wrote it: the `host:port` of the Raft RPC, chat RPC and metrics
    /// listeners.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MemberV1 {
        pub raft_addr: String,
        pub client_addr: String,
        pub metrics_addr: String,
    }

    impl MemberV1 {
        /// The current `Member`, with the empty name that means "written before names".
        pub fn upgrade(&self) -> Member {
            Member {
                raft_addr: self.raft_addr.clone(),
                client_addr: self.client_addr.clone(),
                metrics_addr: self.metrics_addr.clone(),
                name: String::new(),
            }
        }
    }

    openraft::declare_raft_types!(
        /// The type configuration of version 1: as `TypeConfig`, with [`MemberV1`] as node.
        pub TypeConfigV1:
            D = std::sync::Arc<chat_sm::Command>,
            R = chat_sm::ChatResponse,
            NodeId = NodeId,
            Node = MemberV1,
    );

    /// A version 1 log entry.
    pub type EntryV1 = openraft::alias::EntryOf<TypeConfigV1>;
    /// A version 1 membership.
    pub type MembershipV1 = openraft::Membership<NodeId, MemberV1>;
    /// A version 1 stored membership.
    pub type StoredMembershipV1 = openraft::alias::StoredMembershipOf<TypeConfigV1>;

    /// The same membership over current members: same configs, same nodes, empty names.
    ///
    /// # Errors
    /// A voter without a node (a membership openraft would never have written).
    pub fn upgrade_membership(old: &MembershipV1) -> Result<Membership, DecodeError> {
        let nodes: BTreeMap<NodeId, Member> =
            old.nodes().map(|(id, m)| (*id, m.upgrade())).collect();
        Membership::new(old.get_joint_config().clone(), nodes)
            .map_err(|e| malformed("membership", e))
    }

    /// The same entry over current members.
    ///
    /// # Errors
    /// As [`upgrade_membership`].
    pub fn upgrade_entry(old: EntryV1) -> Result<Entry, DecodeError> {
        use openraft::EntryPayload as P;
        let payload = match old.payload {
            P::Blank => P::Blank,
            P::Normal(command) => P::Normal(command),
            P::Membership(m) => P::Membership(upgrade_membership(&m)?),
        };
        Ok(Entry {
            log_id: old.log_id,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_version_is_refused() {
        let mut bytes = encode_vote(&Vote::new(3, 7));
        bytes[0] = 9;
        assert!(matches!(
            decode_vote(&bytes),
            Err(DecodeError::UnsupportedVersion { found: 9 })
        ));
    }

    #[test]
    fn truncated_value_is_malformed_not_a_panic() {
        let bytes = encode_vote(&Vote::new(3, 7));
        for cut in 0..bytes.len() {
            assert!(decode_vote(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(decode_vote(&bytes).unwrap(), Vote::new(3, 7));
    }

    use std::collections::BTreeSet;

    use crate::types::CommittedLeaderId;
    use openraft::vote::RaftLeaderId;
    use openraft::{EntryPayload, Membership};
    use v1::{EntryV1, MemberV1, MembershipV1, StoredMembershipV1};

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(2, 7), index)
    }

    fn member_v1(port: u16) -> MemberV1 {
        MemberV1 {
            raft_addr: format!("127.0.0.1:{port}"),
            client_addr: format!("127.0.0.1:{}", port + 1),
            metrics_addr: format!("127.0.0.1:{}", port + 2),
        }
    }

    /// A joint config with a learner, as version 1 wrote it.
    fn membership_v1() -> MembershipV1 {
        let configs = vec![BTreeSet::from([7, 8]), BTreeSet::from([7, 8, 9])];
        let nodes = BTreeMap::from([
            (7, member_v1(100)),
            (8, member_v1(200)),
            (9, member_v1(300)),
            (10, member_v1(400)),
        ]);
        Membership::new(configs, nodes).unwrap()
    }

    /// Bytes exactly as the version 1 build wrote them: the version byte and postcard of the
    /// openraft value over the name-less member.
    fn v1_bytes<T: Serialize>(value: &T) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION_V1];
        out.extend(postcard::to_allocvec(value).unwrap());
        out
    }

    fn assert_upgraded(
        old: &MembershipV1,
        new: &openraft::Membership<crate::types::NodeId, Member>,
    ) {
        assert_eq!(new.get_joint_config(), old.get_joint_config());
        let new_nodes: Vec<_> = new.nodes().map(|(id, m)| (*id, m.clone())).collect();
        let old_nodes: Vec<_> = old.nodes().map(|(id, m)| (*id, m.upgrade())).collect();
        assert_eq!(new_nodes, old_nodes);
        assert!(new.nodes().all(|(_, m)| m.name.is_empty()));
        assert_eq!(new.learner_ids().collect::<Vec<_>>(), vec![10]);
    }

    #[test]
    fn version_1_membership_entries_decode_with_empty_names() {
        let old = EntryV1 {
            log_id: log_id(5),
            payload: EntryPayload::Membership(membership_v1()),
        };
        let entry = decode_entry(&v1_bytes(&old)).unwrap();
        assert_eq!(entry.log_id, log_id(5));
        let EntryPayload::Membership(m) = &entry.payload else {
            panic!("expected a membership entry: {entry:?}");
        };
        assert_upgraded(&membership_v1(), m);
    }

    #[test]
    fn version_1_blank_and_chat_entries_decode_unchanged() {
        let blank = EntryV1 {
            log_id: log_id(1),
            payload: EntryPayload::Blank,
        };
        assert!(matches!(
            decode_entry(&v1_bytes(&blank)).unwrap().payload,
            EntryPayload::Blank
        ));
        let send = chat_sm::SendCmd {
            channel: "general".into(),
            sender: "alice".into(),
            body: b"hello".to_vec(),
            client_id: chat_sm::ClientId([3; 16]),
            client_seq: 4,
            at_ms: 99,
        };
        let normal = EntryV1 {
            log_id: log_id(2),
            payload: EntryPayload::Normal(chat_sm::Command::Send(send.clone()).into()),
        };
        let entry = decode_entry(&v1_bytes(&normal)).unwrap();
        assert_eq!(entry.log_id, log_id(2));
        assert!(
            matches!(&entry.payload, EntryPayload::Normal(c) if matches!(&**c, chat_sm::Command::Send(s) if *s == send)),
            "{entry:?}"
        );
    }

    #[test]
    fn version_1_stored_membership_vote_and_log_id_decode() {
        let old = StoredMembershipV1::new(Some(log_id(9)), membership_v1());
        let stored = decode_membership(&v1_bytes(&old)).unwrap();
        assert_eq!(*stored.log_id(), Some(log_id(9)));
        assert_upgraded(&membership_v1(), stored.membership());
        assert_eq!(
            decode_vote(&v1_bytes(&Vote::new(3, 7))).unwrap(),
            Vote::new(3, 7)
        );
        assert_eq!(
            decode_log_id(&v1_bytes(&Some(log_id(4)))).unwrap(),
            Some(log_id(4))
        );
    }

    #[test]
    fn version_2_keeps_names_and_is_what_gets_written() {
        let m = membership_v1();
        let nodes: BTreeMap<_, _> = m
            .nodes()
            .map(|(id, old)| {
                (
                    *id,
                    Member {
                        name: format!("n{id}"),
                        ..old.upgrade()
                    },
                )
            })
            .collect();
        let membership = Membership::new(m.get_joint_config().clone(), nodes).unwrap();
        let stored = StoredMembership::new(Some(log_id(3)), membership);
        let bytes = encode_membership(&stored);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode_membership(&bytes).unwrap(), stored);
        // Version 2 bytes are not version 1 bytes: a version 1 reader would have misread them.
        assert_ne!(
            bytes,
            v1_bytes(&StoredMembershipV1::new(Some(log_id(3)), m))
        );
    }

    openraft::declare_raft_types!(
        /// `TypeConfig` with the command held by value, as entries were before they shared it.
        Unshared:
            D = chat_sm::Command,
            R = chat_sm::ChatResponse,
            NodeId = crate::types::NodeId,
            Node = Member,
    );

    /// Sharing the command in memory changed nothing on disk: the bytes are those of the
    /// command held by value, both ways.
    #[test]
    fn a_shared_command_is_written_as_the_command_itself() {
        let command = chat_sm::Command::MarkRead(vec![chat_sm::ReadMark {
            user: "alice".into(),
            channel: "general".into(),
            seq: chat_sm::ChannelSeq(7),
        }]);
        let unshared = openraft::alias::EntryOf::<Unshared> {
            log_id: log_id(5),
            payload: EntryPayload::Normal(command.clone()),
        };
        let shared = Entry {
            log_id: log_id(5),
            payload: EntryPayload::Normal(command.clone().into()),
        };
        let mut plain = vec![FORMAT_VERSION];
        plain.extend(postcard::to_allocvec(&unshared).unwrap());
        assert_eq!(encode_entry(&shared), plain);
        let decoded = decode_entry(&plain).unwrap();
        assert!(
            matches!(&decoded.payload, EntryPayload::Normal(c) if **c == command),
            "{decoded:?}"
        );
    }
}
