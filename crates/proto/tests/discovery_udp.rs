//! Discovery sockets over real loopback UDP: shared-port broadcast, unicast replies to an
//! ephemeral socket, and dropping of garbage and other clusters' packets. Every test binds its
//! own kernel-chosen port and broadcasts only to 127.255.255.255.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use proto::{
    discovery::{self, DiscoverySocket, NodeAnnounce, Packet, DEFAULT_BROADCAST},
    Role,
};

/// Generous bound so a loaded machine does not fail the test; passing tests never wait it out.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

async fn recv(socket: &DiscoverySocket) -> (Packet, SocketAddr) {
    tokio::time::timeout(RECV_TIMEOUT, socket.recv())
        .await
        .expect("no discovery packet before the timeout")
        .expect("recv failed")
}

fn probe(cluster: &str, nonce: u64) -> Packet {
    Packet::Probe {
        cluster: cluster.to_owned(),
        nonce,
        from_client: true,
    }
}

fn announce(cluster: &str, node_id: u64) -> Packet {
    let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    Packet::Announce(NodeAnnounce {
        cluster: cluster.to_owned(),
        node_id,
        client_addr: addr,
        raft_addr: addr,
        metrics_addr: addr,
        role: Role::Leader,
        leader: Some(node_id),
        term: 1,
        applied: 0,
        voter: true,
        started_ms: 0,
        name: format!("n{node_id}"),
    })
}

/// A fresh shared discovery port for one test.
fn shared(cluster: &str) -> (DiscoverySocket, u16) {
    let first = DiscoverySocket::bind(0, DEFAULT_BROADCAST, cluster).expect("bind");
    let port = first.local_addr().expect("local addr").port();
    (first, port)
}

#[tokio::test]
async fn broadcast_reaches_every_socket_sharing_the_port() {
    let (node_a, port) = shared("c-bcast");
    let node_b = DiscoverySocket::bind(port, DEFAULT_BROADCAST, "c-bcast").expect("bind shared");
    assert_eq!(node_b.local_addr().expect("addr").port(), port);
    let client = DiscoverySocket::ephemeral(port, DEFAULT_BROADCAST, "c-bcast").expect("bind");
    assert_eq!(
        client.broadcast_addr(),
        SocketAddr::from((DEFAULT_BROADCAST, port))
    );

    client
        .send_broadcast(&probe("c-bcast", 1))
        .await
        .expect("broadcast");

    let client_port = client.local_addr().expect("addr").port();
    for node in [&node_a, &node_b] {
        let (packet, from) = recv(node).await;
        assert_eq!(packet, probe("c-bcast", 1));
        assert_eq!(from.port(), client_port);
    }
}

#[tokio::test]
async fn node_broadcast_reaches_the_other_node() {
    let (node_a, port) = shared("c-nodes");
    let node_b = DiscoverySocket::bind(port, DEFAULT_BROADCAST, "c-nodes").expect("bind shared");
    assert_eq!(
        node_a.broadcast_addr(),
        SocketAddr::from((DEFAULT_BROADCAST, port))
    );

    node_a
        .send_broadcast(&announce("c-nodes", 1))
        .await
        .expect("broadcast");

    // Both receive it: a node hears its own announcements and filters them by node id.
    assert_eq!(recv(&node_b).await.0, announce("c-nodes", 1));
    assert_eq!(recv(&node_a).await.0, announce("c-nodes", 1));
}

#[tokio::test]
async fn probe_from_an_ephemeral_socket_gets_a_unicast_reply() {
    let (node, port) = shared("c-probe");
    let client = DiscoverySocket::ephemeral(port, DEFAULT_BROADCAST, "c-probe").expect("bind");
    client
        .send_broadcast(&probe("c-probe", 42))
        .await
        .expect("broadcast");

    let (packet, from) = recv(&node).await;
    assert_eq!(packet, probe("c-probe", 42));
    node.send_to(&announce("c-probe", 9), from)
        .await
        .expect("reply");

    let (reply, reply_from) = recv(&client).await;
    assert_eq!(reply, announce("c-probe", 9));
    assert_eq!(reply_from.port(), port);
}

#[tokio::test]
async fn ping_gets_a_pong_by_unicast() {
    let (node, port) = shared("c-ping");
    let client = DiscoverySocket::ephemeral(port, DEFAULT_BROADCAST, "c-ping").expect("bind");
    let node_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    client
        .send_to(
            &Packet::Ping {
                nonce: 5,
                sent_ns: 77,
            },
            node_addr,
        )
        .await
        .expect("ping");

    let (ping, from) = recv(&node).await;
    let Packet::Ping { nonce, sent_ns } = ping else {
        panic!("expected ping, got {ping:?}")
    };
    node.send_to(
        &Packet::Pong {
            nonce,
            sent_ns,
            node_id: 3,
        },
        from,
    )
    .await
    .expect("pong");

    assert_eq!(
        recv(&client).await.0,
        Packet::Pong {
            nonce: 5,
            sent_ns: 77,
            node_id: 3
        }
    );
}

