//! Parsing of interactive input lines: `/commands` and messages.

/// Longest line sent as a message, in bytes (the cluster's body limit).
pub const LINE_BYTES_MAX: usize = 16 * 1024;
/// Lines `/history` shows without a count.
pub const HISTORY_DEFAULT: u32 = 20;
/// Most lines `/history` shows.
pub const HISTORY_MAX: u32 = 1000;

/// What one input line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A chat message for the current channel.
    Message(String),
    /// `/plain TEXT`: a message sent in the clear even in an encrypted channel.
    Plain(String),
    /// `/reply SEQ TEXT`, `/edit SEQ TEXT`, `/delete SEQ`, `/react SEQ EMOJI`,
    /// `/unreact SEQ EMOJI`: a message about message SEQ of the current channel.
    Relate {
        /// What it does to message SEQ.
        relation: proto::Relation,
        /// Its text (empty for a delete or a reaction).
        text: String,
    },
    /// `/thread N`: message N of the current channel and its replies.
    Thread(u64),
    /// `/search QUERY`.
    Search(String),
    /// `/join #chan`.
    Join(String),
    /// `/dm NAME...` (or `/join @NAME`): the direct conversation with those users.
    Direct(Vec<String>),
    /// `/leave`.
    Leave,
    /// `/channels`.
    Channels,
    /// `/history [n]`.
    History(u32),
    /// `/more [n]`: the n messages before the oldest one shown.
    More(u32),
    /// `/who`.
    Who,
    /// `/servers`.
    Servers,
    /// `/key` alone: ask for the passphrase without echo.
    KeyPrompt,
    /// `/key PASSPHRASE`.
    Key(String),
    /// `/key --clear`.
    KeyClear,
    /// `/create #chan [private]`: make a channel's record, owned by you.
    Create {
        /// The channel.
        channel: String,
        /// Only members read and write it.
        private: bool,
    },
    /// `/invite NAME`: invite a user to the current (private) channel.
    Invite(String),
    /// `/accept #chan`: accept an invitation and join the channel.
    Accept(String),
    /// `/remove NAME`: remove a member or invitation (yourself: leave the channel for good).
    Remove(String),
    /// `/members`: the current channel's owner, members and invitations.
    Members,
    /// `/retention`: how long the current channel keeps its messages.
    RetentionShow,
    /// `/retention POLICY|default`: the owner sets it; `None` follows the cluster default.
    RetentionSet(Option<proto::Retention>),
    /// `/topic`: the current channel's topic.
    TopicShow,
    /// `/topic TEXT|--clear`: the owner sets or clears it.
    TopicSet(Option<String>),
    /// `/mute` (`true`) or `/unmute`: whether the current channel's new messages and
    /// mentions stay quiet (counted, drawn dim, no bell).
    Mute(bool),
    /// `/help`.
    Help,
    /// `/quit`.
    Quit,
}

/// Every command, for Tab completion.
pub const NAMES: &[&str] = &[
    "/join",
    "/dm",
    "/search",
    "/leave",
    "/channels",
    "/history",
    "/more",
    "/who",
    "/servers",
    "/key",
    "/plain",
    "/reply",
    "/edit",
    "/delete",
    "/react",
    "/unreact",
    "/thread",
    "/create",
    "/invite",
    "/accept",
    "/remove",
    "/members",
    "/retention",
    "/topic",
    "/mute",
    "/unmute",
    "/help",
    "/quit",
];

