//! The operator subcommands: `status` (what discovery hears), `token`, and `members`,
//! `remove-node`, `leave`, `token --rotate` and `retention`, which go over the Raft RPC admin path to the leader (found through discovery,
//! following NotLeader hints) or to the node that leaves.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use node::{JoinCallError, JoinError, MemberInfo, MemberState};
use proto::discovery::{DiscoverySocket, NodeAnnounce, Packet};

use crate::{resolve_join, NetArgs};

/// How long the admin commands keep looking for a leader that answers (elections included).
const LEADER_SEARCH: Duration = Duration::from_secs(15);

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// How long to listen for answers, in ms.
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

#[derive(Args, Debug)]
pub(crate) struct MembersArgs {
    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// How long to listen for the cluster's announcements, in ms.
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

#[derive(Args, Debug)]
pub(crate) struct RemoveArgs {
    /// The node to remove: its name, or its id (as `members` lists them).
    node: String,
    /// How long to listen for the cluster's announcements, in ms.
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

#[derive(Args, Debug)]
pub(crate) struct LeaveArgs {
    /// The node that leaves: its name or id. Without it, the node running in --data-dir.
    node: Option<String>,
    /// Data directory of a node running on this machine: that node leaves.
    #[arg(long, conflicts_with = "node")]
    data_dir: Option<PathBuf>,
    /// How long to listen for the cluster's announcements, in ms.
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

#[derive(Args, Debug)]
pub(crate) struct TokenArgs {
    /// Data directory of a node of the cluster (default: the cluster directory under
    /// --data-root).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Replace the secret (the CA stays, so members and clients are unaffected) through the
    /// running cluster's leader, and print the new token. The old token stops working for
    /// joining and for operator commands; nodes keep the new one in their data dirs.
    #[arg(long)]
    rotate: bool,
    /// With --rotate: how long to listen for the cluster's announcements, in ms.
    #[arg(long, default_value_t = 1000, requires = "rotate")]
    wait_ms: u64,
}

#[derive(Args, Debug)]
pub(crate) struct RetentionArgs {
    /// Set the cluster default to this: an age (24h, 7d, 2w), a message count (1000), both
    /// (7d,1000), or forever. Channels whose owner set a retention keep theirs. Without it,
    /// print the default.
    #[arg(long, value_parser = proto::Retention::parse)]
    set: Option<proto::Retention>,
    /// Data directory of a node of the cluster, for its join token (default: the cluster
    /// directory under --data-root).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How long to listen for the cluster's announcements, in ms.
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

/// What an operator command proves itself with: the admin credential derived from the join
/// token, and a TLS config that accepts only the token's CA.
pub(crate) struct Auth {
    pub(crate) dialer: node::Dialer,
    pub(crate) admin: node::AdminCredential,
}

/// The join token: `--token`, else the one kept in `data_dir` or the cluster directory.
fn find_token(net: &NetArgs, data_dir: Option<&Path>) -> anyhow::Result<proto::tls::JoinToken> {
    if let Some(token) = &net.token {
        return token.parse().context("--token");
    }
    let found = match data_dir {
        Some(dir) => node::pki::find_token(dir, &net.cluster),
        None => node::pki::root_token(&net.data_root, &net.cluster),
    };
    found.with_context(|| {
        format!(
            "no join token for cluster {:?}: pass --token (print it with `server token` on a \
             machine that runs a node), or run this where the servers were started \
             (--data-root {})",
            net.cluster,
            net.data_root.display()
        )
    })
}

pub(crate) fn auth(net: &NetArgs, data_dir: Option<&Path>) -> anyhow::Result<Auth> {
    let token = find_token(net, data_dir)?;
    let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::Pinned(token.ca));
    Ok(Auth {
        dialer: proto::tls::client_config(verifier, proto::tls::ALPN_RAFT),
        admin: token.admin_credential(),
    })
}

pub(crate) async fn token(net: &NetArgs, args: &TokenArgs) -> anyhow::Result<()> {
    if !args.rotate {
        let token = find_token(net, args.data_dir.as_deref())?;
        println!("{token}");
        return Ok(());
    }
    let auth = auth(net, args.data_dir.as_deref())?;
    let (leader, addr, _) = leader_members(net, &auth, args.wait_ms).await?;
    let request = node::RotateRequest {
        cluster: net.cluster.clone(),
    };
    let token = node::request_rotate(&auth.dialer, auth.admin, addr, leader, request)
        .await
        .with_context(|| {
            format!("rotating the join secret through leader {leader} (the old token still works)")
        })?;
    println!("{token}");
    Ok(())
}

/// `server retention`: prints the cluster's default retention, setting it first with --set.
pub(crate) async fn retention(net: &NetArgs, args: &RetentionArgs) -> anyhow::Result<()> {
    let auth = auth(net, args.data_dir.as_deref())?;
    let (leader, addr, _) = leader_members(net, &auth, args.wait_ms).await?;
    let request = node::RetentionRequest {
        cluster: net.cluster.clone(),
        set: args.set,
    };
    let retention =
        node::request_default_retention(&auth.dialer, auth.admin, addr, leader, request)
            .await
            .with_context(|| format!("asking leader {leader} for the default retention"))?;
    println!("default retention: {retention}");
    Ok(())
}

/// Announcements heard, by node id and Raft address: unauthenticated, so one id may be
/// claimed at several addresses, and each is kept until a handshake tells them apart.
type Heard = BTreeMap<(u64, SocketAddr), NodeAnnounce>;

/// An announcement heard from node `id` (the first, if several claim it).
fn heard_as(nodes: &Heard, id: u64) -> Option<&NodeAnnounce> {
    nodes.values().find(|a| a.node_id == id)
}

/// Every node of the cluster that answers a discovery probe within `wait_ms`.
async fn discover(net: &NetArgs, join: &[SocketAddr], wait_ms: u64) -> anyhow::Result<Heard> {
    let socket = DiscoverySocket::ephemeral(net.discovery_port, net.broadcast, net.cluster.clone())
        .context("opening a discovery socket")?;
    let nonce: u64 = rand::random();
    let probe = Packet::Probe {
        cluster: net.cluster.clone(),
        nonce,
        from_client: true,
    };
    socket
        .send_broadcast(&probe)
        .await
        .context("broadcasting a probe")?;
    for addr in join {
        socket
            .send_to(&probe, *addr)
            .await
            .with_context(|| format!("probing {addr}"))?;
    }
    let mut nodes: Heard = Default::default();
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    while let Ok(received) = tokio::time::timeout_at(deadline.into(), socket.recv()).await {
        if let Ok((Packet::Announce(a), _)) = received {
            nodes.insert((a.node_id, a.raft_addr), a);
        }
    }
    Ok(nodes)
}

/// The leader's id, Raft address and membership. Starts from the leader discovery names
/// (highest term), follows NotLeader hints, and listens again while an election runs.
pub(crate) async fn leader_members(
    net: &NetArgs,
    auth: &Auth,
    wait_ms: u64,
) -> anyhow::Result<(u64, SocketAddr, Vec<MemberInfo>)> {
    let join = resolve_join(&net.join)?;
    let deadline = Instant::now() + LEADER_SEARCH;
    let mut nodes = discover(net, &join, wait_ms).await?;
    let mut last = String::from("no node answered");
    loop {
        // Anyone can announce anything: a candidate that fails the pinned handshake costs one
        // attempt, and the next one is tried.
        for start in candidates(&nodes) {
            let mut target = Some(start);
            // Each hint names a node that knows a newer leader; a few hops settle it.
            for _ in 0..5 {
                let Some((id, addr)) = target else { break };
                let request = node::MembersRequest {
                    cluster: net.cluster.clone(),
                };
                match node::request_members(&auth.dialer, auth.admin, addr, id, request).await {
                    Ok(members) => return Ok((id, addr, members)),
                    Err(JoinCallError::Refused(JoinError::NotLeader { leader: Some(l) }))
                        if l != id =>
                    {
                        last = format!("node {id} is not the leader; it names {l}");
                        target = heard_as(&nodes, l).map(|a| (l, a.raft_addr));
                    }
                    Err(e) => {
                        last = format!("asking node {id} at {addr}: {e}");
                        break;
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no leader of cluster {:?} answered within {LEADER_SEARCH:?} ({} node(s) heard on \
                 {}:{}); last: {last}; check `server status`",
                net.cluster,
                nodes.len(),
                net.broadcast,
                net.discovery_port
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        nodes = discover(net, &join, wait_ms.min(500)).await?;
    }
}

/// Every node discovery heard, in the order to ask: announced leaders by highest term, then
/// the others.
fn candidates(nodes: &Heard) -> Vec<(u64, SocketAddr)> {
    let mut order: Vec<&NodeAnnounce> = nodes.values().collect();
    order.sort_by_key(|a| (a.role != proto::Role::Leader, std::cmp::Reverse(a.term)));
    order.iter().map(|a| (a.node_id, a.raft_addr)).collect()
}

/// How a member is shown: its name, or its id when it has none.
pub(crate) fn label(member: &MemberInfo) -> String {
    if member.name.is_empty() {
        member.id.to_string()
    } else {
        member.name.clone()
    }
}

/// The member `wanted` names: by name first, then by id.
///
/// # Errors
/// Unknown: the error names `wanted` and lists the members.
pub(crate) fn find_member<'a>(
    members: &'a [MemberInfo],
    wanted: &str,
) -> anyhow::Result<&'a MemberInfo> {
    let by_name = members.iter().find(|m| m.name == wanted);
    let by_id = || {
        let id: u64 = wanted.parse().ok()?;
        members.iter().find(|m| m.id == id)
    };
    if let Some(member) = by_name.or_else(by_id) {
        return Ok(member);
    }
    let known: Vec<String> = members
        .iter()
        .map(|m| format!("{} (id {})", label(m), m.id))
        .collect();
    bail!(
        "no member is called {wanted:?}; nothing was changed. Members: {}",
        known.join(", ")
    )
}

pub(crate) async fn members(net: &NetArgs, args: &MembersArgs) -> anyhow::Result<()> {
    let auth = auth(net, None)?;
    let (_, _, members) = leader_members(net, &auth, args.wait_ms).await?;
    if args.json {
        let rows: Vec<serde_json::Value> = members.iter().map(member_json).collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    // Names only: ids are in the JSON, and a member without a name is shown by its id.
    println!(
        "{:<20} {:<8} {:<24} {:<22} {:<22}",
        "name", "kind", "state", "client", "raft"
    );
    for m in &members {
        println!(
            "{:<20} {:<8} {:<24} {:<22} {:<22}",
            label(m),
            if m.voter { "voter" } else { "learner" },
            m.state.to_string(),
            m.member.client_addr,
            m.member.raft_addr,
        );
    }
    Ok(())
}

fn member_json(m: &MemberInfo) -> serde_json::Value {
    let lag = match m.state {
        MemberState::Lagging { entries } => Some(entries),
        _ => None,
    };
    let state = match m.state {
        MemberState::Leader => "leader",
        MemberState::Up => "up",
        MemberState::Lagging { .. } => "lagging",
        MemberState::Unreachable => "unreachable",
    };
    serde_json::json!({
        "id": m.id,
        "name": m.name,
        "voter": m.voter,
        "state": state,
        "lag_entries": lag,
        "matched_index": m.matched_index,
        "client_addr": m.member.client_addr,
        "raft_addr": m.member.raft_addr,
        "metrics_addr": m.member.metrics_addr,
    })
}

pub(crate) async fn remove_node(net: &NetArgs, args: &RemoveArgs) -> anyhow::Result<()> {
    let auth = auth(net, None)?;
    let (leader, addr, members) = leader_members(net, &auth, args.wait_ms).await?;
    let target = find_member(&members, &args.node)?;
    if target.id == leader {
        bail!(
            "{} is the leader; a leader is not removed from outside (nothing was changed). Use \
             `server leave {}` to take it out for good, or retry after a leader change",
            label(target),
            label(target)
        );
    }
    let request = node::RemoveRequest {
        cluster: net.cluster.clone(),
        id: target.id,
    };
    let reply = node::request_remove(&auth.dialer, auth.admin, addr, leader, request)
        .await
        .with_context(|| format!("removing {} through leader {leader}", label(target)))?;
    let how = match reply {
        node::RemoveReply::Removed => "removed",
        node::RemoveReply::NotMember => "was not a member",
    };
    println!("{} (id {}) {how}", label(target), target.id);
    Ok(())
}

pub(crate) async fn leave(net: &NetArgs, args: &LeaveArgs) -> anyhow::Result<()> {
    let wanted = match (&args.node, &args.data_dir) {
        (Some(node), _) => node.clone(),
        (None, Some(dir)) => node::DataDir::read_node_id(dir)
            .with_context(|| format!("reading the node id of {}", dir.display()))?
            .to_string(),
        (None, None) => bail!("say which node leaves: `server leave NAME` or --data-dir DIR"),
    };
    let auth = auth(net, args.data_dir.as_deref())?;
    let (_, _, members) = leader_members(net, &auth, args.wait_ms).await?;
    // The node itself refuses when it is the last voter: it decides on its own current view.
    let target = find_member(&members, &wanted)?;
    let addr: SocketAddr = target
        .member
        .raft_addr
        .parse()
        .with_context(|| format!("the raft address {:?}", target.member.raft_addr))?;
    let request = node::LeaveRequest {
        cluster: net.cluster.clone(),
    };
    let reply = node::request_leave(&auth.dialer, auth.admin, addr, target.id, request)
        .await
        .with_context(|| format!("asking {} (id {}) to leave", label(target), target.id))?;
    match reply {
        node::LeaveReply::Left { was_leader: true } => println!(
            "{} left the cluster (it led; the other voters elect a new leader) and is stopping",
            label(target)
        ),
        node::LeaveReply::Left { was_leader: false } => {
            println!("{} left the cluster and is stopping", label(target))
        }
        node::LeaveReply::NotMember => {
            println!(
                "{} was not a member; marked as left and stopping",
                label(target)
            )
        }
    }
    Ok(())
}

pub(crate) async fn status(net: &NetArgs, args: &StatusArgs) -> anyhow::Result<()> {
    let join = resolve_join(&net.join)?;
    let nodes = discover(net, &join, args.wait_ms).await?;
    if args.json {
        let rows: Vec<serde_json::Value> = nodes
            .values()
            .map(|a| {
                serde_json::json!({
                    "id": a.node_id,
                    "name": a.name,
                    "role": role_name(a.role),
                    "client_addr": a.client_addr.to_string(),
                    "raft_addr": a.raft_addr.to_string(),
                    "metrics_addr": a.metrics_addr.to_string(),
                    "term": a.term,
                    "applied": a.applied,
                    "leader": a.leader,
                    "voter": a.voter,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if nodes.is_empty() {
        anyhow::bail!(
            "no node of cluster {:?} answered on {}:{} (and {} --join address(es)); start one with \
             `cargo run --release -p server`, or pass --join host:port / --broadcast",
            net.cluster,
            net.broadcast,
            net.discovery_port,
            join.len()
        );
    }
    // Names only: ids are in the JSON; a leader discovery does not hear is shown by its id.
    let name_of = |id: u64| heard_as(&nodes, id).map_or(id.to_string(), |a| a.name.clone());
    println!(
        "{:<20} {:<9} {:<6} {:<22} {:<22} {:<22} {:>6} {:>10} {:<20}",
        "name", "role", "voter", "client", "raft", "metrics", "term", "applied", "leader"
    );
    for a in nodes.values() {
        println!(
            "{:<20} {:<9} {:<6} {:<22} {:<22} {:<22} {:>6} {:>10} {:<20}",
            a.name,
            role_name(a.role),
            a.voter,
            a.client_addr,
            a.raft_addr,
            a.metrics_addr,
            a.term,
            a.applied,
            a.leader.map_or("-".to_owned(), name_of),
        );
    }
    Ok(())
}

fn role_name(role: proto::Role) -> &'static str {
    match role {
        proto::Role::Leader => "leader",
        proto::Role::Follower => "follower",
        proto::Role::Learner => "learner",
        proto::Role::Candidate => "candidate",
        proto::Role::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64, name: &str) -> MemberInfo {
        MemberInfo {
            id,
            name: name.into(),
            member: node::Member::default(),
            voter: true,
            state: MemberState::Up,
            matched_index: None,
        }
    }

    #[test]
    fn a_member_is_found_by_name_then_by_id() {
        let members = [info(11, "n1"), info(22, "n2"), info(33, "")];
        assert_eq!(find_member(&members, "n2").unwrap().id, 22);
        assert_eq!(find_member(&members, "33").unwrap().id, 33);
        assert_eq!(find_member(&members, "11").unwrap().id, 11);
    }

    #[test]
    fn an_unknown_member_is_refused_with_the_list() {
        let members = [info(11, "n1"), info(33, "")];
        let error = find_member(&members, "n9").unwrap_err().to_string();
        assert!(error.contains("\"n9\""), "{error}");
        assert!(error.contains("nothing was changed"), "{error}");
        assert!(error.contains("n1 (id 11)"), "{error}");
        assert!(error.contains("33 (id 33)"), "{error}");
    }
}
