//! A 3-node loopback cluster behind the `latency` nemesis's delay proxies, every node's
//! traffic delayed by a fixed one-way delay: for measuring with `bench ... --join` how the
//! cluster does when its links are slower than loopback. Runs for a bounded time, then kills
//! its nodes.
//!
//! `cargo run --release -p jepsen --example delayed_cluster -- SERVER DELAY_MS SECONDS DIR`

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use jepsen::live::cluster::{Cluster, ClusterSpec, StartOutcome};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, server, delay_ms, seconds, dir] = &args[..] else {
        anyhow::bail!("usage: delayed_cluster SERVER DELAY_MS SECONDS DIR");
    };
    let delay_ms: u64 = delay_ms.parse()?;
    let seconds: u64 = seconds.parse()?;
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir)?;
    let discovery_port = 20_000 + (std::process::id() % 20_000) as u16;
    let spec = ClusterSpec {
        server: PathBuf::from(server),
        cluster: "delayed".into(),
        discovery_port,
        broadcast: Ipv4Addr::new(127, 255, 255, 255),
        extra_args: [
            "--bootstrap-expect",
            "3",
            "--user-rate",
            "10000000",
            "--user-burst",
            "10000000",
            "--conn-rate",
            "10000000",
            "--conn-burst",
            "10000000",
            "--registration-ip-rate",
            "1000000",
            "--registration-ip-burst",
            "1000000",
            "--registration-node-rate",
            "1000000",
            "--registration-node-burst",
            "1000000",
        ]
        .map(String::from)
        .to_vec(),
    };
    let hosts: Vec<Ipv4Addr> = (0..3).map(|i| Ipv4Addr::new(127, 0, 0, 11 + i)).collect();
    let mut cluster = Cluster::new(spec, &dir, &hosts, None);
    cluster.add_delay_proxies().await?;
    for delay in &cluster.delays {
        delay.set(delay_ms);
    }
    for i in 0..3 {
        cluster.spawn(i)?;
    }
    for node in &mut cluster.nodes {
        match node.wait_start(Duration::from_secs(30)) {
            StartOutcome::Ready(_) => {}
            _ => anyhow::bail!("a node did not start"),
        }
    }
    println!("discovery_port={discovery_port} cluster=delayed");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    cluster.kill_all();
    Ok(())
}
