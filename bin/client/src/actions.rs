//! What the interactive commands do, shared by the line mode and the full-screen client: each
//! returns the lines to show instead of printing them, so both screens say the same thing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use cellchat_client::crypto::{self, ChannelHistory, ChannelKeyV2, CryptoError};
use cellchat_client::{
    ChannelChange, ChannelSecurity, Client, ClientEvent, Error, Shown, WireMessage,
};
use tokio::sync::mpsc;

use crate::output;
use crate::timefmt;

/// Messages `/who` looks at.
const WHO_WINDOW: u32 = 200;

/// Channel keys set in this session, by channel.
pub type Keys = Arc<Mutex<HashMap<String, crypto::Keys>>>;
/// Channels known to be end-to-end encrypted (a crypto record, or encrypted messages seen).
pub type Encrypted = Arc<Mutex<HashSet<String>>>;
/// A line queued for sending: channel, text, and the key to encrypt it with.
pub type Queued = (
    String,
    String,
    Option<ChannelKeyV2>,
    Option<proto::Relation>,
);

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("no task panics while holding this lock")
}

/// What a server said, made safe to show.
fn error_text(e: &Error) -> String {
    output::sanitize(&e.to_string())
}

/// Opens and checks `message` with the keys set here. An encrypted message marks its channel
/// encrypted, so plaintext there is marked from then on.
pub async fn open(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    message: &WireMessage,
) -> Shown {
    let channel_keys = lock(keys)
        .get(&message.channel)
        .cloned()
        .unwrap_or_default();
    if message
        .body
        .first()
        .is_some_and(|&f| crypto::is_encrypted_format(f))
    {
        lock(encrypted).insert(message.channel.clone());
    }
    let history = if lock(encrypted).contains(&message.channel) {
        ChannelHistory::Encrypted
    } else {
        ChannelHistory::Plain
    };
    client.show(&channel_keys, history, message).await
}

/// What to tell a user entering `channel` about its encryption, if anything; marks it
/// encrypted when it is.
pub async fn security_notice(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    channel: &str,
) -> Option<String> {
    if proto::is_direct_channel(channel) && !lock(keys).contains_key(channel) {
        return Some(match client.open_direct_channel(channel).await {
            Ok(direct) => direct_opened(client, keys, encrypted, direct).1,
            Err(e) => {
                lock(encrypted).insert(channel.to_owned());
                format!(
                    "cannot open this direct conversation: {}; nothing is sent here in the clear \
                     unless you use /plain",
                    error_text(&e)
                )
            }
        });
    }
    match client.channel_security(channel).await {
        Ok(ChannelSecurity::Encrypted) => {
            lock(encrypted).insert(channel.to_owned());
            (!lock(keys).contains_key(channel))
                .then(|| format!("#{channel} is end-to-end encrypted: /key sets its passphrase"))
        }
        Ok(ChannelSecurity::RecordGone | ChannelSecurity::RecordChanged) => {
            lock(encrypted).insert(channel.to_owned());
            Some(format!(
                "#{channel}'s encryption record is gone or changed since you first saw it: a \
                 node may be lying. Nothing is sent here in the clear unless you use /plain"
            ))
        }
        Ok(ChannelSecurity::Plain) | Err(_) => None,
    }
}

/// Why a message typed in `channel` must not be sent, if it must not: the channel is
/// encrypted and no passphrase is set. Otherwise the key to send with.
pub fn send_key(
    keys: &Keys,
    encrypted: &Encrypted,
    channel: &str,
) -> Result<Option<ChannelKeyV2>, String> {
    let key = lock(keys).get(channel).and_then(|k| k.v2.clone());
    if key.is_none() && lock(encrypted).contains(channel) {
        return Err(format!(
            "#{channel} is end-to-end encrypted and you have not set its passphrase: nothing \
             sent. Set it with /key, or send in the clear with /plain TEXT"
        ));
    }
    Ok(key)
}

