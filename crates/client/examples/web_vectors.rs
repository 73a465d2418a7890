//! Test vectors for the web client's crypto (`web/static/js/crypto.js`), made by this crate's
//! own code so the JavaScript is checked against the formats as Rust writes and reads them.
//!
//! - `cargo run --release -p cellchat-client --example web_vectors > vectors.json` prints one
//!   JSON document: fixed identities, login messages, signed bodies (deterministic, so the
//!   JavaScript must reproduce them byte for byte), bodies sealed under v2 channel records, a
//!   v1 key and a direct conversation, each with what `open_related` says of it, key files,
//!   direct records (with what `open_direct` says of each), direct channel names, and
//!   signatures at the edges of `verify_strict`.
//! - `... --example web_vectors -- --verify js.json` reads what `web/build/check_vectors.mjs
//!   --emit js.json` made in JavaScript (login signatures, bodies, records, key files, a direct
//!   record) and checks each with the Rust API; it exits 1 naming every failure.
//!
//! Byte strings are lowercase hex; u64 client seqs are decimal strings (JSON numbers lose
//! precision above 2^53 in JavaScript); relations are as serde writes `proto::Relation`.

use std::path::Path;

use cellchat_client::crypto::{
    self, Argon2Params, Author, ChannelHistory, ChannelKey, ChannelKeyV2, Content, DirectError,
    Keys, Seen, UnreadableReason,
};
use cellchat_client::identity::{self, KeyProtection};
use cellchat_client::{Identity, Relation};
use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::CompressedEdwardsY;
use curve25519_dalek::Scalar;
use serde_json::{json, Value};

const CLUSTER: &str = "cellchat";
/// The cheapest Argon2id parameters the v2 bounds accept (memory × passes at v1's floor), so
/// the vectors check fast; one record keeps the defaults.
const CHEAP: Argon2Params = Argon2Params {
    memory_kib: 19_456,
    passes: 2,
    lanes: 1,
};
const NAMES: [&str; 4] = ["alice", "bob", "carol", "mallory"];
const DIRECT_MEMBERS: [&str; 3] = ["alice", "bob", "carol"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.as_slice() {
        [] => generate().map(|doc| println!("{doc:#}")),
        [flag, file] if flag == "--verify" => verify_file(Path::new(file)),
        _ => Err(vec!["usage: web_vectors [--verify FILE]".to_owned()]),
    };
    if let Err(failures) = outcome {
        for failure in &failures {
            eprintln!("web_vectors: {failure}");
        }
        std::process::exit(1);
    }
}

/// A fixed seed per identity: distinct, and not one repeated byte, so a byte-order mistake
/// shows.
fn seed_of(name: &str) -> [u8; 32] {
    let tag = NAMES.iter().position(|n| *n == name).expect("a known name") as u8 + 1;
    std::array::from_fn(|i| tag.wrapping_mul(29).wrapping_add((i as u8).wrapping_mul(7)) ^ 0x5a)
}

fn id(name: &str) -> Identity {
    Identity::ephemeral(name, Some(seed_of(name)))
}

fn client_id(tag: u8) -> [u8; 16] {
    std::array::from_fn(|i| tag ^ (i as u8 * 17))
}

fn hex(bytes: impl AsRef<[u8]>) -> String {
    hex::encode(bytes)
}

fn relation_json(relation: Option<&Relation>) -> Value {
    serde_json::to_value(relation).expect("a relation serializes")
}

fn relations() -> Vec<Option<Relation>> {
    vec![
        None,
        Some(Relation::Reply { to: 3 }),
        Some(Relation::Edit { of: 5 }),
        Some(Relation::Delete {
            of: 9_007_199_254_740_991,
        }),
        Some(Relation::React {
            to: 5,
            emoji: "👍".into(),
            on: true,
        }),
        Some(Relation::React {
            to: 7,
            emoji: "🎉".into(),
            on: false,
        }),
    ]
}

/// Texts around the padding buckets (64 bytes holds 62 bytes of text; a 2-byte character
/// crosses into the next) and across UTF-8 widths.
fn texts() -> Vec<String> {
    vec![
        String::new(),
        "hello".into(),
        "héllo wörld — ünïcödé ☕ 日本語 𝄞 👩‍👩‍👧".into(),
        "a".repeat(62),
        "a".repeat(63),
        format!("{}é", "b".repeat(61)),
        "\u{feff}starts with a BOM".into(),
        "日本".repeat(200),
    ]
}