/// The help text of the interactive mode.
pub const HELP: &str = "\
commands:
  /join #chan        switch to a channel (created by its first message)
  /dm NAME...        your direct conversation with one or more users (also /join @NAME),
                     created on first use, end-to-end encrypted to everyone's registered key
  /leave             leave the current channel and go back to the previous one
  /channels          list channels with their message counts
  /history [n]       show the last n messages of this channel (default 20, at most 1000)
  /more [n]          show the n messages before the oldest one shown (page back to the start)
  /who               who wrote here recently
  /servers           every node: role, RTT, applied index, which one you read from
  /key [passphrase]  set this channel's passphrase (asked without echo when not given);
                     /key --clear forgets it; in an encrypted channel, messages are not
                     sent without it
  /plain TEXT        send TEXT in the clear, even in an encrypted channel
  /reply N TEXT      answer message #N (every line shows its #N)
  /edit N TEXT       replace the text of your message #N
  /delete N          erase message #N on every node (yours, or any in a channel you own)
  /react N EMOJI     react to message #N (/unreact N EMOJI takes it back)
  /thread N          message #N and every reply to it
  /search WORDS      messages with all these words, newest first: every plaintext channel
                     (on the servers' index), or this encrypted channel's recent history
                     (searched here); depl* is a prefix, from:NAME and in:#chan filter
  /create #chan [private]
                     create a channel you own; a private one only its members can read
  /invite NAME       invite someone to this private channel (you must own it)
  /accept #chan      accept an invitation and switch to that channel
  /remove NAME       remove a member or invitation; /remove yourself to quit a private channel
  /members           who owns this channel, who is in it and online, who is invited
  /retention [24h|1000|7d,1000|forever|default]
                     show how long this channel keeps messages; its owner sets an age, a
                     count, both, forever, or the cluster default
  /topic [TEXT|--clear]
                     show this channel's topic; its owner sets or clears it
  /mute, /unmute     in the full-screen chat: this channel's new messages and mentions are
                     still counted but drawn dim and never ring the bell
  /help              this text
  /quit              leave (Ctrl-D works too)
anything else is sent as a message to the current channel; start a message with // to send
a line that begins with /";

/// Parses one line. `Err` is the message to show; nothing is sent then.
pub fn parse(line: &str) -> Result<Input, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Err("empty line: nothing sent".to_owned());
    }
    if line.len() > LINE_BYTES_MAX {
        return Err(format!(
            "line is {} bytes, over the {} KiB limit: nothing sent",
            line.len(),
            LINE_BYTES_MAX / 1024
        ));
    }
    if let Some(escaped) = line.strip_prefix("//") {
        return Ok(Input::Message(format!("/{escaped}")));
    }
    let Some(command) = line.strip_prefix('/') else {
        return Ok(Input::Message(line.to_owned()));
    };
    let (name, rest) = command
        .split_once(char::is_whitespace)
        .map_or((command, ""), |(n, r)| (n, r.trim()));
    let no_args = |input: Input| {
        if rest.is_empty() {
            Ok(input)
        } else {
            Err(format!("/{name} takes no arguments"))
        }
    };
    match name {
        "join" | "j" if rest.starts_with('@') => parse_users(rest, "join").map(Input::Direct),
        "join" | "j" => parse_channel(rest).map(Input::Join),
        "dm" | "msg" => parse_users(rest, name).map(Input::Direct),
        "leave" | "part" => no_args(Input::Leave),
        "channels" | "list" => no_args(Input::Channels),
        "history" => parse_count(rest, "history").map(Input::History),
        "more" => parse_count(rest, "more").map(Input::More),
        "who" => no_args(Input::Who),
        "servers" => no_args(Input::Servers),
        "key" => Ok(match rest {
            "" => Input::KeyPrompt,
            "--clear" => Input::KeyClear,
            passphrase => Input::Key(passphrase.to_owned()),
        }),
        "plain" if rest.is_empty() => Err("/plain TEXT: what to send in the clear?".to_owned()),
        "plain" => Ok(Input::Plain(rest.to_owned())),
        "reply" | "edit" | "delete" | "react" | "unreact" => parse_relation(name, rest),
        "thread" => (rest.trim_start_matches('#').parse().ok())
            .filter(|&n: &u64| n > 0)
            .map(Input::Thread)
            .ok_or_else(|| "/thread N: which message (its #N)?".to_owned()),
        "search" | "s" if rest.is_empty() => Err(
            "/search WORDS: what to look for? (depl* for a prefix, from:NAME, in:#chan)".to_owned(),
        ),
        "search" | "s" => Ok(Input::Search(rest.to_owned())),
        "create" => parse_create(rest),
        "invite" => parse_user(rest, "invite").map(Input::Invite),
        "accept" => parse_channel(rest).map(Input::Accept),
        "remove" | "kick" => parse_user(rest, "remove").map(Input::Remove),
        "members" => no_args(Input::Members),
        "topic" => Ok(match rest {
            "" => Input::TopicShow,
            "--clear" => Input::TopicSet(None),
            topic => Input::TopicSet(Some(topic.to_owned())),
        }),
        "mute" => no_args(Input::Mute(true)),
        "unmute" => no_args(Input::Mute(false)),
        "retention" => match rest {
            "" => Ok(Input::RetentionShow),
            "default" => Ok(Input::RetentionSet(None)),
            policy => proto::Retention::parse(policy).map(|r| Input::RetentionSet(Some(r))),
        },
        "help" | "?" => Ok(Input::Help),
        "quit" | "exit" | "q" => no_args(Input::Quit),
        other => Err(format!("unknown command /{other}: type /help for the list")),
    }
}

