//! Rotating the join secret (`server token --rotate`) while the cluster runs.
//!
//! The secret that admits newcomers must be the same on every member, including members that
//! were down during a rotation and catch up later from a snapshot. So a rotation is a log
//! entry: the leader draws a fresh secret and proposes [`Command::SetJoinSecret`]; the chat
//! state keeps the last one, and snapshots carry it.
//!
//! Each member follows the chat state ([`follow`]): after any apply or snapshot install that
//! may have changed the secret, and once at start (a crash can fall between an apply and the
//! token file write), it makes its token's secret the state's
//! ([`NodeTls::adopt_secret`]). Until the first rotation the state holds no secret and the
//! token made at bootstrap stands. The CA never changes, so members keep their certificates
//! and clients keep their pins; only enrollments and admin calls need the new token.

use std::sync::Arc;

use chat_sm::{ChatResponse, ChatState, Command, JoinSecret};
use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::cluster::{check_cluster, JoinError};
use crate::pki::NodeTls;
use crate::raft::Raft;

/// Asks the leader to replace the join secret (`server token --rotate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateRequest {
    /// The cluster the caller means.
    pub cluster: String,
}

/// The leader's side of a rotation: proposes a fresh secret, waits for it to apply here and
/// returns the new token (`CC1-...`).
///
/// # Errors
/// [`JoinError::WrongCluster`]; [`JoinError::NotLeader`] with the leader this node knows;
/// [`JoinError::Busy`] when the entry could not be committed (retry).
pub async fn handle_rotate(
    raft: &Raft,
    cluster: &str,
    tls: &NodeTls,
    request: &RotateRequest,
) -> Result<String, JoinError> {
    check_cluster(cluster, &request.cluster)?;
    let metrics = crate::raft::metrics_now(raft);
    if metrics.state != ServerState::Leader {
        let leader = metrics.current_leader;
        return Err(JoinError::NotLeader { leader });
    }
    let secret: [u8; proto::tls::SECRET_BYTES] = rand::random();
    let command = Command::SetJoinSecret(JoinSecret(secret.to_vec()));
    match raft.client_write(command.into()).await {
        Ok(response) => match response.data {
            ChatResponse::JoinSecretSet => {}
            other => {
                return Err(JoinError::Busy(format!(
                    "the state machine answered {other:?}"
                )))
            }
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            return Err(JoinError::NotLeader {
                leader: f.leader_id,
            })
        }
        Err(e) => return Err(JoinError::Busy(e.to_string())),
    }
    // Applied here already; adopt it before answering so the caller's next admin call, with
    // the new token, is accepted by this node at once.
    tls.adopt_secret(cluster, secret)
        .map_err(|e| JoinError::Busy(format!("the new secret is committed, but {e}")))?;
    tracing::info!("join secret rotated");
    Ok(tls.token().to_string())
}

/// Keeps `tls`'s token on the secret in `chat`: at once, then each time `changed` is notified
/// (by the apply listener, on an event with `join_secret_changed`). Runs until the node stops.
pub async fn follow(
    tls: Arc<NodeTls>,
    chat: Arc<ChatState>,
    cluster: String,
    changed: Arc<Notify>,
) {
    loop {
        adopt(&tls, &chat, &cluster);
        changed.notified().await;
    }
}

fn adopt(tls: &NodeTls, chat: &ChatState, cluster: &str) {
    let Some(secret) = chat.join_secret() else {
        return;
    };
    let Ok(secret) = <[u8; proto::tls::SECRET_BYTES]>::try_from(secret.as_slice()) else {
        // Only a leader of this build proposes secrets, always of this length.
        tracing::error!(
            len = secret.len(),
            "the replicated join secret has a length this build cannot use; the token is unchanged"
        );
        return;
    };
    match tls.adopt_secret(cluster, secret) {
        Ok(true) => tracing::info!("the join secret changed; the node's token follows it"),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "could not keep the new join token"),
    }
}
