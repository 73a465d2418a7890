//! [`ApiError`], the only error type that crosses the client wire.

use serde::{Deserialize, Serialize};

use crate::types::LeaderHint;

/// Why a [`Chat`](crate::Chat) call failed.
///
/// Small and serializable; handlers map internal errors into it and `io::Error` text never
/// crosses the wire. The `Display` text says what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    /// This node does not lead; writes must go to the leader.
    #[error("this node is not the leader: {}", leader_advice(.leader))]
    NotLeader {
        /// The leader, if this node knows it.
        leader: Option<LeaderHint>,
    },
    /// The node cannot serve right now. `reason` comes from a short fixed vocabulary (see
    /// [`ApiError::unavailable`]).
    #[error("node unavailable ({reason}): retry shortly or try another node")]
    Unavailable {
        /// For example "no leader", "starting", "shutting down", "overloaded".
        reason: String,
    },
    /// Leadership changed while the write was in flight; its outcome is unknown.
    #[error("leadership changed during the request: retry with the same client seq")]
    Aborted,
    /// The request is invalid and retrying it unchanged will fail again.
    #[error("request rejected: {0}")]
    Rejected(RejectReason),
    /// Too many requests from this user or connection.
    #[error("rate limited: retry after {retry_after_ms} ms")]
    RateLimited {
        /// How long to wait before the next attempt.
        retry_after_ms: u64,
    },
    /// The call needs a successful `hello` (and, for sends, `login`) on this connection.
    #[error("not authenticated: call hello, then login, on this connection first")]
    Unauthenticated,
    /// The client speaks a protocol version this node does not.
    #[error("unsupported protocol version {theirs} (node speaks {ours}): upgrade the older side")]
    UnsupportedProtocol {
        /// The node's version.
        ours: u16,
        /// The client's version.
        theirs: u16,
    },
    /// The client asked for a different cluster.
    #[error("wrong cluster {theirs:?} (node belongs to {ours:?}): check the cluster name")]
    WrongCluster {
        /// The node's cluster.
        ours: String,
        /// The cluster the client asked for.
        theirs: String,
    },
    /// The node gave up waiting (for a commit or for `read_token` to be applied).
    #[error("timed out on the node: retry, with the same client seq for sends")]
    Timeout,
}

impl ApiError {
    /// `Unavailable` with a reason from the fixed vocabulary; taking `&'static str` keeps
    /// request data and error text out of it.
    pub fn unavailable(reason: &'static str) -> Self {
        Self::Unavailable {
            reason: reason.to_owned(),
        }
    }

    /// Whether the same request may succeed if retried (possibly elsewhere or later).
    ///
    /// Sends are safe to retry because `(client_id, client_seq)` makes them idempotent.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NotLeader { .. }
            | Self::Unavailable { .. }
            | Self::Aborted
            | Self::RateLimited { .. }
            | Self::Timeout => true,
            Self::Rejected(_)
            | Self::Unauthenticated
            | Self::UnsupportedProtocol { .. }
            | Self::WrongCluster { .. } => false,
        }
    }
}

