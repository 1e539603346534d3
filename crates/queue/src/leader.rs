//! One process leads the fleet's maintenance: reaping lapsed leases, pruning
//! old jobs and handler versions, purging the cache, posting alert webhooks
//! and judging canaries. Every process runs the same loops and each asks
//! [`Leader::is_leader`] before acting, so three gateways post one webhook
//! per alert and no two processes prune at once.
//!
//! On PostgreSQL the lead is a session advisory lock held on a connection of
//! its own: when the leader dies its connection closes, the lock goes with
//! it, and another process takes it within [`RETRY`]. On SQLite the one
//! process that serves the file leads.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use quern_store::Store;

/// How often a process that does not lead tries to.
pub const RETRY: Duration = Duration::from_millis(500);
/// How often the leader checks that its lock's connection is still up.
const CHECK: Duration = Duration::from_secs(1);

/// Whether this process leads maintenance now. Cheap to clone and to ask.
#[derive(Clone, Debug)]
pub struct Leader(watch::Receiver<bool>);

impl Leader {
    /// A process that always leads (a single process, tests, benches).
    pub fn always() -> Self {
        Self(watch::channel(true).1)
    }

    /// Competes for the lead until `stop`, taking it whenever it is free.
    pub fn elect(store: Arc<dyn Store>, stop: CancellationToken) -> Self {
        let (leads, leader) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                match store.try_lead().await {
                    Ok(Some(mut lock)) => {
                        tracing::info!("this process leads maintenance");
                        leads.send_replace(true);
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                () = tokio::time::sleep(CHECK) => {}
                            }
                            if let Err(error) = lock.check().await {
                                tracing::warn!(%error, "lost the maintenance lead; another process takes it");
                                break;
                            }
                        }
                        leads.send_replace(false);
                    }
                    Ok(None) => {}
                    Err(error) => tracing::debug!(%error, "cannot compete for the maintenance lead yet"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        });
        Self(leader)
    }

    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }
}