fn generate() -> Result<Value, Vec<String>> {
    let records = records()?;
    let v1 = ChannelKey::derive("v1 passphrase", CLUSTER, "general").map_err(err)?;
    let direct = direct()?;
    let mut cases = Vec::new();
    cases.extend(record_cases(&records));
    cases.extend(v1_cases(&v1));
    cases.extend(odd_cases());
    cases.extend(direct_message_cases(&direct));
    Ok(json!({
        "format": "cellchat-web-vectors-v1",
        "cluster": CLUSTER,
        "identities": identities(),
        "logins": logins(),
        "sessions": (0..3u8).map(|t| json!({
            "client_id": hex(client_id(t)),
            "session": hex(crypto::session_of(client_id(t))),
        })).collect::<Vec<_>>(),
        "bound_channels": relations().iter().map(|r| json!({
            "channel": "general",
            "relation": relation_json(r.as_ref()),
            "bound": crypto::bound_channel("general", r.as_ref()),
        })).collect::<Vec<_>>(),
        "signed": signed()?,
        "records": records.iter().map(|r| &r.json).collect::<Vec<_>>(),
        "v1_keys": [{"id": "v1", "channel": "general", "passphrase": "v1 passphrase"}],
        "open_cases": cases,
        "key_files": key_files()?,
        "direct": direct.json,
        "direct_cases": direct_cases(&direct),
        "direct_names": direct_names(),
        "signatures": signature_cases(),
    }))
}

fn err(e: impl std::fmt::Display) -> Vec<String> {
    vec![e.to_string()]
}

fn identities() -> Value {
    NAMES
        .iter()
        .map(|name| {
            let id = id(name);
            let entry = json!({"seed": hex(seed_of(name)), "public_key": hex(id.public_key())});
            ((*name).to_owned(), entry)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn logins() -> Vec<Value> {
    let cases = [
        ("alice", [0u8; 32]),
        ("bob", std::array::from_fn(|i| i as u8)),
    ];
    cases
        .iter()
        .map(|(name, challenge)| {
            let binding = proto::web_binding(challenge);
            let message = proto::login_message(challenge, &binding, CLUSTER, name);
            json!({
                "challenge": hex(challenge),
                "binding": hex(binding),
                "cluster": CLUSTER,
                "name": name,
                "message": hex(&message),
                "signature": hex(id(name).sign(&message)),
            })
        })
        .collect()
}

/// Signed plaintext bodies: deterministic (no nonce; Ed25519 signatures are deterministic).
fn signed() -> Result<Vec<Value>, Vec<String>> {
    let mut out = Vec::new();
    let mut cases: Vec<(&str, Option<Relation>, String, u64)> = Vec::new();
    for (i, text) in texts().into_iter().enumerate() {
        cases.push(("general", None, text, i as u64 + 1));
    }
    for (i, relation) in relations().into_iter().enumerate() {
        cases.push((
            "café-☕",
            relation,
            "with a relation".into(),
            100 + i as u64,
        ));
    }
    cases.push(("general", None, "largest seq".into(), u64::MAX));
    for (channel, relation, text, seq) in cases {
        let body = crypto::sign_plain_related(
            &id("alice"),
            CLUSTER,
            channel,
            relation.as_ref(),
            client_id(1),
            seq,
            &text,
        )
        .map_err(err)?;
        out.push(json!({
            "sender": "alice",
            "channel": channel,
            "relation": relation_json(relation.as_ref()),
            "client_id": hex(client_id(1)),
            "client_seq": seq.to_string(),
            "text": text,
            "body": hex(body),
        }));
    }
    Ok(out)
}

/// A channel record with its key, and its JSON entry.
struct Record {
    id: &'static str,
    channel: &'static str,
    key: ChannelKeyV2,
    json: Value,
}

fn records() -> Result<Vec<Record>, Vec<String>> {
    let made = [
        ("cheap", "general", "correct horse ☕", Some(CHEAP)),
        ("default", "random", "default parameters", None),
    ];
    let mut out = Vec::new();
    for (id, channel, passphrase, params) in made {
        let (key, record) = match params {
            Some(params) => ChannelKeyV2::create_with(params, passphrase, CLUSTER, channel),
            None => ChannelKeyV2::create(passphrase, CLUSTER, channel),
        }
        .map_err(err)?;
        let params = crypto::ChannelRecord::decode(&record)
            .map_err(err)?
            .params();
        let json = json!({
            "id": id,
            "channel": channel,
            "passphrase": passphrase,
            "wrong_passphrase": format!("{passphrase}!"),
            "params": {
                "memory_kib": params.memory_kib,
                "passes": params.passes,
                "lanes": params.lanes,
            },
            "record": hex(record),
        });
        out.push(Record {
            id,
            channel,
            key,
            json,
        });
    }
    Ok(out)
}

/// One body as a reader opens it: the inputs of `open_related` and what it found.
#[derive(Clone)]
struct Case<'a> {
    note: String,
    channel: &'a str,
    relation: Option<Relation>,
    sender: &'a str,
    client_seq: u64,
    /// The pinned key of this identity, if any.
    pinned: Option<&'a str>,
    /// The v2 key's id in the vectors and the key.
    v2: Option<(&'a str, &'a ChannelKeyV2)>,
    v1: Option<&'a ChannelKey>,
    body: Vec<u8>,
}

impl Case<'_> {
    fn to_json(&self) -> Value {
        let keys = Keys {
            v2: self.v2.map(|(_, key)| key.clone()),
            v1: self.v1.cloned(),
        };
        let pinned = self.pinned.map(|name| id(name).public_key());
        let opened = crypto::open_related(
            &keys,
            CLUSTER,
            self.channel,
            self.relation.as_ref(),
            self.sender,
            self.client_seq,
            pinned,
            &self.body,
        );
        let (text, reason) = content_json(opened.content());
        json!({
            "note": self.note,
            "channel": self.channel,
            "relation": relation_json(self.relation.as_ref()),
            "sender": self.sender,
            "client_seq": self.client_seq.to_string(),
            "sender_key": pinned.map(hex),
            "keys": {"v2": self.v2.map(|(id, _)| id), "v1": self.v1.map(|_| "v1")},
            "body": hex(&self.body),
            "expect": {
                "author": author_json(opened.author()),
                "text": text,
                "reason": reason,
                // The line the CLI prints, with the markers of each kind of channel history.
                "line_plain": opened.display(ChannelHistory::Plain, Seen::First),
                "line_encrypted": opened.display(ChannelHistory::Encrypted, Seen::First),
            },
        })
    }
}

fn author_json(author: Author) -> &'static str {
    match author {
        Author::Verified => "verified",
        Author::BadSignature => "bad-signature",
        Author::UnknownSender => "unknown-sender",
        Author::Unsigned => "unsigned",
    }
}