/// The key a `/reply`, `/edit`, `/delete` or `/react` is sealed with: like a message's for a
/// reply or an edit (the cluster keeps an edit in its message's format), none for a delete
/// or a reaction, which carry no text.
pub fn relation_key(
    keys: &Keys,
    encrypted: &Encrypted,
    channel: &str,
    relation: &proto::Relation,
) -> Result<Option<ChannelKeyV2>, String> {
    match relation {
        proto::Relation::Reply { .. } | proto::Relation::Edit { .. } => {
            send_key(keys, encrypted, channel)
        }
        proto::Relation::Delete { .. } | proto::Relation::React { .. } => Ok(None),
    }
}

/// `/key PASSPHRASE`: unlocks (or sets up) the channel's encryption.
pub async fn set_key(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    channel: &str,
    passphrase: &str,
) -> String {
    match client.unlock_channel(channel, passphrase).await {
        Ok(unlocked) => {
            lock(keys).insert(channel.to_owned(), unlocked.keys);
            lock(encrypted).insert(channel.to_owned());
            let ms = unlocked.derive.as_millis();
            if unlocked.created {
                format!(
                    "#{channel}: encryption set up (key derived in {ms} ms); new messages are \
                     end-to-end encrypted and signed: share the passphrase with the others here"
                )
            } else {
                format!(
                    "#{channel}: passphrase accepted (key derived in {ms} ms); messages are \
                     end-to-end encrypted"
                )
            }
        }
        Err(Error::Crypto(CryptoError::WrongPassphrase)) => format!(
            "wrong passphrase for #{channel}: nothing changed; check it with whoever set it"
        ),
        Err(e) => format!("no key set: {}", error_text(&e)),
    }
}

/// How this session shows the direct conversations it opened or listed: channel name to
/// `@bob, carol`. Filled only with member lists checked against the channel name.
static DIRECT_LABELS: LazyLock<Mutex<HashMap<String, String>>> = LazyLock::new(Default::default);

/// How to show `channel` to a user: `@bob, carol` for a direct conversation whose members
/// this session checked, `#name` otherwise.
pub fn label(channel: &str) -> String {
    lock(&DIRECT_LABELS)
        .get(channel)
        .cloned()
        .unwrap_or_else(|| format!("#{channel}"))
}

/// Remembers the label of the direct conversation `channel` between `members` as `me` sees
/// it, when the members give its name (a node cannot make one conversation look like
/// another).
pub fn learn_direct(me: &str, channel: &str, members: &[String]) {
    if members.is_empty() || proto::direct_channel_name(members) != channel {
        return;
    }
    let others: Vec<&str> = (members.iter())
        .filter(|m| *m != me)
        .map(String::as_str)
        .collect();
    let text = if others.is_empty() {
        me.to_owned()
    } else {
        others.join(", ")
    };
    lock(&DIRECT_LABELS).insert(channel.to_owned(), format!("@{text}"));
}

/// `/dm NAME...`: opens (creating when new) the direct conversation with those users and
/// sets its key. Answers the channel to show and a line to say, or why not.
pub async fn open_direct(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    with: &[String],
) -> Result<(String, String), String> {
    let direct = client
        .open_direct(with)
        .await
        .map_err(|e| format!("no direct conversation: {}", error_text(&e)))?;
    Ok(direct_opened(client, keys, encrypted, direct))
}

fn direct_opened(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    direct: cellchat_client::Direct,
) -> (String, String) {
    let me = client.name().unwrap_or_default();
    learn_direct(me, &direct.channel, &direct.members);
    let others = direct.others(me).join(", ");
    lock(keys).insert(direct.channel.clone(), direct.keys);
    lock(encrypted).insert(direct.channel.clone());
    let verb = if direct.created { "started" } else { "opened" };
    let line = format!(
        "{verb} your direct conversation with {others}: end-to-end encrypted to your \
         registered keys"
    );
    (direct.channel, line)
}