#[tokio::test]
async fn garbage_and_foreign_clusters_are_skipped() {
    let (node, port) = shared("c-mine");
    let node_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // One plain sender, so the datagrams arrive in the order sent.
    let raw = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind raw");
    let good = discovery::encode(&probe("c-mine", 1)).expect("encode");
    let datagrams: Vec<Vec<u8>> = vec![
        b"hello, is this a chat server?".to_vec(),
        Vec::new(),
        good[..good.len() - 1].to_vec(),
        vec![0; discovery::PACKET_BYTES_MAX + 100],
        discovery::encode(&probe("c-other", 2)).expect("encode"),
        discovery::encode(&announce("c-other", 3)).expect("encode"),
        good.clone(),
        discovery::encode(&probe("c-mine", 4)).expect("encode"),
    ];
    for datagram in &datagrams {
        raw.send_to(datagram, node_addr).expect("send");
    }

    assert_eq!(recv(&node).await.0, probe("c-mine", 1));
    assert_eq!(recv(&node).await.0, probe("c-mine", 4));
}

#[tokio::test]
async fn limited_broadcast_is_refused() {
    for result in [
        DiscoverySocket::bind(0, Ipv4Addr::BROADCAST, "c"),
        DiscoverySocket::ephemeral(1, Ipv4Addr::BROADCAST, "c"),
    ] {
        let err = result.expect_err("255.255.255.255 must be refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
    let socket = DiscoverySocket::ephemeral(1, DEFAULT_BROADCAST, "c").expect("bind");
    let to = SocketAddr::from((Ipv4Addr::BROADCAST, 1));
    let err = socket
        .send_to(&probe("c", 1), to)
        .await
        .expect_err("must refuse");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn oversized_packet_is_refused_on_send() {
    let socket = DiscoverySocket::ephemeral(1, DEFAULT_BROADCAST, "c").expect("bind");
    assert_eq!(socket.cluster(), "c");
    let huge = probe(&"x".repeat(2_000), 1);
    let err = socket.send_broadcast(&huge).await.expect_err("must refuse");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn a_node_bound_to_loopback_hears_broadcasts_and_its_own_address_only() {
    let host = Ipv4Addr::LOCALHOST.into();
    let node = DiscoverySocket::bind_on(host, 0, DEFAULT_BROADCAST, "c-own").expect("bind_on");
    let port = node.local_addr().expect("local addr").port();
    assert_eq!(node.local_addr().expect("addr").ip(), host);
    // A second node of the machine shares the port, as with `bind`.
    let other =
        DiscoverySocket::bind_on(host, port, DEFAULT_BROADCAST, "c-own").expect("bind shared");
    let raw = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind raw");
    raw.set_broadcast(true).expect("SO_BROADCAST");
    let datagram = |nonce| discovery::encode(&probe("c-own", nonce)).expect("encode");

    // Sent to another address of the machine: a socket on 0.0.0.0 would take it, these do not.
    raw.send_to(&datagram(1), (Ipv4Addr::new(127, 0, 0, 2), port))
        .expect("send elsewhere");
    raw.send_to(&datagram(2), (DEFAULT_BROADCAST, port))
        .expect("broadcast");
    assert_eq!(recv(&node).await.0, probe("c-own", 2));
    assert_eq!(recv(&other).await.0, probe("c-own", 2));
    raw.send_to(&datagram(3), (Ipv4Addr::LOCALHOST, port))
        .expect("unicast");
    let (unicast, _) = tokio::select! {
        got = recv(&node) => got,
        got = recv(&other) => got,
    };
    assert_eq!(unicast, probe("c-own", 3));

    // Replies leave from the node's own address, where it receives.
    let client = DiscoverySocket::ephemeral(port, DEFAULT_BROADCAST, "c-own").expect("bind");
    node.send_to(&probe("c-own", 4), client.local_addr().expect("addr"))
        .await
        .expect("reply");
    let (_, from) = recv(&client).await;
    assert_eq!(from, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
}

#[tokio::test]
async fn bind_on_an_unspecified_host_binds_every_interface() {
    let node = DiscoverySocket::bind_on(Ipv4Addr::UNSPECIFIED.into(), 0, DEFAULT_BROADCAST, "c")
        .expect("bind_on");
    assert!(node.local_addr().expect("addr").ip().is_unspecified());
}