/// The text, or why there is none, in crypto.js's words.
fn content_json(content: &Content) -> (Option<&str>, Option<&'static str>) {
    let reason = match content {
        Content::Clear(text) => return (Some(text), None),
        Content::NoKey => "no-key",
        Content::WrongKey => "wrong-key",
        Content::Unreadable(UnreadableReason::Empty) => "empty",
        Content::Unreadable(UnreadableReason::TooShort) => "too-short",
        Content::Unreadable(UnreadableReason::NotUtf8) => "not-utf8",
        Content::Unreadable(UnreadableReason::BadPadding) => "bad-padding",
        Content::UnknownVersion(_) => "unknown-version",
    };
    (None, Some(reason))
}

/// Bodies sealed under each record, opened as they are and, for some, with one thing changed.
fn record_cases(records: &[Record]) -> Vec<Value> {
    let mut cases = Vec::new();
    for record in records {
        let mut seals: Vec<(String, Option<Relation>, String, u64)> = Vec::new();
        for (i, text) in texts().into_iter().enumerate() {
            // The default parameters need one body; the cheap record carries the rest.
            if record.id == "cheap" || text == "hello" {
                seals.push((format!("{} text {i}", record.id), None, text, 10 + i as u64));
            }
        }
        if record.id == "cheap" {
            for (i, relation) in relations().into_iter().enumerate().skip(1) {
                let note = format!("cheap relation {i}");
                seals.push((note, relation, "related".into(), 50 + i as u64));
            }
            let longest = "z".repeat(crypto::TEXT_BYTES_MAX_ENCRYPTED);
            seals.push(("cheap longest text".into(), None, longest, 60));
        }
        for (note, relation, text, seq) in seals {
            let changed = text == "hello" || relation.is_some();
            let case = sealed_case(record, note, relation, &text, seq);
            if changed {
                cases.extend(Change::ALL.map(|change| change.apply(&case)));
            }
            cases.push(case);
        }
    }
    cases.extend(forged_cases(&records[0]));
    cases.iter().map(Case::to_json).collect()
}

/// A body alice sealed under `record`, opened by a reader who pinned her key.
fn sealed_case<'a>(
    record: &'a Record,
    note: String,
    relation: Option<Relation>,
    text: &str,
    seq: u64,
) -> Case<'a> {
    let body = crypto::seal_v2_related(
        &record.key,
        &id("alice"),
        CLUSTER,
        record.channel,
        relation.as_ref(),
        client_id(2),
        seq,
        text,
    )
    .expect("seal");
    Case {
        note,
        channel: record.channel,
        relation,
        sender: "alice",
        client_seq: seq,
        pinned: Some("alice"),
        v2: Some((record.id, &record.key)),
        v1: None,
        body,
    }
}