/// `/channels`: every channel with its message count and what is special about it.
pub async fn channels(client: &Client, current: &str) -> Vec<String> {
    match client.channels().await {
        Ok(channels) if channels.is_empty() => {
            vec!["no channels yet: send a message to create one".to_owned()]
        }
        Ok(channels) => channels
            .into_iter()
            .map(|c| {
                let mut notes = Vec::new();
                if c.private {
                    notes.push("private".to_owned());
                }
                if c.encrypted {
                    notes.push("encrypted".to_owned());
                }
                if c.invited {
                    notes.push("you are invited: /accept it".to_owned());
                }
                if c.name == current {
                    notes.push("here".to_owned());
                }
                // A channel never read shows no marker: everything in it is new.
                if c.read_to > 0 && c.read_to < c.head {
                    notes.push(format!("new since #{}", c.read_to + 1));
                }
                let notes = if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join(", "))
                };
                learn_direct(client.name().unwrap_or_default(), &c.name, &c.direct);
                // A node chooses what it lists: its names are shown sanitized too.
                format!(
                    "{} {} messages{notes}",
                    output::sanitize(&label(&c.name)),
                    c.head
                )
            })
            .collect(),
        Err(e) => vec![format!("cannot list channels: {}", error_text(&e))],
    }
}

/// Most online users `/members` names in a public channel; the rest are counted.
const ONLINE_LISTED_MAX: usize = 50;

