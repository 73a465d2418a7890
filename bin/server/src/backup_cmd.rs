//! The archive subcommands: `backup` (from a running cluster into one file), `verify` (check a
//! file) and `restore` (seed a new cluster's first node from a file, offline). The file format
//! and the node's side are in `node::backup`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use node::backup::{self, BackupIndex, BackupOpen, BackupWriter, Manifest, Verified};
use node::{BackupClient, MemberInfo, MemberState};

use crate::admin::{auth, find_member, label, leader_members, Auth};
use crate::{ArchiveAt, NetArgs};
use node::archive::{self, Archive, Until};

/// Whole backups tried before giving up, each from a node not tried before when one failed.
const ATTEMPTS: usize = 3;

#[derive(Args, Debug)]
pub(crate) struct BackupArgs {
    /// The file to write. It appears only when complete and verified (until then the bytes go
    /// to FILE.partial); an existing file is never overwritten.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The node that cuts the backup, by name or id (default: a caught-up follower, so the
    /// leader keeps its CPU and disk for writes; else the leader).
    #[arg(long)]
    node: Option<String>,
    /// Copy at most this many KiB per second from the node (0: as fast as it goes), to spare
    /// a busy cluster's network and the node's disk.
    #[arg(long, default_value_t = 0)]
    rate_kib: u64,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
    /// How long to listen for the cluster's announcements, in ms.
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    /// The backup file.
    file: PathBuf,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct RestoreArgs {
    /// The backup file (or give --from-archive).
    #[arg(
        required_unless_present = "from_archive",
        conflicts_with = "from_archive"
    )]
    file: Option<PathBuf>,
    /// Rebuild from a continuous archive instead of a file: `file:///dir` or
    /// `s3://bucket/prefix` (with --archive-endpoint for a private S3 server).
    #[arg(long, value_name = "URL")]
    from_archive: Option<String>,
    #[command(flatten)]
    archive_at: ArchiveAt,
    /// With --from-archive: stop at this log index, or at this time (RFC 3339,
    /// 2026-12-04T10:00:00Z: every entry up to the first stamped later). Default: everything
    /// archived.
    #[arg(long, requires = "from_archive", value_name = "INDEX|TIME")]
    until: Option<Until>,
    /// With --from-archive: the fingerprint of the CA the archive must be signed by (the old
    /// cluster's: the hex after `CC1-` in its join token; `archive-info` shows it too).
    /// Without it, the CA named in the archive is trusted and printed.
    #[arg(long, requires = "from_archive", value_name = "FINGERPRINT")]
    expect_ca: Option<String>,
    /// The data dir to create for the new cluster's first node (must not exist, or be empty).
    #[arg(long)]
    data_dir: PathBuf,
    /// The new node's name (default: from the data dir's name, as for `server`).
    #[arg(long, value_parser = crate::parse_name)]
    name: Option<String>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ArchiveInfoArgs {
    /// The archive: `file:///dir` or `s3://bucket/prefix`.
    #[arg(long, value_name = "URL")]
    archive: String,
    #[command(flatten)]
    archive_at: ArchiveAt,
    /// Also read every chunk and report how long messages waited to be archived (each
    /// chunk's seal time minus its messages' leader times): p50, p99, max.
    #[arg(long)]
    lag: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn backup(net: &NetArgs, args: &BackupArgs) -> anyhow::Result<()> {
    let auth = auth(net, None)?;
    let started = Instant::now();
    let mut failed: BTreeSet<u64> = BTreeSet::new();
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        match backup_once(net, args, &auth, &mut failed).await {
            Ok(verified) => {
                report(
                    &verified,
                    args.json,
                    Some(started.elapsed()),
                    &args.out.display().to_string(),
                );
                return Ok(());
            }
            Err(e) => {
                eprintln!("backup attempt {attempt} of {ATTEMPTS} failed: {e:#}");
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one attempt")).context(format!(
        "no backup written; {} is unchanged",
        args.out.display()
    ))
}

/// One whole backup: find the leader, take its read index, have a node cut at it, stream the
/// payload into the file. A node that fails is added to `failed`, so the next attempt picks
/// another.
async fn backup_once(
    net: &NetArgs,
    args: &BackupArgs,
    auth: &Auth,
    failed: &mut BTreeSet<u64>,
) -> anyhow::Result<Verified> {
    let (leader, leader_addr, members) = leader_members(net, auth, args.wait_ms).await?;
    let source = pick_source(&members, leader, args.node.as_deref(), failed)?;
    let source_addr = if source.id == leader {
        leader_addr
    } else {
        source
            .member
            .raft_addr
            .parse()
            .with_context(|| format!("the raft address {:?}", source.member.raft_addr))?
    };
    let cluster = net.cluster.clone();
    let min_index = if source.id == leader {
        None
    } else {
        let at_leader =
            BackupClient::connect(&auth.dialer, auth.admin, leader_addr, leader).await?;
        let index = at_leader
            .read_index(BackupIndex {
                cluster: cluster.clone(),
            })
            .await
            .context("taking the leader's read index")?;
        Some(index)
    };
    let client = BackupClient::connect(&auth.dialer, auth.admin, source_addr, source.id)
        .await
        .inspect_err(|_| {
            failed.insert(source.id);
        })?;
    let opened = match client.open(BackupOpen { cluster, min_index }).await {
        Ok(opened) => opened,
        Err(e) => {
            failed.insert(source.id);
            return Err(e).with_context(|| format!("node {} cutting the backup", label(source)));
        }
    };
    // Progress goes to stderr, even with --json (whose one object goes to stdout).
    eprintln!(
        "node {} cut the state at index {} ({} bytes); copying",
        label(source),
        opened.applied_index,
        opened.bytes
    );
    let mut writer = BackupWriter::create(&args.out, Manifest::for_session(&opened))?;
    let mut offset = 0;
    let copy_started = Instant::now();
    while writer.payload_left() > 0 {
        if args.rate_kib > 0 {
            let due = Duration::from_secs_f64(offset as f64 / (args.rate_kib as f64 * 1024.0));
            tokio::time::sleep(due.saturating_sub(copy_started.elapsed())).await;
        }
        let chunk = match client.read(opened.session, offset).await {
            Ok(chunk) if !chunk.is_empty() => chunk,
            Ok(_) => {
                failed.insert(source.id);
                let _ = std::fs::remove_file(backup::partial_path(&args.out));
                bail!("node {} sent an empty chunk at {offset}", label(source));
            }
            Err(e) => {
                failed.insert(source.id);
                let _ = std::fs::remove_file(backup::partial_path(&args.out));
                return Err(e)
                    .with_context(|| format!("reading the backup from node {}", label(source)));
            }
        };
        offset += chunk.len() as u64;
        if let Err(e) = writer.payload(&chunk) {
            let _ = std::fs::remove_file(backup::partial_path(&args.out));
            return Err(e.into());
        }
    }
    Ok(writer.finish()?)
}

/// The node to cut from: the one asked for; else a caught-up follower not failed before; else
/// the leader.
fn pick_source<'a>(
    members: &'a [MemberInfo],
    leader: u64,
    wanted: Option<&str>,
    failed: &BTreeSet<u64>,
) -> anyhow::Result<&'a MemberInfo> {
    if let Some(wanted) = wanted {
        let member = find_member(members, wanted)?;
        if failed.contains(&member.id) {
            bail!("node {} failed already; pick another --node", label(member));
        }
        return Ok(member);
    }
    let follower = members
        .iter()
        .find(|m| m.id != leader && m.state == MemberState::Up && !failed.contains(&m.id));
    let leader = members.iter().find(|m| m.id == leader);
    follower
        .or(leader)
        .context("the leader is not in its own membership")
}