/// One thing a node (or a reader's state) changes about a body.
#[derive(Clone, Copy)]
enum Change {
    /// The node names bob as the sender.
    Relabel,
    /// The reader has pinned no key for the sender.
    NoSenderKey,
    /// The reader holds no key for the channel.
    NoChannelKey,
    /// The node shows another relation (or one where there was none).
    Relation,
}

impl Change {
    const ALL: [Change; 4] = [
        Change::Relabel,
        Change::NoSenderKey,
        Change::NoChannelKey,
        Change::Relation,
    ];

    fn apply<'a>(self, case: &Case<'a>) -> Case<'a> {
        let mut changed = case.clone();
        let note = match self {
            Change::Relabel => {
                changed.sender = "bob";
                changed.pinned = Some("bob");
                "relabelled bob"
            }
            Change::NoSenderKey => {
                changed.pinned = None;
                "no sender key"
            }
            Change::NoChannelKey => {
                changed.v2 = None;
                "no channel key"
            }
            Change::Relation => {
                changed.relation = Some(Relation::Reply { to: 1 });
                "relation changed"
            }
        };
        changed.note = format!("{}, {note}", case.note);
        changed
    }
}

/// Mallory, holding the channel key, writes as alice: sealed with her own key, and signed by
/// her key under alice's name.
fn forged_cases(record: &Record) -> Vec<Case<'_>> {
    let fake_alice = Identity::ephemeral("alice", Some(seed_of("mallory")));
    let body = |signer: &Identity| {
        crypto::seal_v2(
            &record.key,
            signer,
            CLUSTER,
            record.channel,
            client_id(3),
            1,
            "pay me",
        )
        .expect("seal")
    };
    [
        ("mallory relabelled as alice", body(&id("mallory"))),
        ("mallory's key under alice's name", body(&fake_alice)),
    ]
    .into_iter()
    .map(|(note, body)| Case {
        note: note.into(),
        channel: record.channel,
        relation: None,
        sender: "alice",
        client_seq: 1,
        pinned: Some("alice"),
        v2: Some((record.id, &record.key)),
        v1: None,
        body,
    })
    .collect()
}

fn v1_cases(v1: &ChannelKey) -> Vec<Value> {
    let sealed = v1.seal("bob", 7, "old v1 message ☕").expect("seal v1");
    let plain = crypto::plain_body("plain v1 ✓");
    let case = |note: &str, sender, seq, key, body: &[u8]| Case {
        note: note.into(),
        channel: "general",
        relation: None,
        sender,
        client_seq: seq,
        pinned: Some("bob"),
        v2: None,
        v1: key,
        body: body.to_vec(),
    };
    [
        case("v1 sealed", "bob", 7, Some(v1), &sealed),
        case("v1 sealed, other seq", "bob", 8, Some(v1), &sealed),
        case("v1 sealed, no key", "bob", 7, None, &sealed),
        case("v1 plaintext", "bob", 7, None, &plain),
    ]
    .iter()
    .map(Case::to_json)
    .collect()
}

/// Bodies no client makes: empty, unknown formats, too short, not UTF-8.
fn odd_cases() -> Vec<Value> {
    let bodies: [(&str, Vec<u8>); 6] = [
        ("empty", vec![]),
        ("unknown format", vec![0x07, 1]),
        ("plaintext not UTF-8", vec![0x00, 0xff]),
        ("signed too short", vec![0x02; 80]),
        ("encrypted too short", vec![0x03; 108]),
        ("v1 encrypted, no key", vec![0x01, 1, 2, 3]),
    ];
    bodies
        .into_iter()
        .map(|(note, body)| {
            Case {
                note: note.into(),
                channel: "general",
                relation: None,
                sender: "alice",
                client_seq: 1,
                pinned: Some("alice"),
                v2: None,
                v1: None,
                body,
            }
            .to_json()
        })
        .collect()
}

/// A direct conversation of alice, bob and carol, made by alice.
struct Direct {
    channel: String,
    key: ChannelKeyV2,
    record: Vec<u8>,
    json: Value,
}

fn member_keys(names: &[&str]) -> Vec<(String, [u8; 32])> {
    names
        .iter()
        .map(|n| ((*n).to_owned(), id(n).public_key()))
        .collect()
}

fn direct() -> Result<Direct, Vec<String>> {
    let channel = proto::direct_channel_name(&DIRECT_MEMBERS);
    let members = member_keys(&DIRECT_MEMBERS);
    let (key, record) =
        crypto::create_direct(&id("alice"), CLUSTER, &channel, &members).map_err(err)?;
    let json = json!({
        "channel": channel,
        "members": DIRECT_MEMBERS,
        "creator": "alice",
        "record": hex(&record),
    });
    Ok(Direct {
        channel,
        key,
        record,
        json,
    })
}