/// `/members`: the channel's owner, members and invitations, and who of them is online (for
/// a public channel, who is online at all: any user may read it).
pub async fn members(client: &Client, channel: &str) -> Vec<String> {
    let detail = match client.channel_info(channel).await {
        Ok(detail) => detail,
        Err(e) => return vec![format!("cannot read #{channel}: {}", error_text(&e))],
    };
    // Presence is a courtesy: without it the list is still right, just without "online".
    let online: Option<HashSet<String>> = client.online().await.ok().map(HashSet::from_iter);
    let owner = detail.info.owner.as_deref().map_or_else(
        || "nobody (a channel from before owners)".to_owned(),
        output::sanitize,
    );
    let kind = if detail.info.private {
        "private"
    } else {
        "public"
    };
    let mut lines = vec![format!("#{channel} is {kind}, owned by {owner}")];
    let list = |names: &[String], mark: bool| {
        names
            .iter()
            .map(|n| match &online {
                Some(online) if mark && online.contains(n) => {
                    format!("{} (online)", output::sanitize(n))
                }
                _ => output::sanitize(n),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if detail.info.private {
        lines.push(format!("members: {}", list(&detail.members, true)));
        if !detail.invited.is_empty() {
            lines.push(format!("invited: {}", list(&detail.invited, false)));
        }
    } else if let Some(online) = &online {
        let mut names: Vec<String> = online.iter().cloned().collect();
        names.sort_unstable();
        let more = names.len().saturating_sub(ONLINE_LISTED_MAX);
        names.truncate(ONLINE_LISTED_MAX);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        lines.push(format!("online: {}{more}", list(&names, false)));
    }
    lines
}

/// `/topic`: the channel's topic.
pub async fn topic(client: &Client, channel: &str) -> Vec<String> {
    match client.channel_info(channel).await {
        Ok(detail) => vec![match detail.topic {
            Some(topic) => format!("#{channel} topic: {}", output::sanitize(&topic)),
            None => format!("#{channel} has no topic; its owner sets one with /topic TEXT"),
        }],
        Err(e) => vec![format!("cannot read #{channel}: {}", error_text(&e))],
    }
}

/// `/topic TEXT|--clear`: the owner sets or clears the topic.
pub async fn set_topic(client: &Client, channel: &str, topic: Option<String>) -> Vec<String> {
    match client
        .change_channel(channel, ChannelChange::SetTopic(topic))
        .await
    {
        Ok(_) => self::topic(client, channel).await,
        Err(e) => vec![format!("topic unchanged: {}", error_text(&e))],
    }
}

/// `/thread N`: message N of `channel` and its replies, one line each, as the line mode
/// prints messages.
/// Messages of an encrypted channel a search reads back and decrypts here.
pub const SEARCH_SCAN: u32 = 10_000;

/// Most matches a search shows.
pub const SEARCH_SHOWN: u32 = 50;

/// `/search QUERY`: in an encrypted channel whose key is set, its newest
/// [`SEARCH_SCAN`] messages decrypted here (no node can read them); elsewhere every plaintext
/// channel this user may read, on the nearest node's index. Newest first.
pub async fn search(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    channel: &str,
    query: &str,
) -> Vec<String> {
    let now = timefmt::now_ms();
    let channel_keys = lock(keys).get(channel).cloned();
    let local = channel_keys.filter(|k| k.v2.is_some() && lock(encrypted).contains(channel));
    let (mut lines, where_) = match local {
        Some(keys) => {
            let found = client
                .search_history(channel, &keys, query, SEARCH_SCAN, SEARCH_SHOWN as usize)
                .await;
            match found {
                Ok(found) => (
                    (found.iter())
                        .map(|(message, shown)| output::line(shown, message, now))
                        .collect::<Vec<_>>(),
                    format!("the last {SEARCH_SCAN} messages of {}", label(channel)),
                ),
                Err(e) => return vec![format!("search failed: {}", error_text(&e))],
            }
        }
        None => match client.search(query, SEARCH_SHOWN).await {
            Ok(reply) => {
                let mut lines = Vec::with_capacity(reply.messages.len());
                for message in &reply.messages {
                    let shown = open(client, keys, encrypted, message).await;
                    let here = output::sanitize(&label(&message.channel));
                    lines.push(format!("{here} {}", output::line(&shown, message, now)));
                }
                if reply.truncated {
                    lines.push(
                        "-- the search stopped early: narrow it to see older matches --".into(),
                    );
                }
                (lines, "plaintext channels".to_owned())
            }
            Err(e) => return vec![format!("search failed: {}", error_text(&e))],
        },
    };
    let count = lines.len();
    let head = match count {
        0 => format!("-- no match in {where_} --"),
        1 => format!("-- 1 match in {where_} --"),
        n => format!("-- {n} matches in {where_}, newest first --"),
    };
    lines.insert(0, head);
    lines
}

pub async fn thread(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    channel: &str,
    seq: u64,
) -> Vec<String> {
    let thread = match client.thread(channel, seq).await {
        Ok(thread) => thread,
        Err(Error::Api(cellchat_client::ApiError::Rejected(
            proto::RejectReason::NoSuchMessage,
        ))) => {
            return vec![format!("#{channel} has no message #{seq}")];
        }
        Err(e) => return vec![format!("cannot read the thread: {}", error_text(&e))],
    };
    let count = thread.replies.len();
    let replies = match count {
        1 => "1 reply".to_owned(),
        n => format!("{n} replies"),
    };
    let now = timefmt::now_ms();
    let mut lines = vec![format!("-- thread of #{seq} in #{channel}: {replies} --")];
    for message in std::iter::once(&thread.target).chain(&thread.replies) {
        let shown = open(client, keys, encrypted, message).await;
        lines.push(output::line(&shown, message, now));
    }
    if !thread.complete {
        lines.push(format!(
            "-- more replies are too far after #{seq} to look for, or expired --"
        ));
    }
    lines
}

/// What to tell a user entering `channel` about its topic, if it has one.
pub async fn topic_notice(client: &Client, channel: &str) -> Option<String> {
    let topic = client.channel_info(channel).await.ok()?.topic?;
    Some(format!("#{channel} topic: {}", output::sanitize(&topic)))
}

/// `/retention`: how long the channel keeps its messages, and since which seq it has them.
pub async fn retention(client: &Client, channel: &str) -> Vec<String> {
    let detail = match client.channel_info(channel).await {
        Ok(detail) => detail,
        Err(e) => return vec![format!("cannot read #{channel}: {}", error_text(&e))],
    };
    let kept = match detail.retention {
        Some(own) => format!("keeps messages for {own} (set by its owner)"),
        None => format!(
            "keeps messages for {} (the cluster default)",
            detail.default_retention
        ),
    };
    let mut lines = vec![format!("#{channel} {kept}")];
    if detail.floor > 1 {
        lines.push(format!("messages before #{} have expired", detail.floor));
    }
    lines
}

/// `/retention POLICY|default`, by the channel's owner.
pub async fn set_retention(
    client: &Client,
    channel: &str,
    retention: Option<proto::Retention>,
) -> Vec<String> {
    let change = ChannelChange::SetRetention(retention);
    match client.change_channel(channel, change).await {
        Ok(_) => self::retention(client, channel).await,
        Err(e) => vec![format!("retention unchanged: {}", error_text(&e))],
    }
}

/// `/who`: who wrote in the channel recently, newest first.
pub async fn who(client: &Client, channel: &str) -> Vec<String> {
    let page = match client.recent(channel, WHO_WINDOW).await {
        Ok(page) => page,
        Err(e) => return vec![format!("cannot read #{channel}: {}", error_text(&e))],
    };
    let mut last: HashMap<String, u64> = HashMap::new();
    for m in &page.messages {
        let at = last.entry(m.sender.clone()).or_default();
        *at = (*at).max(m.at_ms);
    }
    let mut senders: Vec<(String, u64)> = last.into_iter().collect();
    senders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    if senders.is_empty() {
        return vec![format!("nobody has written in #{channel} yet")];
    }
    let now = timefmt::now_ms();
    senders
        .into_iter()
        .map(|(sender, at)| {
            format!(
                "{} (last message {})",
                output::sanitize(&sender),
                timefmt::relative(now, at)
            )
        })
        .collect()
}

/// `/create #chan [private]`.
pub async fn create(client: &Client, channel: &str, private: bool) -> String {
    let change = ChannelChange::Create {
        private,
        crypto: None,
    };
    match client.change_channel(channel, change).await {
        Ok(_) if private => format!(
            "#{channel} created: only its members read it; /invite NAME there to add someone"
        ),
        Ok(_) => format!("#{channel} created; you own it"),
        Err(e) => format!("#{channel} not created: {}", error_text(&e)),
    }
}

/// `/invite NAME` to `channel`.
pub async fn invite(client: &Client, channel: &str, user: &str) -> String {
    let change = ChannelChange::Invite(user.to_owned());
    match client.change_channel(channel, change).await {
        Ok(_) => format!("{user} is invited to #{channel}: they join with /accept #{channel}"),
        Err(e) => format!("not invited: {}", error_text(&e)),
    }
}

/// `/remove NAME` from `channel`.
pub async fn remove(client: &Client, channel: &str, user: &str) -> String {
    let change = ChannelChange::Remove(user.to_owned());
    match client.change_channel(channel, change).await {
        Ok(_) => format!("{user} is no longer in #{channel}"),
        Err(e) => format!("not removed: {}", error_text(&e)),
    }
}

/// `/accept #chan`: `Ok` with the line to show when this user is a member now.
pub async fn accept(client: &Client, channel: &str) -> Result<String, String> {
    match client.change_channel(channel, ChannelChange::Accept).await {
        Ok(_) => Ok(format!("you are a member of #{channel} now")),
        Err(e) => Err(format!("not joined: {}", error_text(&e))),
    }
}

/// Sends queued lines in order, so typing never waits on retries; says what failed.
pub async fn send_loop(
    client: Client,
    mut rx: mpsc::Receiver<Queued>,
    say: impl Fn(String) + Send + 'static,
) {
    while let Some((channel, text, key, relation)) = rx.recv().await {
        let sent = match relation {
            Some(relation) => (client.send_related(&channel, &text, key.as_ref(), relation)).await,
            None => client.send_text(&channel, &text, key.as_ref()).await,
        };
        if let Err(e) = sent {
            say(format!("* not sent to #{channel}: {}", error_text(&e)));
        }
    }
}

/// Says what the client does on its own: rate limits, and moves to another node.
pub async fn event_loop(client: Client, say: impl Fn(String) + Send + 'static) {
    let mut events = client.events();
    loop {
        match events.recv().await {
            Ok(ClientEvent::RateLimited { retry_after_ms }) => say(format!(
                "* rate limited: retrying in {retry_after_ms} ms (nothing is lost)"
            )),
            Ok(ClientEvent::ReaderChanged {
                from: Some(from),
                to,
            }) => {
                let servers = client.servers().await;
                let name = |id: u64| {
                    servers
                        .iter()
                        .find(|s| s.id == id && !s.name.is_empty())
                        .map_or_else(|| format!("n{id}"), |s| output::sanitize(&s.name))
                };
                say(format!(
                    "* reading from {} now (was {})",
                    name(to),
                    name(from)
                ));
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
