//! End-to-end tests of node names and membership commands: real `server` processes on
//! loopback, each test with its own cluster name and discovery port, driven through the
//! operator subcommands (`status`, `members`, `leave`, `remove-node`) as an operator would.
//!
//! Nothing here assumes leadership stays put: `members` finds the leader itself (following
//! NotLeader hints), and every check polls until its condition holds or a generous deadline
//! passes. Test nodes get the default names `n1`, `n2`, ... from their `node-N` data dirs.

use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::TestCluster;

const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_secs(45);

/// Starts `n` nodes of a fresh test cluster and waits until they agree on one leader.
async fn converged_cluster(name: &str, n: usize) -> anyhow::Result<TestCluster> {
    let mut cluster = TestCluster::new(name, &[])?;
    for _ in 0..n {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(READY)?;
    }
    cluster.wait_converged(n, CONVERGE).await?;
    Ok(cluster)
}

/// Runs an operator subcommand; `Ok(stdout)` when it succeeded, `Err(stderr)` when it failed.
fn admin(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<Result<String, String>> {
    let output = cluster.admin(args)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    Ok(if output.status.success() {
        Ok(stdout)
    } else {
        Err(stderr)
    })
}

/// `server members --json`, parsed.
fn members(cluster: &TestCluster) -> anyhow::Result<Vec<Value>> {
    match admin(cluster, &["members", "--json"])? {
        Ok(stdout) => Ok(serde_json::from_str::<Vec<Value>>(&stdout)?),
        Err(stderr) => anyhow::bail!("members failed: {stderr}"),
    }
}

/// Polls `members --json` until `done` holds for the listing, and returns it.
fn members_until(
    cluster: &TestCluster,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + POLL;
    let mut last;
    loop {
        match members(cluster) {
            Ok(list) if done(&list) => return Ok(list),
            Ok(list) => last = format!("{list:#?}"),
            Err(e) => last = e.to_string(),
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "members never showed {what} within {POLL:?}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn member<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter().find(|m| m["name"] == name)
}

fn state_of(list: &[Value], name: &str) -> Option<String> {
    member(list, name).and_then(|m| m["state"].as_str().map(str::to_owned))
}

/// A member other than the leader, by name, from a listing.
fn a_follower(list: &[Value]) -> String {
    list.iter()
        .find(|m| m["state"] != "leader")
        .and_then(|m| m["name"].as_str())
        .expect("a cluster of several has a follower")
        .to_owned()
}

fn index_of_name(name: &str) -> usize {
    let n: usize = name
        .trim_start_matches('n')
        .parse()
        .expect("a default name nN");
    n - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_shown_by_status_and_members_and_a_killed_member_is_unreachable(
) -> anyhow::Result<()> {
    let mut cluster = converged_cluster("names", 3).await?;
    // status: every node announces its default name with its id.
    let status = admin(&cluster, &["status", "--json"])?.map_err(anyhow::Error::msg)?;
    let status: Vec<Value> = serde_json::from_str(&status)?;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let id = node.ready().expect("ready").id;
        let row = status
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("node {id} missing from {status:#?}"));
        assert_eq!(row["name"], format!("n{}", i + 1), "{row}");
    }
    // members: all three voters with names, exactly one leader.
    let list = members_until(&cluster, "three voters, one leader", |list| {
        list.len() == 3
            && list.iter().all(|m| m["voter"] == true)
            && list.iter().filter(|m| m["state"] == "leader").count() == 1
    })?;
    for name in ["n1", "n2", "n3"] {
        assert!(member(&list, name).is_some(), "{name} missing: {list:#?}");
    }
    // A killed member stays listed, as unreachable (whichever node leads by then).
    let victim = a_follower(&list);
    cluster.nodes[index_of_name(&victim)].kill9();
    let list = members_until(&cluster, &format!("{victim} unreachable"), |list| {
        state_of(list, &victim).as_deref() == Some("unreachable")
    })?;
    assert_eq!(list.len(), 3, "{list:#?}");
    assert_eq!(member(&list, &victim).expect("listed")["voter"], true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_leaves_stays_out_after_restart_and_rejoin_brings_it_back(
) -> anyhow::Result<()> {
    let mut cluster = converged_cluster("leave", 3).await?;
    let list = members_until(&cluster, "three voters", |list| {
        list.len() == 3 && list.iter().all(|m| m["voter"] == true)
    })?;
    let leaver = a_follower(&list);
    let index = index_of_name(&leaver);
    let said = admin(&cluster, &["leave", &leaver])?.map_err(anyhow::Error::msg)?;
    assert!(
        said.contains(&format!("{leaver} left the cluster")),
        "{said}"
    );
    // It stops by itself, and the others list two members.
    let status = cluster.nodes[index].wait_exit(POLL);
    assert!(
        status.is_some_and(|s| s.success()),
        "{leaver} did not stop cleanly: {status:?}\n{}",
        cluster.nodes[index].log_tail(20)
    );
    members_until(&cluster, &format!("two members without {leaver}"), |list| {
        list.len() == 2 && member(list, &leaver).is_none()
    })?;

    // Restarted without --rejoin, it says it left and stays out.
    cluster.relaunch(index, &[])?;
    let status = cluster.nodes[index].wait_exit(POLL);
    // The whole log (it keeps earlier runs too): a backtrace may follow the error line.
    let log = cluster.nodes[index].log_tail(400);
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(
        log.contains("has left the cluster") && log.contains("--rejoin"),
        "{log}"
    );
    let list = members(&cluster)?;
    assert_eq!(list.len(), 2, "{list:#?}");

    // With --rejoin it joins again (as a learner, then promoted) under its old name.
    cluster.relaunch(index, &["--rejoin"])?;
    cluster.nodes[index].wait_ready(READY)?;
    members_until(&cluster, &format!("{leaver} back as an up voter"), |list| {
        list.len() == 3
            && member(list, &leaver).is_some_and(|m| m["voter"] == true && m["state"] == "up")
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_leaves_and_the_other_voters_elect_a_new_one() -> anyhow::Result<()> {
    let mut cluster = converged_cluster("leave-leader", 3).await?;
    let list = members_until(&cluster, "three voters", |list| {
        list.len() == 3 && list.iter().all(|m| m["voter"] == true)
    })?;
    let leader = list
        .iter()
        .find(|m| m["state"] == "leader")
        .and_then(|m| m["name"].as_str())
        .expect("one leader")
        .to_owned();
    // If leadership moved since the listing, the node leaves as a follower; either way it
    // must end up out of the cluster with the others led by someone else.
    let said = admin(&cluster, &["leave", &leader])?.map_err(anyhow::Error::msg)?;
    assert!(
        said.contains(&format!("{leader} left the cluster")),
        "{said}"
    );
    let index = index_of_name(&leader);
    assert!(
        cluster.nodes[index].wait_exit(POLL).is_some(),
        "{}",
        cluster.nodes[index].log_tail(20)
    );
    let list = members_until(&cluster, "two members and a new leader", |list| {
        list.len() == 2
            && member(list, &leader).is_none()
            && list.iter().filter(|m| m["state"] == "leader").count() == 1
    })?;
    assert!(list.iter().all(|m| m["voter"] == true), "{list:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_node_by_name_takes_out_a_killed_node_and_unknown_names_are_refused(
) -> anyhow::Result<()> {
    let mut cluster = converged_cluster("remove", 3).await?;
    let list = members_until(&cluster, "three voters", |list| {
        list.len() == 3 && list.iter().all(|m| m["voter"] == true)
    })?;

    // Unknown names: refused, naming the value and the members; nothing changes.
    for command in ["remove-node", "leave"] {
        let refused =
            admin(&cluster, &[command, "nosuch"])?.expect_err("an unknown name must be refused");
        assert!(refused.contains("\"nosuch\""), "{command}: {refused}");
        assert!(
            refused.contains("nothing was changed"),
            "{command}: {refused}"
        );
        assert!(refused.contains("n1 (id "), "{command}: {refused}");
    }
    assert_eq!(members(&cluster)?.len(), 3);

    let victim = a_follower(&list);
    cluster.nodes[index_of_name(&victim)].kill9();
    members_until(&cluster, &format!("{victim} unreachable"), |list| {
        state_of(list, &victim).as_deref() == Some("unreachable")
    })?;
    // The leader may change meanwhile; remove-node finds the current one (and a victim that
    // became leader before dying would no longer be the leader here).
    let said = admin(&cluster, &["remove-node", &victim])?.map_err(anyhow::Error::msg)?;
    assert!(said.contains(&format!("{victim} (id ")), "{said}");
    assert!(said.contains("removed"), "{said}");
    members_until(&cluster, &format!("two members without {victim}"), |list| {
        list.len() == 2 && member(list, &victim).is_none()
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_voter_cannot_leave_and_nothing_changes() -> anyhow::Result<()> {
    let mut cluster = converged_cluster("last-voter", 1).await?;
    let refused = admin(&cluster, &["leave", "n1"])?.expect_err("the last voter must stay");
    assert!(refused.contains("last voter"), "{refused}");
    assert!(refused.contains("nothing was changed"), "{refused}");
    assert!(cluster.nodes[0].is_running());
    assert!(!cluster.nodes[0].data_dir().join("LEFT").exists());
    let list = members(&cluster)?;
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["name"], "n1");
    assert_eq!(list[0]["state"], "leader");
    Ok(())
}

/// An admin call needs the admin credential derived from the join token, and must name the
/// cluster: a leave with a wrong credential, or naming another cluster, is refused and changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_without_the_credential_or_for_another_cluster_is_refused() -> anyhow::Result<()> {
    let mut cluster = converged_cluster("stranger-leave", 2).await?;
    let token: proto::tls::JoinToken = cluster.token()?.parse()?;
    let target = cluster.nodes[1].ready().expect("ready");
    let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::Pinned(token.ca));
    let dialer = proto::tls::client_config(verifier, proto::tls::ALPN_RAFT);
    let request = node::LeaveRequest {
        cluster: cluster.cluster.clone(),
    };
    let refused = node::request_leave(&dialer, [1; 32], target.raft, target.id, request)
        .await
        .expect_err("a leave without the admin credential must be refused");
    assert!(
        refused.to_string().contains("admin credential"),
        "{refused}"
    );
    let request = node::LeaveRequest {
        cluster: "someone-else".into(),
    };
    let refused = node::request_leave(
        &dialer,
        token.admin_credential(),
        target.raft,
        target.id,
        request,
    )
    .await
    .expect_err("a leave for another cluster must be refused");
    assert!(refused.to_string().contains("wrong cluster"), "{refused}");
    assert!(cluster.nodes[1].is_running());
    assert!(!cluster.nodes[1].data_dir().join("LEFT").exists());
    let list = members(&cluster)?;
    assert_eq!(list.len(), 2, "{list:#?}");
    Ok(())
}