/// The users of `/dm bob carol` or `--channel @bob,@carol`: names split at spaces or commas,
/// each with or without its `@`, checked against the user name rules.
pub fn parse_users(text: &str, command: &str) -> Result<Vec<String>, String> {
    let names: Vec<&str> = (text.split(|c: char| c == ',' || c.is_whitespace()))
        .map(|n| n.trim_start_matches('@'))
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Err(format!(
            "/{command} whom? give one or more user names, e.g. @bob"
        ));
    }
    if names.len() >= proto::DIRECT_MEMBERS_MAX {
        return Err(format!(
            "a direct conversation has at most {} members with you: use a private channel",
            proto::DIRECT_MEMBERS_MAX
        ));
    }
    match names.iter().find(|n| !proto::valid_user_name(n)) {
        Some(bad) => Err(format!(
            "invalid user name {:?}: use 1 to 32 characters from a-z, A-Z, 0-9, '-' and '_'",
            crate::output::sanitize(bad)
        )),
        None => Ok(names.into_iter().map(str::to_owned).collect()),
    }
}

/// A channel name from user input: `#general` or `general`, lowercased, checked against the
/// server's rules (1 to 64 of a-z, 0-9, '-', '_').
pub fn parse_channel(text: &str) -> Result<String, String> {
    let name = text.trim().trim_start_matches('#').to_ascii_lowercase();
    if name.is_empty() {
        return Err("which channel? use /join #name".to_owned());
    }
    let valid = name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(format!(
            "invalid channel name {text:?}: use 1 to 64 characters from a-z, 0-9, '-' and '_'"
        ))
    }
}

/// `/reply N TEXT`, `/edit N TEXT`, `/delete N`, `/react N EMOJI`, `/unreact N EMOJI`.
fn parse_relation(name: &str, rest: &str) -> Result<Input, String> {
    let usage = || match name {
        "reply" | "edit" => format!("/{name} N TEXT: which message (its #N) and what text?"),
        "delete" => "/delete N: which message (its #N)?".to_owned(),
        _ => format!("/{name} N EMOJI: which message (its #N) and which emoji?"),
    };
    let (seq, text) = rest
        .split_once(char::is_whitespace)
        .map_or((rest, ""), |(seq, text)| (seq, text.trim()));
    let seq: u64 = seq
        .trim_start_matches('#')
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(usage)?;
    let needs_text = name != "delete";
    if needs_text == text.is_empty() {
        return Err(usage());
    }
    let (relation, text) = match name {
        "reply" => (proto::Relation::Reply { to: seq }, text),
        "edit" => (proto::Relation::Edit { of: seq }, text),
        "delete" => (proto::Relation::Delete { of: seq }, ""),
        _ => {
            let relation = proto::Relation::React {
                to: seq,
                emoji: text.to_owned(),
                on: name == "react",
            };
            (relation, "")
        }
    };
    Ok(Input::Relate {
        relation,
        text: text.to_owned(),
    })
}

fn parse_create(rest: &str) -> Result<Input, String> {
    let mut words = rest.split_whitespace();
    let channel = parse_channel(words.next().unwrap_or(""))?;
    let private = match words.next() {
        None => false,
        Some("private" | "--private") => true,
        Some(other) => return Err(format!("/create #chan [private]: unknown option {other:?}")),
    };
    if words.next().is_some() {
        return Err("/create #chan [private]: too many words".to_owned());
    }
    Ok(Input::Create { channel, private })
}

/// A user name from user input, checked against the server's rules.
fn parse_user(text: &str, command: &str) -> Result<String, String> {
    let name = text.trim().trim_start_matches('@');
    if name.is_empty() {
        return Err(format!("/{command} whom? give a user name"));
    }
    if proto::valid_user_name(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "invalid user name {:?}: use 1 to 32 characters from a-z, A-Z, 0-9, '-' and '_'",
            crate::output::sanitize(name)
        ))
    }
}

/// The message count of `/history` and `/more`.
fn parse_count(rest: &str, command: &str) -> Result<u32, String> {
    if rest.is_empty() {
        return Ok(HISTORY_DEFAULT);
    }
    match rest.parse::<u32>() {
        Ok(n) if (1..=HISTORY_MAX).contains(&n) => Ok(n),
        _ => Err(format!("/{command} takes a count from 1 to {HISTORY_MAX}")),
    }
}