fn direct_message_cases(direct: &Direct) -> Vec<Value> {
    let v2 = Some(("direct", &direct.key));
    [("alice", "to you both", 1), ("bob", "hi ☕", 2)]
        .into_iter()
        .map(|(sender, text, seq)| {
            let body = crypto::seal_v2(
                &direct.key,
                &id(sender),
                CLUSTER,
                &direct.channel,
                client_id(4),
                seq,
                text,
            )
            .expect("seal");
            Case {
                note: format!("direct from {sender}"),
                channel: &direct.channel,
                relation: None,
                sender,
                client_seq: seq,
                pinned: Some(sender),
                v2,
                v1: None,
                body,
            }
            .to_json()
        })
        .collect()
}

fn direct_error_kind(e: &DirectError) -> &'static str {
    match e {
        DirectError::Malformed(_) => "malformed",
        DirectError::WrongMembers => "wrong-members",
        DirectError::NotAMember => "not-a-member",
        DirectError::BadSignature { .. } => "bad-signature",
        DirectError::BadMemberKey { .. } => "bad-member-key",
        DirectError::Unwrap => "unwrap",
    }
}

/// Opens `record` as `reader`; the creator's key is pinned when `creator_known`.
fn open_direct_as(
    reader: &str,
    cluster: &str,
    channel: &str,
    record: &[u8],
    creator_known: bool,
) -> Result<ChannelKeyV2, DirectError> {
    crypto::open_direct(&id(reader), cluster, channel, record, |name| {
        (creator_known && NAMES.contains(&name)).then(|| id(name).public_key())
    })
}

/// Records opened by members and others, intact and changed, with what Rust says of each.
fn direct_cases(direct: &Direct) -> Vec<Value> {
    let flip = |at: usize| {
        let mut record = direct.record.clone();
        record[at] ^= 0x01;
        (format!("byte {at} flipped"), record)
    };
    let fake_alice = Identity::ephemeral("alice", Some(seed_of("mallory")));
    let mut fake_members = member_keys(&DIRECT_MEMBERS);
    fake_members[0].1 = fake_alice.public_key();
    let (_, forged) = crypto::create_direct(&fake_alice, CLUSTER, &direct.channel, &fake_members)
        .expect("a forged record");
    let len = direct.record.len();
    let mut records = vec![("intact".to_owned(), direct.record.clone())];
    records.extend([0, 1, 2, 4, 25, 40, 60, len - 100, len - 1].map(flip));
    records.push(("cut short".into(), direct.record[..len - 1].to_vec()));
    records.push(("made by mallory as alice".into(), forged));
    let mut out = Vec::new();
    for (note, record) in &records {
        let mut readers = vec![("bob", CLUSTER, direct.channel.clone(), true)];
        if note == "intact" {
            readers.push(("alice", CLUSTER, direct.channel.clone(), true));
            readers.push(("carol", CLUSTER, direct.channel.clone(), true));
            readers.push(("mallory", CLUSTER, direct.channel.clone(), true));
            readers.push(("carol", CLUSTER, direct.channel.clone(), false));
            readers.push(("carol", "other", direct.channel.clone(), true));
            let pair = proto::direct_channel_name(&["alice", "bob"]);
            readers.push(("bob", CLUSTER, pair, true));
        }
        for (reader, cluster, channel, creator_known) in readers {
            let outcome = open_direct_as(reader, cluster, &channel, record, creator_known);
            out.push(json!({
                "note": note,
                "reader": reader,
                "cluster": cluster,
                "channel": channel,
                "record": hex(record),
                "creator_known": creator_known,
                "expect": outcome.as_ref().map_or_else(direct_error_kind, |_| "ok"),
            }));
        }
    }
    out
}

fn direct_names() -> Vec<Value> {
    let lists: [&[&str]; 8] = [
        &["alice", "bob"],
        &["bob", "alice"],
        &["alice", "bob", "alice"],
        &["carol", "alice", "bob"],
        &["é", "z", "Z", "😀", "ｚ"],
        &["a", "ab", "b", ""],
        &["alice"],
        &[],
    ];
    lists
        .iter()
        .map(|members| json!({"members": members, "name": proto::direct_channel_name(members)}))
        .collect()
}