pub(crate) fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let verified = backup::verify(&args.file)?;
    report(&verified, args.json, None, &args.file.display().to_string());
    Ok(())
}

pub(crate) async fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let nothing = || format!("nothing was created at {}", args.data_dir.display());
    let (restored, from_archive) = match (&args.file, &args.from_archive) {
        (Some(file), _) => (
            backup::restore(file, &args.data_dir, args.name.as_deref()).with_context(nothing)?,
            None,
        ),
        (None, Some(url)) => {
            let archive = Archive::open(&args.archive_at.config(url)).with_context(nothing)?;
            let until = args.until.unwrap_or(Until::End);
            let rebuilt = archive::restore(
                &archive,
                until,
                &args.data_dir,
                args.name.as_deref(),
                args.expect_ca.as_deref(),
            )
            .await
            .with_context(nothing)?;
            if args.expect_ca.is_none() {
                eprintln!(
                    "note: everything restored is signed by the CA named in the archive, {}; \
                     pass --expect-ca to require the one you trust",
                    rebuilt.ca
                );
            }
            let note = serde_json::json!({
                "ca": rebuilt.ca,
                "ca_checked": args.expect_ca.is_some(),
                "base_index": rebuilt.base_index,
                "chunks": rebuilt.chunks,
                "replayed": rebuilt.replayed,
                "index": rebuilt.index,
                "last_at_ms": rebuilt.last_at_ms,
            });
            (rebuilt.restored, Some(note))
        }
        (None, None) => bail!("give a backup file or --from-archive URL"),
    };
    let manifest = &restored.backup.manifest;
    if args.json {
        let line = serde_json::json!({
            "data_dir": args.data_dir,
            "cluster": manifest.cluster,
            "node_id": restored.node_id,
            "name": restored.name,
            "applied_index": manifest.applied_index,
            "contents": manifest.contents,
            "token": restored.token,
            "elapsed_s": started.elapsed().as_secs_f64(),
            "from_archive": from_archive,
        });
        println!("{line}");
        return Ok(());
    }
    println!(
        "restored {} into {} in {:.1}s: the first node ({}, id {}) of a new cluster {:?} with \
         a new CA and join token.",
        summary(manifest),
        args.data_dir.display(),
        started.elapsed().as_secs_f64(),
        restored.name,
        restored.node_id,
        manifest.cluster
    );
    if let Some(note) = &from_archive {
        println!(
            "from the archive: the base at index {} and {} entries from {} chunks, up to \
             index {}",
            note["base_index"], note["replayed"], note["chunks"], note["index"]
        );
    }
    println!(
        "start it:  cellchat-server --data-dir {} --cluster {}",
        args.data_dir.display(),
        manifest.cluster
    );
    match &restored.shared_ca {
        Ok(dir) => println!(
            "more nodes join it as any node joins: started with --data-root {} they find the \
             new CA in {}; elsewhere give them the token.",
            dir.parent()
                .map_or(String::from("."), |p| p.display().to_string()),
            dir.display()
        ),
        Err(e) => println!(
            "the new CA could not be shared next to the data dir ({e}): give other nodes the \
             token."
        ),
    }
    println!("clients and tools of the old cluster need the new token.");
    println!("join token (a secret): {}", restored.token);
    Ok(())
}

