//! Direct conversations: found by their members' names, created on first use, encrypted to
//! the members' identity keys ([`crate::crypto::create_direct`]).

use std::collections::HashMap;

use proto::{ApiError, ChannelChange, RejectReason};

use crate::authors::ChannelSecurity;
use crate::crypto::{self, Keys};
use crate::{Client, Error, SenderKey};

/// A direct conversation opened by [`Client::open_direct`].
#[derive(Debug, Clone)]
pub struct Direct {
    /// Its channel name ([`proto::direct_channel_name`] of the members).
    pub channel: String,
    /// Every member, this user included, sorted.
    pub members: Vec<String>,
    /// The conversation's keys: `keys.v2` for [`Client::send_text`], all of them for
    /// [`Client::show`].
    pub keys: Keys,
    /// Whether this call created the conversation.
    pub created: bool,
}

impl Direct {
    /// The members other than `me`, for a title like `@bob, carol`.
    pub fn others(&self, me: &str) -> Vec<String> {
        self.members.iter().filter(|m| *m != me).cloned().collect()
    }
}

/// The sorted, distinct members of the conversation of `me` with `with`.
///
/// # Errors
///
/// [`Error::Api`] with `InvalidName` for a name that is not a user name, `InvalidDirect` for
/// fewer than one other or more than [`proto::DIRECT_MEMBERS_MAX`] members in all.
pub fn direct_members_of(me: &str, with: &[String]) -> Result<Vec<String>, Error> {
    let refuse = |reason| Err(Error::Api(ApiError::Rejected(reason)));
    if with.iter().any(|n| !proto::valid_user_name(n)) {
        return refuse(RejectReason::InvalidName);
    }
    let mut members: Vec<String> = with.to_vec();
    members.push(me.to_owned());
    members.sort();
    members.dedup();
    if !(2..=proto::DIRECT_MEMBERS_MAX).contains(&members.len()) {
        return refuse(RejectReason::InvalidDirect);
    }
    Ok(members)
}

impl Client {
    /// Opens the direct conversation between this user and `with` (one or more user names,
    /// at most 7 others): creates it, encrypted to every member's registered key as this
    /// client pinned it, when it does not exist yet, then checks its record (members, the
    /// creator's signature under the pinned key, the record this client pinned for the
    /// channel) and unseals this user's key.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `UnknownUser` when a member is not registered, `InvalidName` or
    /// `InvalidDirect` for a bad member list; [`Error::Crypto`] with
    /// [`crypto::CryptoError::Direct`] when the record does not check;
    /// [`Error::ChannelRecordChanged`] when it differs from the one pinned; as
    /// [`channel_info`](Self::channel_info) and [`change_channel`](Self::change_channel).
    pub async fn open_direct(&self, with: &[String]) -> Result<Direct, Error> {
        let me = self.name().ok_or(Error::NoIdentity)?.to_owned();
        let members = direct_members_of(&me, with)?;
        let channel = proto::direct_channel_name(&members);
        let own_key = self.identity().ok_or(Error::NoIdentity)?.public_key();
        let mut keys = HashMap::new();
        for member in &members {
            // This user's own key is known here, and a name not registered yet registers
            // with the change that creates the conversation.
            let key = if *member == me {
                SenderKey::Pinned(own_key)
            } else {
                self.sender_key(member).await
            };
            keys.insert(member.clone(), key);
        }
        let mut created = false;
        let record = match self.channel_info(&channel).await?.crypto {
            Some(record) => record,
            None => {
                let mut wrap_to = Vec::with_capacity(members.len());
                for member in &members {
                    match keys[member] {
                        SenderKey::Pinned(key) | SenderKey::Changed { pinned: key, .. } => {
                            wrap_to.push((member.clone(), key));
                        }
                        SenderKey::Unknown => {
                            return Err(Error::Api(ApiError::Rejected(RejectReason::UnknownUser)))
                        }
                    }
                }
                let identity = self.identity().ok_or(Error::NoIdentity)?;
                let (_, record) =
                    crypto::create_direct(identity, self.cluster_name(), &channel, &wrap_to)
                        .map_err(crypto::CryptoError::Direct)?;
                let change = ChannelChange::CreateDirect {
                    members: members.clone(),
                    crypto: record.clone(),
                };
                match self.change_channel(&channel, change).await {
                    Ok(_) => {
                        created = true;
                        record
                    }
                    // Made meanwhile, by another member or by a retry of this call whose
                    // answer was lost: use the record stored.
                    Err(Error::Api(ApiError::Rejected(RejectReason::ChannelExists))) => {
                        self.channel_info(&channel).await?.crypto.ok_or(
                            Error::ChannelRecordChanged {
                                channel: channel.clone(),
                            },
                        )?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if self.authors_channel_security(&channel, &record) != ChannelSecurity::Encrypted {
            return Err(Error::ChannelRecordChanged { channel });
        }
        let identity = self.identity().ok_or(Error::NoIdentity)?;
        let key = crypto::open_direct(identity, self.cluster_name(), &channel, &record, |c| {
            keys.get(c).and_then(|k| k.verify_with())
        })
        .map_err(crypto::CryptoError::Direct)?;
        Ok(Direct {
            channel,
            members,
            keys: Keys {
                v2: Some(key),
                v1: None,
            },
            created,
        })
    }
}

impl Client {
    /// [`open_direct`](Self::open_direct) by the conversation's channel name, for a
    /// conversation someone else started: its members come from the node and are checked
    /// against the name.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `NotMember` when this user is not a member or the conversation does
    /// not exist as far as this client can know (its read token does not cover another user's
    /// creation until it hears of it), `InvalidDirect` when the node's member list does not
    /// give the name (a node lies); as [`open_direct`](Self::open_direct).
    pub async fn open_direct_channel(&self, channel: &str) -> Result<Direct, Error> {
        let me = self.name().ok_or(Error::NoIdentity)?.to_owned();
        let members = self.channel_info(channel).await?.info.direct;
        if members.is_empty() {
            return Err(Error::Api(ApiError::Rejected(RejectReason::NotMember)));
        }
        if proto::direct_channel_name(&members) != channel {
            return Err(Error::Api(ApiError::Rejected(RejectReason::InvalidDirect)));
        }
        if !members.contains(&me) {
            return Err(Error::Api(ApiError::Rejected(RejectReason::NotMember)));
        }
        self.open_direct(&members).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_sorted_distinct_and_bounded() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            direct_members_of("bob", &names(&["carol", "alice", "bob"])).unwrap(),
            ["alice", "bob", "carol"]
        );
        let refused = |with: &[&str]| match direct_members_of("bob", &names(with)) {
            Err(Error::Api(ApiError::Rejected(reason))) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(&["bob"]),
            RejectReason::InvalidDirect,
            "only yourself"
        );
        assert_eq!(refused(&[]), RejectReason::InvalidDirect);
        assert_eq!(refused(&["a b"]), RejectReason::InvalidName);
        let eight: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
        let eight: Vec<&str> = eight.iter().map(String::as_str).collect();
        assert_eq!(refused(&eight), RejectReason::InvalidDirect, "nine in all");
        assert_eq!(
            direct_members_of("bob", &names(&eight[..7])).unwrap().len(),
            8
        );
    }
}