/// A signature case: what it is, public key, message, signature.
type SignatureCase = (&'static str, [u8; 32], Vec<u8>, [u8; 64]);

/// Signatures at the edges of ed25519-dalek's `verify_strict`, which crypto.js's `verify` must
/// judge the same way: a non-canonical s, a small-order key with the trivial signature, and
/// keys with a torsion component, which a cofactored check (noble's own) would accept.
fn signature_cases() -> Vec<Value> {
    let message = b"cellchat signature edge cases".to_vec();
    let alice = id("alice");
    let signature = alice.sign(&message);
    let mut identity_point = [0u8; 32];
    identity_point[0] = 1;
    let mut trivial = [0u8; 64];
    trivial[0] = 1;
    let mut cases: Vec<SignatureCase> = vec![
        ("valid", alice.public_key(), message.clone(), signature),
        (
            "s plus the group order",
            alice.public_key(),
            message.clone(),
            with_s_plus_order(signature),
        ),
        ("small-order key", identity_point, message, trivial),
    ];
    cases.extend(mixed_order_cases());
    cases
        .into_iter()
        .map(|(note, key, message, signature)| {
            let valid = ed25519_dalek::VerifyingKey::from_bytes(&key)
                .and_then(|k| {
                    k.verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&signature))
                })
                .is_ok();
            json!({
                "note": note,
                "public_key": hex(key),
                "message": hex(message),
                "signature": hex(signature),
                "valid": valid,
            })
        })
        .collect()
}

/// The same signature with s + l: the same point equation, refused as non-canonical.
fn with_s_plus_order(mut signature: [u8; 64]) -> [u8; 64] {
    const ORDER: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut carry = 0u16;
    for (byte, add) in signature[32..].iter_mut().zip(ORDER) {
        let sum = u16::from(*byte) + u16::from(add) + carry;
        *byte = sum as u8;
        carry = sum >> 8;
    }
    signature
}

/// A key `aB + T` with T of order 8, signed honestly: the cofactorless equation that
/// `verify_strict` checks holds only when 8 divides the challenge k, so there is one message
/// of each kind.
fn mixed_order_cases() -> Vec<SignatureCase> {
    let torsion = hex::decode("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")
        .expect("hex");
    let torsion = CompressedEdwardsY::from_slice(&torsion)
        .expect("32 bytes")
        .decompress()
        .expect("a point of order 8");
    let (a, r) = (
        Scalar::from_bytes_mod_order([7; 32]),
        Scalar::from_bytes_mod_order([9; 32]),
    );
    let key = (ED25519_BASEPOINT_POINT * a + torsion)
        .compress()
        .to_bytes();
    let big_r = (ED25519_BASEPOINT_POINT * r).compress().to_bytes();
    let mut out: Vec<SignatureCase> = Vec::new();
    for i in 0u32.. {
        let message = format!("mixed-order key {i}").into_bytes();
        let hashed = ring::digest::digest(
            &ring::digest::SHA512,
            &[&big_r, &key, &message[..]].concat(),
        );
        let k = Scalar::from_bytes_mod_order_wide(hashed.as_ref().try_into().expect("64 bytes"));
        let note = if k.as_bytes()[0].is_multiple_of(8) {
            "mixed-order key, 8 divides k"
        } else {
            "mixed-order key"
        };
        if out.iter().any(|case| case.0 == note) {
            continue;
        }
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&big_r);
        signature[32..].copy_from_slice((r + k * a).as_bytes());
        out.push((note, key, message, signature));
        if out.len() == 2 {
            break;
        }
    }
    out
}

/// A key file's outcome in crypto.js's words: the public key, or the error's kind.
fn key_file_kind(e: &identity::IdentityError) -> String {
    use identity::IdentityError as E;
    match e {
        E::Malformed { .. } | E::MalformedProtected { .. } => "malformed".into(),
        E::PassphraseNeeded { .. } => "needs-passphrase".into(),
        E::WrongPassphrase { .. } => "wrong-passphrase".into(),
        E::Tampered { .. } => "tampered".into(),
        other => format!("unexpected error: {other}"),
    }
}

/// Loads `text` as the key file of `name` in `cluster`, as the CLI would from its config dir.
fn load_key_text(
    cluster: &str,
    name: &str,
    text: &str,
    passphrase: Option<&str>,
) -> Result<Identity, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    write_key_file(dir.path(), cluster, name, text)?;
    let mut ask = |_: identity::PassphrasePrompt<'_>| passphrase.map(str::to_owned);
    Identity::load_or_create_with(dir.path(), cluster, name, KeyProtection::Plain, &mut ask)
        .map_err(|e| key_file_kind(&e))
}

