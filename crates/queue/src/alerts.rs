//! Alerts: what operators must hear of without watching — a queue backlog,
//! a worker gone silent, a job type failing. Judged every few seconds from
//! the database (so every gateway judges the same facts), shown on the
//! dashboard, exported as metrics, and POSTed as JSON to
//! `QUERN_ALERT_WEBHOOK_URL` once when an alert starts and once when it
//! resolves, never again while it lasts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::leader::Leader;
use crate::stats;
use crate::telemetry::{ALERTS_ACTIVE, ALERTS_FIRED, WORKERS_OFFLINE, WORKERS_UNSEEN};
use quern_store::{JobStatus, Store, StoreError, WorkerRow};

/// The kinds of alert, as named in metrics, webhooks and the rules file.
pub const QUEUE_BACKLOG: &str = "queue_backlog";
pub const WORKER_OFFLINE: &str = "worker_offline";
pub const FAILURE_RATE: &str = "failure_rate";
pub const SLOW_JOBS: &str = "slow_jobs";

/// Thresholds (QUERN_ALERT_*).
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// Fires when more jobs than this are pending.
    pub queue_pending: i64,
    /// Fires when no worker has been seen beating for this long (however
    /// they stopped), or, while others run, for each worker silent this long.
    pub worker_offline: Duration,
    /// Fires for a type whose error rate over `failure_window` is above this…
    pub failure_rate: f64,
    pub failure_window: Duration,
    /// …once at least this many of its jobs ended in the window.
    pub failure_min_jobs: u64,
    /// Fires for a type whose completed jobs' p95 time from enqueue to end
    /// over `failure_window` is above this.
    pub p95_latency: Duration,
    /// How often the conditions are judged.
    pub check_every: Duration,
    /// Where starts and resolves are POSTed, if anywhere.
    pub webhook: Option<String>,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            queue_pending: 50,
            worker_offline: Duration::from_secs(300),
            failure_rate: 0.05,
            failure_window: Duration::from_secs(900),
            failure_min_jobs: 10,
            p95_latency: Duration::from_secs(30),
            check_every: Duration::from_secs(10),
            webhook: None,
        }
    }
}

/// An alert that is firing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    /// `queue_backlog`, `worker_offline`, `failure_rate` or `slow_jobs`.
    pub kind: String,
    /// What it is about: the worker id or the job type; empty for the queue.
    pub subject: String,
    pub message: String,
    pub since: DateTime<Utc>,
}

/// When judging began, and the newest worker heartbeat ever read.
#[derive(Debug, Default)]
struct WorkersSeen {
    judging_since: Option<DateTime<Utc>>,
    heartbeat: Option<DateTime<Utc>>,
}

/// What the webhook receives.
#[derive(Debug, Clone, Serialize)]
struct Notice {
    /// `firing` or `resolved`.
    status: &'static str,
    #[serde(flatten)]
    alert: Alert,
    resolved_at: Option<DateTime<Utc>>,
}

/// The alerts firing now, and the judge that keeps them current.
pub struct Alerts {
    settings: AlertSettings,
    active: Mutex<BTreeMap<(String, String), Alert>>,
    /// When judging began, and the newest worker heartbeat ever read. A
    /// worker that stops cleanly removes its row, so the rows alone cannot
    /// say how long the fleet has been without one.
    worker_last_seen: Mutex<WorkersSeen>,
    notices: Option<mpsc::UnboundedSender<Notice>>,
    /// Only the leader posts to the webhook: every process judges (each
    /// shows the alerts), one pages.
    leader: Leader,
}

impl Alerts {
    /// Without a runtime's webhook sender; [`Alerts::start`] adds one.
    pub fn new(settings: AlertSettings) -> Self {
        Self {
            settings,
            active: Mutex::default(),
            worker_last_seen: Mutex::default(),
            notices: None,
            leader: Leader::always(),
        }
    }