fn summary(manifest: &Manifest) -> String {
    let c = &manifest.contents;
    format!(
        "cluster {:?} at index {} ({} channels, {} messages, {} users, {} channel records, {} \
         dedup records)",
        manifest.cluster,
        manifest.applied_index,
        c.channels,
        c.messages,
        c.users,
        c.channel_records,
        c.dedup_records
    )
}

fn report(verified: &Verified, json: bool, elapsed: Option<Duration>, file: &str) {
    let manifest = &verified.manifest;
    if json {
        let line = serde_json::json!({
            "file": file,
            "bytes": verified.bytes,
            "sha256": hex::encode(verified.sha256),
            "elapsed_s": elapsed.map(|e| e.as_secs_f64()),
            "manifest": manifest,
        });
        println!("{line}");
        return;
    }
    println!(
        "{file}: a complete, verified backup of {}",
        summary(manifest)
    );
    println!(
        "  cut by node {} (id {}); {} bytes, sha256 {}{}",
        manifest.source_node.1,
        manifest.source_node.0,
        verified.bytes,
        hex::encode(verified.sha256),
        elapsed.map_or(String::new(), |e| format!("; took {:.1}s", e.as_secs_f64()))
    );
    println!("  secret material: {}", manifest.secrets);
}

pub(crate) async fn archive_info(args: &ArchiveInfoArgs) -> anyhow::Result<()> {
    let archive = Archive::open(&args.archive_at.config(&args.archive))?;
    let info = archive::describe(&archive).await?;
    let lag = if args.lag {
        archive::lag(&archive).await?
    } else {
        None
    };
    if args.json {
        let mut value = serde_json::to_value(&info)?;
        value["lag"] = serde_json::to_value(&lag)?;
        println!("{value}");
        return Ok(());
    }
    match &info.identity {
        Some(id) => println!(
            "{}: the archive of cluster {:?} (CA {})",
            info.archive, id.cluster, id.ca
        ),
        None => println!(
            "{}: no archive.json: empty, or not a cellchat archive",
            info.archive
        ),
    }
    for (index, created_ms, bytes) in &info.bases {
        println!("  base at index {index}, cut at {created_ms} ms, {bytes} bytes");
    }
    println!(
        "  {} chunks; highest archived index {}",
        info.chunks,
        info.last_index.map_or("none".to_owned(), |i| i.to_string())
    );
    let ranges: Vec<String> = info
        .restorable
        .iter()
        .map(|(a, b)| format!("{a}..={b}"))
        .collect();
    println!(
        "  restorable indexes: {}",
        if ranges.is_empty() {
            "none".to_owned()
        } else {
            ranges.join(", ")
        }
    );
    if let Some(lag) = &lag {
        println!(
            "  archive lag over {} messages: p50 {} ms, p99 {} ms, max {} ms",
            lag.messages, lag.p50_ms, lag.p99_ms, lag.max_ms
        );
    }
    Ok(())
}
