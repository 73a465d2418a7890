//! A real tarpc Chat server and client over loopback TCP with the postcard transport: ping,
//! hello (and its typed protocol and cluster errors), the per-connection hello gate, and a long
//! poll whose deadline comes from `deadline_for`. The in-test server holds no chat state.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use proto::{
    check_hello, deadline_for, listen, wait_budget, ApiError, ChannelDetail, ChannelInfo,
    ChannelInfoRequest, ChannelPage, ChannelRequest, ChannelsRequest, Chat, ChatClient,
    ClusterInfo, Hello, HistoryRequest, Login, MessageBatch, Pong, Role, SendReply, SendRequest,
    Session, StreamRequest, UserKey, Welcome, PROTOCOL_VERSION,
};
use tarpc::{
    context::{self, Context},
    server::{BaseChannel, Channel},
};

const CLUSTER: &str = "test-cluster";
const NODE_ID: u64 = 11;

fn first_page() -> ChannelsRequest {
    ChannelsRequest {
        after: None,
        limit: 10,
        read_token: 0,
    }
}

fn general() -> ChannelInfo {
    ChannelInfo {
        name: "general".into(),
        head: 0,
        owner: None,
        private: false,
        invited: false,
        encrypted: false,
        read_to: 0,
        direct: Vec::new(),
    }
}

/// One value per connection, so `said_hello` is connection state.
#[derive(Clone)]
struct TestServer {
    said_hello: Arc<AtomicBool>,
}

impl TestServer {
    fn gate(&self) -> Result<(), ApiError> {
        if self.said_hello.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated)
        }
    }
}

impl Chat for TestServer {
    async fn hello(self, _: Context, req: Hello) -> Result<Welcome, ApiError> {
        check_hello(&req, CLUSTER)?;
        self.said_hello.store(true, Ordering::Release);
        Ok(Welcome {
            node_id: NODE_ID,
            cluster: CLUSTER.into(),
            protocol: PROTOCOL_VERSION,
            challenge: [5; 32],
            server_time_ms: 1,
        })
    }

    async fn login(self, _: Context, req: Login) -> Result<Session, ApiError> {
        self.gate()?;
        Ok(Session { name: req.name })
    }

    async fn send(self, _: Context, _: SendRequest) -> Result<SendReply, ApiError> {
        self.gate()?;
        Err(ApiError::NotLeader { leader: None })
    }

    async fn search(
        self,
        _: Context,
        _: proto::SearchRequest,
    ) -> Result<proto::SearchReply, ApiError> {
        self.gate()?;
        Err(ApiError::unavailable("no index"))
    }

    async fn stream(self, ctx: Context, req: StreamRequest) -> Result<MessageBatch, ApiError> {
        self.gate()?;
        // No messages ever arrive here, so a poll always waits out its budget.
        tokio::time::sleep(wait_budget(&ctx, req.wait_ms)).await;
        Ok(MessageBatch {
            channel: req.channel,
            messages: vec![],
            head: 0,
            applied: 0,
            floor: 1,
        })
    }

    async fn history(self, _: Context, req: HistoryRequest) -> Result<MessageBatch, ApiError> {
        self.gate()?;
        Ok(MessageBatch {
            channel: req.channel,
            messages: vec![],
            head: 0,
            applied: 0,
            floor: 1,
        })
    }

    async fn channels(self, _: Context, _: ChannelsRequest) -> Result<ChannelPage, ApiError> {
        self.gate()?;
        Ok(ChannelPage {
            channels: vec![general()],
            more: false,
        })
    }

    async fn channel_info(
        self,
        _: Context,
        _: ChannelInfoRequest,
    ) -> Result<ChannelDetail, ApiError> {
        self.gate()?;
        Err(ApiError::Rejected(proto::RejectReason::NotMember))
    }

    async fn channel(self, _: Context, _: ChannelRequest) -> Result<u64, ApiError> {
        self.gate()?;
        Err(ApiError::NotLeader { leader: None })
    }

    async fn mark_read(
        self,
        _: Context,
        _: proto::MarkReadRequest,
    ) -> Result<proto::MarkReadReply, ApiError> {
        self.gate()?;
        Err(ApiError::NotLeader { leader: None })
    }

    async fn user_keys(self, _: Context, names: Vec<String>) -> Result<Vec<UserKey>, ApiError> {
        self.gate()?;
        let unknown = |name| UserKey {
            name,
            public_key: None,
        };
        Ok(names.into_iter().map(unknown).collect())
    }

    async fn cluster(self, _: Context) -> Result<ClusterInfo, ApiError> {
        self.gate()?;
        Ok(ClusterInfo {
            cluster: CLUSTER.into(),
            leader: None,
            term: 0,
            nodes: vec![],
        })
    }

    async fn ping(self, _: Context, nonce: u64) -> Pong {
        Pong {
            nonce,
            node_id: NODE_ID,
            role: Role::Follower,
            applied: 0,
            server_time_ms: 1,
        }
    }
}

mod common;