    /// Starts judging every `check_every` until `stop`, posting to the
    /// webhook (in order, each retried briefly) when one is set.
    pub fn start(settings: AlertSettings, store: Arc<dyn Store>, leader: Leader, stop: CancellationToken) -> Arc<Self> {
        let mut alerts = Self { leader, ..Self::new(settings) };
        if let Some(url) = alerts.settings.webhook.clone() {
            let (sender, receiver) = mpsc::unbounded_channel();
            alerts.notices = Some(sender);
            tokio::spawn(post_notices(url, receiver));
        }
        let alerts = Arc::new(alerts);
        let judge = alerts.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(judge.settings.check_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(error) = judge.check(store.as_ref(), Utc::now()).await {
                    tracing::warn!(%error, "judging alerts failed; the last known alerts stand");
                }
            }
        });
        alerts
    }

    pub fn settings(&self) -> &AlertSettings {
        &self.settings
    }

    /// The alerts firing now, oldest first.
    pub fn active(&self) -> Vec<Alert> {
        let mut alerts: Vec<Alert> = self.lock().values().cloned().collect();
        alerts.sort_by_key(|a| a.since);
        alerts
    }

    /// Judges every condition at `now`: alerts that begin are added and
    /// announced, alerts whose condition passed are removed and announced.
    pub async fn check(&self, store: &dyn Store, now: DateTime<Utc>) -> Result<(), StoreError> {
        let firing = self.conditions(store, now).await?;
        let mut notices = Vec::new();
        {
            let mut active = self.lock();
            active.retain(|key, alert| {
                let goes_on = firing.iter().any(|f| (&f.kind, &f.subject) == (&key.0, &key.1));
                if !goes_on {
                    notices.push(Notice { status: "resolved", alert: alert.clone(), resolved_at: Some(now) });
                }
                goes_on
            });
            for alert in firing {
                let key = (alert.kind.clone(), alert.subject.clone());
                if let Some(existing) = active.get_mut(&key) {
                    // Same alert, fresher figures; its start stays.
                    existing.message = alert.message;
                } else {
                    metrics::counter!(ALERTS_FIRED, "alert" => alert.kind.clone()).increment(1);
                    notices.push(Notice { status: "firing", alert: alert.clone(), resolved_at: None });
                    active.insert(key, alert);
                }
            }
            for kind in [QUEUE_BACKLOG, WORKER_OFFLINE, FAILURE_RATE, SLOW_JOBS] {
                let count = active.keys().filter(|(k, _)| k == kind).count();
                metrics::gauge!(ALERTS_ACTIVE, "alert" => kind).set(count as f64);
            }
        }
        for notice in notices {
            match notice.status {
                "firing" => {
                    tracing::warn!(alert = %notice.alert.kind, subject = %notice.alert.subject, detail = %notice.alert.message, "alert firing")
                }
                _ => tracing::info!(alert = %notice.alert.kind, subject = %notice.alert.subject, "alert resolved"),
            }
            if let Some(sender) = &self.notices
                && self.leader.is_leader()
            {
                let _ = sender.send(notice);
            }
        }
        Ok(())
    }

    async fn conditions(&self, store: &dyn Store, now: DateTime<Utc>) -> Result<Vec<Alert>, StoreError> {
        let settings = &self.settings;
        let mut firing = Vec::new();
        let counts = store.count_by_status().await?;
        let pending = counts.iter().find(|(s, _)| *s == JobStatus::Pending).map_or(0, |(_, n)| *n);
        if pending > settings.queue_pending {
            firing.push(Alert {
                kind: QUEUE_BACKLOG.into(),
                subject: String::new(),
                message: format!("{pending} jobs pending, more than the threshold of {}", settings.queue_pending),
                since: now,
            });
        }
        let workers = store.workers().await?;
        let silent = |worker: &WorkerRow| (now - worker.last_heartbeat_at).to_std().unwrap_or_default();
        let offline = workers.iter().filter(|worker| silent(worker) > settings.worker_offline).count();
        let last_seen = {
            let mut seen = self.worker_last_seen.lock().unwrap_or_else(|e| e.into_inner());
            let newest = workers.iter().map(|worker| worker.last_heartbeat_at).max();
            seen.heartbeat = [seen.heartbeat, newest].into_iter().flatten().max();
            // Never a worker: counted from when judging began.
            let since = *seen.judging_since.get_or_insert(now);
            seen.heartbeat.unwrap_or(since)
        };
        let unseen = (now - last_seen).to_std().unwrap_or_default();
        metrics::gauge!(WORKERS_UNSEEN).set(unseen.as_secs_f64());
        if offline < workers.len() {
            // Some worker runs: each silent one is its own alert.
            for worker in workers.iter().filter(|worker| silent(worker) > settings.worker_offline) {
                firing.push(Alert {
                    kind: WORKER_OFFLINE.into(),
                    message: format!(
                        "worker {} on {} has not sent a heartbeat for {} s (threshold {} s)",
                        worker.id,
                        worker.host,
                        silent(worker).as_secs(),
                        settings.worker_offline.as_secs()
                    ),
                    subject: worker.id.clone(),
                    since: now,
                });
            }
        } else if unseen > settings.worker_offline {
            // None runs, however they stopped (killed, or gone cleanly): the
            // seed's "worker offline", one alert for the fleet.
            firing.push(Alert {
                kind: WORKER_OFFLINE.into(),
                message: format!(
                    "no worker has been seen for {} s (threshold {} s): jobs wait until one runs",
                    unseen.as_secs(),
                    settings.worker_offline.as_secs()
                ),
                subject: String::new(),
                since: now,
            });
        }
        metrics::gauge!(WORKERS_OFFLINE).set(offline as f64);
        let window = chrono::TimeDelta::from_std(settings.failure_window).unwrap_or(chrono::TimeDelta::MAX);
        let counts = store.outcome_counts(now - window).await?;
        for stats in stats::by_type(&counts, &[]) {
            let ended = stats.completed + stats.failed;
            match stats.error_rate {
                Some(rate) if ended >= settings.failure_min_jobs && rate > settings.failure_rate => {
                    firing.push(Alert {
                        kind: FAILURE_RATE.into(),
                        message: format!(
                            "{} of the last {ended} {} jobs failed ({:.0} %, threshold {:.0} %) in {} s",
                            stats.failed,
                            stats.job_type,
                            rate * 100.0,
                            settings.failure_rate * 100.0,
                            settings.failure_window.as_secs()
                        ),
                        subject: stats.job_type,
                        since: now,
                    });
                }
                _ => {}
            }
        }
        // Latency as the seeds mean it: from enqueue to end, waiting included;
        // the run time is said beside it.
        let limit_ms = settings.p95_latency.as_secs_f64() * 1e3;
        let run_times = store.run_times(now - window, false).await?;
        for latency in store.latencies(now - window).await? {
            if latency.p95_ms > limit_ms {
                let ran = run_times
                    .iter()
                    .find(|times| times.job_type == latency.job_type)
                    .map_or(String::new(), |times| format!(", of which running {:.1} s", times.p95_ms / 1e3));
                firing.push(Alert {
                    kind: SLOW_JOBS.into(),
                    message: format!(
                        "{} jobs took {:.1} s from enqueue to end at the 95th percentile{ran} over {} s (threshold {} s)",
                        latency.job_type,
                        latency.p95_ms / 1e3,
                        settings.failure_window.as_secs(),
                        settings.p95_latency.as_secs()
                    ),
                    subject: latency.job_type,
                    since: now,
                });
            }
        }
        Ok(firing)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Alert>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Posts notices in the order they came, each retried a few times; one that
/// still fails is logged and dropped so later ones are not held up.
async fn post_notices(url: String, mut notices: mpsc::UnboundedReceiver<Notice>) {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the alert webhook client; alerts are not posted");
            return;
        }
    };
    while let Some(notice) = notices.recv().await {
        let body = match serde_json::to_vec(&notice) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(%error, "cannot encode an alert notice");
                continue;
            }
        };
        let post = || async {
            client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await?
                .error_for_status()
                .map(drop)
        };
        let backoff = ExponentialBuilder::default().with_min_delay(Duration::from_millis(200)).with_max_times(3);
        if let Err(error) = post.retry(backoff).await {
            tracing::warn!(alert = %notice.alert.kind, status = notice.status, %error, "could not post an alert to the webhook");
        }
    }
}