/// Whether an input line may carry a passphrase (`/key ...`), and so stays out of the input
/// history.
pub fn may_hold_a_secret(line: &str) -> bool {
    let first = line.split_whitespace().next().unwrap_or("");
    first.eq_ignore_ascii_case("/key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_commands() {
        let cases = [
            ("Hello world!", Ok(Input::Message("Hello world!".into()))),
            (
                "//not a command",
                Ok(Input::Message("/not a command".into())),
            ),
            ("/join #random", Ok(Input::Join("random".into()))),
            ("/join Dev_Ops", Ok(Input::Join("dev_ops".into()))),
            ("/join @Bob", Ok(Input::Direct(vec!["Bob".into()]))),
            ("/dm bob, @carol", Ok(Input::Direct(vec!["bob".into(), "carol".into()]))),
            ("/dm", Err("/dm whom? give one or more user names, e.g. @bob".into())),
            ("/msg a b c d e f g h", Err("a direct conversation has at most 8 members with you: use a private channel".into())),
            ("/dm bo b!", Err("invalid user name \"b!\": use 1 to 32 characters from a-z, A-Z, 0-9, '-' and '_'".into())),
            ("/leave", Ok(Input::Leave)),
            ("/channels", Ok(Input::Channels)),
            ("/history", Ok(Input::History(HISTORY_DEFAULT))),
            ("/history 5", Ok(Input::History(5))),
            ("/more", Ok(Input::More(HISTORY_DEFAULT))),
            ("/more 100", Ok(Input::More(100))),
            ("/who", Ok(Input::Who)),
            ("/servers", Ok(Input::Servers)),
            ("/key", Ok(Input::KeyPrompt)),
            ("/key open sesame", Ok(Input::Key("open sesame".into()))),
            ("/key --clear", Ok(Input::KeyClear)),
            (
                "/create #vault private",
                Ok(Input::Create {
                    channel: "vault".into(),
                    private: true,
                }),
            ),
            (
                "/create lobby",
                Ok(Input::Create {
                    channel: "lobby".into(),
                    private: false,
                }),
            ),
            ("/invite @bob", Ok(Input::Invite("bob".into()))),
            ("/accept #vault", Ok(Input::Accept("vault".into()))),
            ("/remove bob", Ok(Input::Remove("bob".into()))),
            ("/members", Ok(Input::Members)),
            ("/plain hi there", Ok(Input::Plain("hi there".into()))),
            (
                "/reply #12 sure thing",
                Ok(Input::Relate {
                    relation: proto::Relation::Reply { to: 12 },
                    text: "sure thing".into(),
                }),
            ),
            (
                "/delete 3",
                Ok(Input::Relate {
                    relation: proto::Relation::Delete { of: 3 },
                    text: String::new(),
                }),
            ),
            (
                "/unreact 4 👍",
                Ok(Input::Relate {
                    relation: proto::Relation::React {
                        to: 4,
                        emoji: "👍".into(),
                        on: false,
                    },
                    text: String::new(),
                }),
            ),
            ("/thread #12", Ok(Input::Thread(12))),
            ("/help", Ok(Input::Help)),
            ("/retention", Ok(Input::RetentionShow)),
            ("/retention default", Ok(Input::RetentionSet(None))),
            (
                "/retention 24h",
                Ok(Input::RetentionSet(Some(proto::Retention {
                    max_age_ms: Some(86_400_000),
                    max_count: None,
                }))),
            ),
            ("/quit", Ok(Input::Quit)),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), want, "{line:?}");
        }
    }

    #[test]
    fn bad_lines_send_nothing_and_say_why() {
        let cases = [
            ("", "empty line"),
            ("   ", "empty line"),
            ("/frobnicate", "unknown command /frobnicate"),
            ("/thread", "/thread N: which message"),
            ("/thread 0", "/thread N: which message"),
            ("/join", "which channel"),
            ("/join #no spaces", "invalid channel name"),
            ("/join #Ünïcode", "invalid channel name"),
            ("/history 0", "count from 1"),
            ("/history many", "count from 1"),
            ("/quit now", "takes no arguments"),
            ("/create #x secret", "unknown option"),
            ("/invite", "whom?"),
            ("/invite b\u{202e}ob", "invalid user name"),
        ];
        for (line, want) in cases {
            let err = parse(line).expect_err(line);
            assert!(err.contains(want), "{line:?}: {err}");
        }
        let long = "x".repeat(LINE_BYTES_MAX + 1);
        assert!(parse(&long).expect_err("long").contains("16 KiB"));
        assert!(parse(&"x".repeat(LINE_BYTES_MAX)).is_ok());
    }

    #[test]
    fn key_lines_never_reach_the_input_history() {
        assert!(may_hold_a_secret("/key open sesame"));
        assert!(may_hold_a_secret("  /KEY x"));
        assert!(may_hold_a_secret("/key"));
        assert!(!may_hold_a_secret("/keys are fun"));
        assert!(!may_hold_a_secret("hello /key x"));
    }
}
