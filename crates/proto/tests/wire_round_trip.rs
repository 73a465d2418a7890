//! Every wire type of the Chat service, and every ApiError variant, survives a round trip
//! through the postcard codec that tarpc frames use.

use std::{fmt::Debug, pin::Pin};

use bytes::BytesMut;
use proto::{
    ApiError, ChannelChange, ChannelDetail, ChannelInfo, ChannelPage, ChannelRequest, ChatRequest,
    ChatResponse, ClusterInfo, Hello, HistoryRequest, LeaderHint, Login, MessageBatch, NodeInfo,
    Pong, Postcard, RejectReason, Retention, Role, SendReply, SendRequest, Session, StreamRequest,
    Welcome, WireMessage,
};
use serde::{de::DeserializeOwned, Serialize};
use tarpc::tokio_serde::{Deserializer, Serializer};

fn through_codec<T: Serialize + DeserializeOwned>(value: &T) -> T {
    let mut codec = Postcard::<T, T>::default();
    let bytes = Pin::new(&mut codec).serialize(value).expect("serialize");
    Pin::new(&mut codec)
        .deserialize(&BytesMut::from(&bytes[..]))
        .expect("deserialize")
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T) {
    assert_eq!(through_codec(&value), value);
}

/// For tarpc's generated enums, which derive `Debug` but not `PartialEq`.
fn round_trip_debug<T: Serialize + DeserializeOwned + Debug>(value: T) {
    assert_eq!(format!("{:?}", through_codec(&value)), format!("{value:?}"));
}

fn message(seq: u64) -> WireMessage {
    WireMessage {
        channel: "general".into(),
        seq,
        sender: "alice".into(),
        body: vec![0, 1, 2, 255],
        at_ms: 1_700_000_000_000 + seq,
        client_seq: seq * 10,
        ..WireMessage::default()
    }
}

fn batch() -> MessageBatch {
    MessageBatch {
        channel: "general".into(),
        messages: vec![message(1), message(2)],
        head: 2,
        applied: 9,
        floor: 1,
    }
}

fn node(id: u64, role: Role) -> NodeInfo {
    NodeInfo {
        id,
        role,
        client_addr: "127.0.0.1:7000".parse().expect("addr"),
        raft_addr: "[::1]:7001".parse().expect("addr"),
        metrics_addr: "192.168.1.20:9100".parse().expect("addr"),
        applied: 1_000 + id,
        voter: role != Role::Learner,
    }
}

fn cluster() -> ClusterInfo {
    ClusterInfo {
        cluster: "cellchat".into(),
        leader: Some(1),
        term: 4,
        nodes: [
            Role::Leader,
            Role::Follower,
            Role::Learner,
            Role::Candidate,
            Role::Unknown,
        ]
        .into_iter()
        .zip(1..)
        .map(|(role, id)| node(id, role))
        .collect(),
    }
}

fn all_errors() -> Vec<ApiError> {
    let hint = LeaderHint {
        id: 2,
        client_addr: "10.0.0.2:7000".parse().expect("addr"),
    };
    vec![
        ApiError::NotLeader { leader: Some(hint) },
        ApiError::NotLeader { leader: None },
        ApiError::unavailable("no leader"),
        ApiError::Aborted,
        ApiError::Rejected(RejectReason::InvalidChannel),
        ApiError::Rejected(RejectReason::EmptyBody),
        ApiError::Rejected(RejectReason::BodyTooLarge {
            len: 70_000,
            max: 65_536,
        }),
        ApiError::Rejected(RejectReason::InvalidName),
        ApiError::Rejected(RejectReason::NameTaken),
        ApiError::Rejected(RejectReason::Malformed {
            what: "signature".into(),
        }),
        ApiError::RateLimited {
            retry_after_ms: 1_500,
        },
        ApiError::Unauthenticated,
        ApiError::UnsupportedProtocol { ours: 1, theirs: 2 },
        ApiError::WrongCluster {
            ours: "a".into(),
            theirs: "b".into(),
        },
        ApiError::Timeout,
        ApiError::Rejected(RejectReason::NotMember),
        ApiError::Rejected(RejectReason::NotOwner),
        ApiError::Rejected(RejectReason::ChannelExists),
        ApiError::Rejected(RejectReason::NotInvited),
        ApiError::Rejected(RejectReason::InvalidRetention),
        ApiError::Rejected(RejectReason::RetryExpired { window_hours: 24 }),
        ApiError::Rejected(RejectReason::UnknownUser),
        ApiError::Rejected(RejectReason::LimitReached {
            what: "channels you own".into(),
            max: 1024,
        }),
        ApiError::Rejected(RejectReason::NotPrivate),
        ApiError::Rejected(RejectReason::CryptoAlreadySet),
        ApiError::Rejected(RejectReason::OwnerCannotLeave),
    ]
}