fn leader_advice(leader: &Option<LeaderHint>) -> String {
    match leader {
        Some(hint) => format!("retry at node {} ({})", hint.id, hint.client_addr),
        None => "leader unknown, retry shortly or try another node".to_owned(),
    }
}

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RejectReason {
    /// The channel name breaks the naming rules.
    #[error("invalid channel name: use 1 to 64 characters from a-z, 0-9, '-' and '_'")]
    InvalidChannel,
    /// Empty message bodies are not stored.
    #[error("empty message body: send at least one byte")]
    EmptyBody,
    /// The body exceeds the node's limit.
    #[error("message body is {len} bytes, over the limit of {max}: shorten it")]
    BodyTooLarge {
        /// Body length in bytes.
        len: u64,
        /// Limit in bytes.
        max: u64,
    },
    /// The user name breaks the naming rules.
    #[error("invalid user name: use 1 to 32 characters from a-z, A-Z, 0-9, '-' and '_'")]
    InvalidName,
    /// The name is registered to another key, or the signature does not verify.
    #[error("name is taken by another key: pick another name or use your own key")]
    NameTaken,
    /// A field could not be understood.
    #[error("malformed request ({what}): fix the client")]
    Malformed {
        /// Which field, from a fixed vocabulary such as "signature" or "history range".
        what: String,
    },
    /// The channel is private and the caller is not a member.
    #[error("the channel is private and you are not a member: ask its owner for an invitation")]
    NotMember,
    /// Only the channel's owner may make that change.
    #[error("only the channel's owner may do that")]
    NotOwner,
    /// The channel exists already (a private channel must be created before its first message).
    #[error("the channel exists already: pick another name")]
    ChannelExists,
    /// The caller has no invitation to the channel.
    #[error("you have no invitation to this channel")]
    NotInvited,
    /// No user of that name is registered (a name registers with its first message).
    #[error("no user of that name is registered: they must send a message first")]
    UnknownUser,
    /// A per-user or per-channel bound was reached.
    #[error("limit reached: {what} (at most {max})")]
    LimitReached {
        /// Which bound, from a fixed vocabulary ("channels you own", "members and invitations").
        what: String,
        /// The bound.
        max: u64,
    },
    /// Members and invitations exist only in private channels.
    #[error("the channel is public: everyone may read and write it")]
    NotPrivate,
    /// The channel's encryption record is set and never changes.
    #[error("the channel's encryption is set already and never changes")]
    CryptoAlreadySet,
    /// The owner cannot leave their private channel.
    #[error("the owner cannot leave the channel")]
    OwnerCannotLeave,
    /// A retention outside the bounds.
    #[error("retention out of bounds: an age from 1 minute to 100 years, a count of at least 1")]
    InvalidRetention,
    /// A retry of a send first made longer ago than the node remembers sends: it may have been
    /// stored then, so it is not stored again.
    #[error(
        "this retry comes more than {window_hours} h after the first attempt: it was not stored \
         again (it may have been stored then; look in the channel's history)"
    )]
    RetryExpired {
        /// How long sends are remembered for retries, in hours.
        window_hours: u64,
    },
    /// A reply, edit, delete or reaction names a seq the channel does not hold.
    #[error("no such message in this channel (never sent, or expired)")]
    NoSuchMessage,
    /// A relation names an edit, delete or reaction instead of a message.
    #[error("that seq is an edit, delete or reaction: name the message itself")]
    NotATarget,
    /// The message was deleted.
    #[error("the message was deleted")]
    MessageDeleted,
    /// Only the sender edits a message; the sender or the channel's owner deletes it.
    #[error(
        "only the sender may edit a message (and the sender or the channel's owner delete it)"
    )]
    NotSender,
    /// An edit must keep its message's format.
    #[error("an edit keeps the message's format: an encrypted message is edited encrypted")]
    EditFormatChanged,
    /// A reaction breaks the emoji rules.
    #[error("a reaction is 1 to 32 bytes without spaces or control characters")]
    InvalidReaction,
    /// The user has that reaction on the message already.
    #[error("you reacted so already")]
    AlreadyReacted,
    /// The user has no such reaction on the message.
    #[error("you have no such reaction on the message")]
    NotReacted,
    /// A topic too long or not one line.
    #[error("a topic is one line of at most 256 bytes")]
    InvalidTopic,
    /// A direct conversation not named after its members, or with too few or too many, or
    /// without the caller.
    #[error("a direct conversation is named after its 2 to 8 members, you among them")]
    InvalidDirect,
    /// A change to a direct conversation, or a `dm-` name used for another channel.
    #[error("direct conversations are created with their members, which never change")]
    DirectChannel,
    /// A search query the language refuses.
    #[error("bad search query: {0}")]
    BadQuery(crate::search::QueryError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case(ApiError::NotLeader { leader: None } => true)]
    #[test_case(ApiError::unavailable("no leader") => true)]
    #[test_case(ApiError::Aborted => true)]
    #[test_case(ApiError::RateLimited { retry_after_ms: 5 } => true)]
    #[test_case(ApiError::Timeout => true)]
    #[test_case(ApiError::Rejected(RejectReason::EmptyBody) => false)]
    #[test_case(ApiError::Unauthenticated => false)]
    #[test_case(ApiError::UnsupportedProtocol { ours: 1, theirs: 2 } => false)]
    #[test_case(ApiError::WrongCluster { ours: "a".into(), theirs: "b".into() } => false)]
    fn retryable(err: ApiError) -> bool {
        err.is_retryable()
    }

    #[test]
    fn display_says_what_to_do() {
        let hint = LeaderHint {
            id: 3,
            client_addr: "127.0.0.1:7000".parse().expect("addr"),
        };
        let cases = [
            (
                ApiError::NotLeader { leader: Some(hint) },
                "retry at node 3 (127.0.0.1:7000)",
            ),
            (ApiError::NotLeader { leader: None }, "leader unknown"),
            (
                ApiError::unavailable("starting"),
                "node unavailable (starting)",
            ),
            (
                ApiError::RateLimited {
                    retry_after_ms: 250,
                },
                "retry after 250 ms",
            ),
            (
                ApiError::Rejected(RejectReason::BodyTooLarge { len: 10, max: 5 }),
                "10 bytes, over the limit of 5",
            ),
            (
                ApiError::UnsupportedProtocol { ours: 1, theirs: 9 },
                "version 9 (node speaks 1)",
            ),
            (ApiError::Aborted, "same client seq"),
        ];
        for (err, want) in cases {
            let text = err.to_string();
            assert!(text.contains(want), "{text:?} lacks {want:?}");
            assert!(!text.ends_with('.'), "{text:?} ends with a period");
        }
    }
}