/// A test server's address and the client config that trusts it.
#[derive(Clone)]
struct Server {
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
}

/// Starts the server on a loopback ephemeral port, over TLS with a test CA.
async fn start_server() -> Server {
    let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("addr");
    let (tls, client) = common::tls_pair(proto::tls::ALPN_CHAT);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(stream) = proto::accept_tls(stream, tls).await else {
                    return;
                };
                let server = TestServer {
                    said_hello: Arc::new(AtomicBool::new(false)),
                };
                BaseChannel::with_defaults(proto::framed(stream))
                    .execute(server.serve())
                    .for_each(|response| async move {
                        tokio::spawn(response);
                    })
                    .await;
            });
        }
    });
    Server { addr, client }
}

async fn connect_chat(server: Server) -> std::io::Result<ChatClient> {
    let (client, _binding) =
        proto::connect_chat(server.addr, server.client, Duration::from_secs(5)).await?;
    Ok(client)
}

#[tokio::test]
async fn ping_answers_before_hello() {
    let client = connect_chat(start_server().await).await.expect("connect");
    let pong = client.ping(context::current(), 77).await.expect("rpc");
    assert_eq!(pong.nonce, 77);
    assert_eq!(pong.node_id, NODE_ID);
}

#[tokio::test]
async fn hello_then_calls_succeed() {
    let client = connect_chat(start_server().await).await.expect("connect");
    assert_eq!(
        client
            .channels(context::current(), first_page())
            .await
            .expect("rpc"),
        Err(ApiError::Unauthenticated)
    );

    let welcome = client
        .hello(
            context::current(),
            Hello::new(CLUSTER, Some("alice".into())),
        )
        .await
        .expect("rpc")
        .expect("hello");
    assert_eq!(welcome.node_id, NODE_ID);
    assert_eq!(welcome.protocol, PROTOCOL_VERSION);
    assert_eq!(welcome.cluster, CLUSTER);

    let page = ChannelsRequest {
        after: None,
        limit: 10,
        read_token: 0,
    };
    let channels = client
        .channels(context::current(), page)
        .await
        .expect("rpc")
        .expect("channels");
    assert_eq!(channels.channels, vec![general()]);
    let send = SendRequest {
        channel: "general".into(),
        body: vec![1],
        client_id: [0; 16],
        client_seq: 1,
        relation: None,
    };
    assert_eq!(
        client.send(context::current(), send).await.expect("rpc"),
        Err(ApiError::NotLeader { leader: None })
    );
}

#[tokio::test]
async fn hello_state_is_per_connection() {
    let addr = start_server().await;
    let first = connect_chat(addr.clone()).await.expect("connect");
    first
        .hello(context::current(), Hello::new(CLUSTER, None))
        .await
        .expect("rpc")
        .expect("hello");
    let second = connect_chat(addr).await.expect("connect");
    assert_eq!(
        second.cluster(context::current()).await.expect("rpc"),
        Err(ApiError::Unauthenticated)
    );
}

#[tokio::test]
async fn hello_with_wrong_cluster_is_a_typed_error() {
    let client = connect_chat(start_server().await).await.expect("connect");
    let reply = client
        .hello(context::current(), Hello::new("elsewhere", None))
        .await
        .expect("rpc");
    assert_eq!(
        reply,
        Err(ApiError::WrongCluster {
            ours: CLUSTER.into(),
            theirs: "elsewhere".into()
        })
    );
    // The failed hello did not open the gate.
    assert_eq!(
        client
            .channels(context::current(), first_page())
            .await
            .expect("rpc"),
        Err(ApiError::Unauthenticated)
    );
}

#[tokio::test]
async fn hello_with_wrong_protocol_is_a_typed_error() {
    let client = connect_chat(start_server().await).await.expect("connect");
    let hello = Hello {
        protocol: PROTOCOL_VERSION + 1,
        cluster: CLUSTER.into(),
        client_name: None,
    };
    let reply = client.hello(context::current(), hello).await.expect("rpc");
    assert_eq!(
        reply,
        Err(ApiError::UnsupportedProtocol {
            ours: PROTOCOL_VERSION,
            theirs: PROTOCOL_VERSION + 1
        })
    );
}

#[tokio::test]
async fn long_poll_returns_empty_before_its_deadline() {
    let client = connect_chat(start_server().await).await.expect("connect");
    client
        .hello(context::current(), Hello::new(CLUSTER, None))
        .await
        .expect("rpc")
        .expect("hello");
    let wait = Duration::from_millis(200);
    let req = StreamRequest {
        channel: "general".into(),
        after_seq: 0,
        max: 10,
        wait_ms: 200,
        read_token: 0,
    };
    let started = Instant::now();
    let batch = client
        .stream(deadline_for(wait), req)
        .await
        .expect("rpc")
        .expect("stream");
    assert!(
        started.elapsed() >= wait,
        "returned after {:?}",
        started.elapsed()
    );
    assert!(batch.messages.is_empty());
    assert_eq!(batch.channel, "general");
}