fn write_key_file(dir: &Path, cluster: &str, name: &str, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let path = identity::key_path(dir, cluster, name);
    let parent = path.parent().expect("a key path has a parent");
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Key files as the CLI writes them: bob's protected (`Identity::protect`, default Argon2id
/// parameters) and plain (`Identity::unprotect`), and changed copies, each with its outcome.
fn key_files() -> Result<Vec<Value>, Vec<String>> {
    let dir = tempfile::tempdir().map_err(err)?;
    let seed = seed_of("bob");
    write_key_file(dir.path(), CLUSTER, "bob", &format!("{}\n", hex(seed))).map_err(err)?;
    let bob = Identity::load_or_create(dir.path(), CLUSTER, "bob").map_err(err)?;
    let path = identity::key_path(dir.path(), CLUSTER, "bob");
    let read = || std::fs::read_to_string(&path).map_err(err);
    bob.protect("bob's passphrase ☕").map_err(err)?;
    let protected = read()?;
    bob.unprotect().map_err(err)?;
    let plain = read()?;
    let mut tampered = protected.clone();
    let at = tampered.len() - 3;
    let flipped = if &tampered[at..at + 1] == "0" {
        "1"
    } else {
        "0"
    };
    tampered.replace_range(at..at + 1, flipped);
    let cases = [
        ("plain", "bob", plain.as_str(), None),
        ("protected", "bob", &protected, Some("bob's passphrase ☕")),
        ("protected, no passphrase", "bob", &protected, None),
        (
            "protected, wrong passphrase",
            "bob",
            &protected,
            Some("bob's passphrase"),
        ),
        (
            "protected, another name",
            "carol",
            &protected,
            Some("bob's passphrase ☕"),
        ),
        (
            "protected, sealed key changed",
            "bob",
            &tampered,
            Some("bob's passphrase ☕"),
        ),
        (
            "header cut",
            "bob",
            "cellchat-key-v2 argon2id m=47104\nabcd\n",
            Some("x"),
        ),
        ("plain, short", "bob", "abcdef\n", None),
    ];
    let mut out = Vec::new();
    for (note, name, text, passphrase) in cases {
        let outcome = load_key_text(CLUSTER, name, text, passphrase);
        if let Ok(id) = &outcome {
            if id.public_key() != self::id("bob").public_key() {
                return Err(vec![format!("key file {note}: another key loaded")]);
            }
        }
        out.push(json!({
            "note": note,
            "cluster": CLUSTER,
            "name": name,
            "passphrase": passphrase,
            "text": text,
            "seed": hex(seed),
            "expect": outcome.err().unwrap_or_else(|| "ok".into()),
        }));
    }
    Ok(out)
}

// --- JS -> Rust: checking what crypto.js made ----------------------------------------------

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value, String> {
    v.get(key).ok_or_else(|| format!("missing field {key:?}"))
}

fn text_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    field(v, key)?
        .as_str()
        .ok_or_else(|| format!("{key:?} is not a string"))
}

fn bytes_field(v: &Value, key: &str) -> Result<Vec<u8>, String> {
    hex::decode(text_field(v, key)?).map_err(|e| format!("{key:?}: {e}"))
}

fn array_field<const N: usize>(v: &Value, key: &str) -> Result<[u8; N], String> {
    let bytes = bytes_field(v, key)?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{key:?} is {} bytes, not {N}", b.len()))
}

fn list<'a>(v: &'a Value, key: &str) -> Result<&'a [Value], String> {
    field(v, key)?
        .as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| format!("{key:?} is not a list"))
}

fn relation_field(v: &Value) -> Result<Option<Relation>, String> {
    serde_json::from_value(field(v, "relation")?.clone()).map_err(|e| format!("relation: {e}"))
}

fn known_identity(name: &str) -> Result<Identity, String> {
    NAMES
        .contains(&name)
        .then(|| id(name))
        .ok_or_else(|| format!("unknown identity {name:?}"))
}

fn verify_file(path: &Path) -> Result<(), Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let doc: Value = serde_json::from_str(&text).map_err(err)?;
    if doc["format"] != "cellchat-web-js-samples-v1" {
        return Err(err("not a cellchat-web-js-samples-v1 document"));
    }
    let mut failures = Vec::new();
    let mut checked = 0;
    let logins = list(&doc, "logins");
    checked += check_all("logins", logins, &verify_login, &mut failures);
    let key_files = list(&doc, "key_files");
    checked += check_all("key_files", key_files, &verify_key_file, &mut failures);
    let names = list(&doc, "direct_names");
    checked += check_all("direct_names", names, &verify_direct_name, &mut failures);
    let keys = unlock_samples(&doc).unwrap_or_else(|e| {
        failures.push(e);
        Vec::new()
    });
    let bodies = list(&doc, "bodies");
    checked += check_all("bodies", bodies, &|b| verify_body(&keys, b), &mut failures);
    if failures.is_empty() {
        eprintln!("web_vectors: {checked} JavaScript samples verified");
        Ok(())
    } else {
        Err(failures)
    }
}