#[test]
fn requests_round_trip() {
    round_trip(Hello::new("cellchat", Some("alice".into())));
    round_trip(Hello {
        protocol: u16::MAX,
        cluster: String::new(),
        client_name: None,
    });
    round_trip(Login {
        name: "alice".into(),
        public_key: [3; 32],
        signature: vec![9; 64],
    });
    round_trip(SendRequest {
        channel: "general".into(),
        body: b"hi".to_vec(),
        client_id: [1; 16],
        client_seq: u64::MAX,
        relation: None,
    });
    round_trip(StreamRequest {
        channel: "general".into(),
        after_seq: 5,
        max: 100,
        wait_ms: 20_000,
        read_token: 77,
    });
    round_trip(HistoryRequest {
        channel: "general".into(),
        before_seq: Some(10),
        from_seq: None,
        limit: 50,
        read_token: 0,
    });
    round_trip(HistoryRequest {
        channel: "x".into(),
        before_seq: None,
        from_seq: Some(1),
        limit: 0,
        read_token: 1,
    });
}

#[test]
fn replies_round_trip() {
    round_trip(Welcome {
        node_id: 1,
        cluster: "cellchat".into(),
        protocol: 1,
        challenge: [0xab; 32],
        server_time_ms: 1_700_000_000_000,
    });
    round_trip(Session {
        name: "alice".into(),
    });
    round_trip(SendReply {
        channel: "general".into(),
        seq: 3,
        at_ms: 5,
        read_token: 8,
        duplicate: true,
    });
    round_trip(message(1));
    round_trip(batch());
    round_trip(MessageBatch {
        channel: "empty".into(),
        messages: vec![],
        head: 0,
        applied: 0,
        floor: 1,
    });
    let info = ChannelInfo {
        name: "vault".into(),
        head: 3,
        owner: Some("alice".into()),
        private: true,
        invited: true,
        encrypted: true,
        read_to: 2,
        direct: vec!["alice".into(), "bob".into()],
    };
    round_trip(proto::MarkReadRequest {
        channel: "vault".into(),
        seq: 2,
    });
    round_trip(proto::MarkReadReply {
        read_to: 3,
        read_token: 17,
    });
    round_trip(ChannelPage {
        channels: vec![info.clone()],
        more: true,
    });
    round_trip(ChannelDetail {
        info,
        members: vec!["alice".into()],
        invited: vec!["bob".into()],
        crypto: Some(vec![2; 60]),
        retention: Some(Retention {
            max_age_ms: Some(86_400_000),
            max_count: None,
        }),
        default_retention: Retention::FOREVER,
        floor: 7,
        topic: Some("release 1.2: freeze on Friday".into()),
    });
    for change in [
        ChannelChange::Create {
            private: true,
            crypto: None,
        },
        ChannelChange::SetCrypto(vec![1]),
        ChannelChange::Invite("bob".into()),
        ChannelChange::Accept,
        ChannelChange::Remove("bob".into()),
        ChannelChange::SetRetention(None),
        ChannelChange::SetRetention(Some(Retention {
            max_age_ms: None,
            max_count: Some(1000),
        })),
        ChannelChange::CreateDirect {
            members: vec!["alice".into(), "bob".into()],
            crypto: vec![3; 400],
        },
    ] {
        round_trip(ChannelRequest {
            channel: "vault".into(),
            change,
        });
    }
    round_trip(cluster());
    round_trip(Pong {
        nonce: 1,
        node_id: 2,
        role: Role::Learner,
        applied: 3,
        server_time_ms: 4,
    });
}

#[test]
fn every_error_round_trips() {
    for err in all_errors() {
        round_trip(err.clone());
        round_trip::<Result<Welcome, ApiError>>(Err(err));
    }
}

#[test]
fn generated_request_and_response_enums_round_trip() {
    round_trip_debug(ChatRequest::Hello {
        req: Hello::new("c", None),
    });
    round_trip_debug(ChatRequest::Ping { nonce: 9 });
    round_trip_debug(ChatRequest::Channels {
        req: proto::ChannelsRequest {
            after: Some("general".into()),
            limit: 100,
            read_token: 0,
        },
    });
    round_trip_debug(ChatRequest::UserKeys {
        names: vec!["alice".into()],
    });
    round_trip_debug(ChatResponse::Stream(Ok(batch())));
    round_trip_debug(ChatResponse::Cluster(Ok(cluster())));
    round_trip_debug(ChatResponse::Send(Err(ApiError::Aborted)));
}