/// Checks every item of a list, adding one line per failure; returns how many were checked.
fn check_all(
    what: &str,
    items: Result<&[Value], String>,
    check: &dyn Fn(&Value) -> Result<(), String>,
    failures: &mut Vec<String>,
) -> usize {
    let items = match items {
        Ok(items) => items,
        Err(e) => {
            failures.push(format!("{what}: {e}"));
            return 0;
        }
    };
    for (i, item) in items.iter().enumerate() {
        if let Err(e) = check(item) {
            let note = item.get("note").and_then(Value::as_str).unwrap_or("");
            failures.push(format!("{what}[{i}] {note}: {e}"));
        }
    }
    items.len()
}

fn verify_login(v: &Value) -> Result<(), String> {
    let challenge: [u8; 32] = array_field(v, "challenge")?;
    let name = text_field(v, "name")?;
    let public_key: [u8; 32] = array_field(v, "public_key")?;
    let signature: [u8; 64] = array_field(v, "signature")?;
    if public_key != known_identity(name)?.public_key() {
        return Err("public key is not the identity's".into());
    }
    let binding = proto::web_binding(&challenge);
    let message = proto::login_message(&challenge, &binding, CLUSTER, name);
    ed25519_dalek::VerifyingKey::from_bytes(&public_key)
        .and_then(|key| {
            key.verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&signature))
        })
        .map_err(|e| format!("signature does not verify: {e}"))
}

fn verify_key_file(v: &Value) -> Result<(), String> {
    let name = text_field(v, "name")?;
    let passphrase = field(v, "passphrase")?.as_str();
    let loaded = load_key_text(
        text_field(v, "cluster")?,
        name,
        text_field(v, "text")?,
        passphrase,
    )?;
    if loaded.public_key() != known_identity(name)?.public_key() {
        return Err("the file holds another key".into());
    }
    Ok(())
}

fn verify_direct_name(v: &Value) -> Result<(), String> {
    let members: Vec<&str> = list(v, "members")?
        .iter()
        .map(|m| m.as_str().ok_or("a member is not a string"))
        .collect::<Result<_, _>>()?;
    let expected = proto::direct_channel_name(&members);
    let found = text_field(v, "name")?;
    if found != expected {
        return Err(format!("{found} where Rust names it {expected}"));
    }
    Ok(())
}

/// The keys the samples' bodies name: each record unlocked, each direct record opened by every
/// member (so every member's copy of the key is tried on every body).
fn unlock_samples(doc: &Value) -> Result<Vec<(String, ChannelKeyV2)>, String> {
    let mut keys = Vec::new();
    for record in list(doc, "records")? {
        let id = text_field(record, "id")?;
        let key = ChannelKeyV2::unlock(
            text_field(record, "passphrase")?,
            CLUSTER,
            text_field(record, "channel")?,
            &bytes_field(record, "record")?,
        )
        .map_err(|e| format!("record {id}: {e}"))?;
        keys.push((id.to_owned(), key));
    }
    for direct in list(doc, "directs")? {
        let id = text_field(direct, "id")?;
        let channel = text_field(direct, "channel")?;
        let record = bytes_field(direct, "record")?;
        let members = crypto::direct_members(&record).map_err(|e| format!("direct {id}: {e}"))?;
        for member in &members {
            let key = open_direct_as(member, CLUSTER, channel, &record, true)
                .map_err(|e| format!("direct {id} opened by {member}: {e}"))?;
            keys.push((id.to_owned(), key));
        }
    }
    Ok(keys)
}

fn verify_body(keys: &[(String, ChannelKeyV2)], v: &Value) -> Result<(), String> {
    let channel = text_field(v, "channel")?;
    let sender = text_field(v, "sender")?;
    let client_seq: u64 =
        (text_field(v, "client_seq")?.parse()).map_err(|e| format!("client_seq: {e}"))?;
    let body = bytes_field(v, "body")?;
    let session = crypto::session_of(array_field(v, "client_id")?);
    let key_id = field(v, "key")?.as_str();
    let mut candidates: Vec<Option<&ChannelKeyV2>> = (keys.iter())
        .filter(|(id, _)| Some(id.as_str()) == key_id)
        .map(|(_, key)| Some(key))
        .collect();
    if key_id.is_none() {
        candidates.push(None);
    } else if candidates.is_empty() {
        return Err(format!("no key {key_id:?} among the samples"));
    }
    for key in candidates {
        let opened = crypto::open_related(
            &Keys {
                v2: key.cloned(),
                v1: None,
            },
            CLUSTER,
            channel,
            relation_field(v)?.as_ref(),
            sender,
            client_seq,
            Some(known_identity(sender)?.public_key()),
            &body,
        );
        if opened.verified_text() != Some(text_field(v, "text")?) {
            return Err(format!(
                "Rust reads {:?} by {:?}",
                opened.content(),
                opened.author()
            ));
        }
        if opened.session() != Some(session) {
            return Err("session tag differs".into());
        }
    }
    Ok(())
}
