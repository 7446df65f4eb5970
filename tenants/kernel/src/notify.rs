//! Cross-instance change notifications over PostgreSQL LISTEN/NOTIFY.
//!
//! One dedicated connection (not pooled, and never through PgBouncer, which
//! cannot LISTEN in transaction mode) listens on the registered channels. On
//! every (re)connect handlers receive [`ListenEvent::Connected`], meaning "you
//! may have missed notifications: reload"; while disconnected they receive
//! [`ListenEvent::Disconnected`] so caches can stop trusting themselves.
//! [`ListenerHealth`] says how long it has been down, for readiness. The
//! connection names itself `plinth listener` (`application_name`), so an
//! operator finds it in `pg_stat_activity`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio_postgres::AsyncMessage;

/// What a channel handler is told.
#[derive(Debug, Clone, Copy)]
pub enum ListenEvent<'a> {
    Connected,
    Notified(&'a str),
    Disconnected,
}

pub type Handler = Arc<dyn Fn(ListenEvent<'_>) + Send + Sync>;

/// The `application_name` of the listening connection.
pub const APPLICATION_NAME: &str = "plinth listener";

/// Whether the listener is connected, and if not, since when. Cheap to
/// clone; every clone sees the same state.
#[derive(Clone, Debug)]
pub struct ListenerHealth {
    down_since: Arc<Mutex<Option<Instant>>>,
}

impl ListenerHealth {
    /// Down from now: not connected yet.
    fn new() -> Self {
        Self { down_since: Arc::new(Mutex::new(Some(Instant::now()))) }
    }

    fn set(&self, connected: bool) {
        let mut down = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if connected {
            *down = None;
        } else {
            down.get_or_insert_with(Instant::now);
        }
    }

    /// How long the listener has been down (since start if it never
    /// connected); `None` while it is connected.
    pub fn down_for(&self) -> Option<Duration> {
        self.down_since.lock().unwrap_or_else(|p| p.into_inner()).map(|since| since.elapsed())
    }
}

/// Collects channel handlers, then runs the listening task.
pub struct Listener {
    handlers: HashMap<&'static str, Vec<Handler>>,
    health: ListenerHealth,
}

impl Default for Listener {
    fn default() -> Self {
        Self { handlers: HashMap::new(), health: ListenerHealth::new() }
    }
}

impl Listener {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `handler` for every event on `channel`.
    pub fn on(&mut self, channel: &'static str, handler: Handler) -> &mut Self {
        self.handlers.entry(channel).or_default().push(handler);
        self
    }

    /// The connection state of this listener, for readiness.
    pub fn health(&self) -> ListenerHealth {
        self.health.clone()
    }

    /// Starts listening in the background, reconnecting with backoff forever.
    pub fn spawn(self, url: String) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.listen_once(&url).await {
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(err) => {
                        tracing::warn!(error = format!("{err:#}"), "notification listener disconnected; reconnecting")
                    }
                }
                self.health.set(false);
                self.broadcast(ListenEvent::Disconnected);
                tokio::time::sleep(backoff).await;
                // At most a second: after a restart the caches are bypassed until it
                // is back, and each reconnect is one connection attempt.
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        })
    }

    fn broadcast(&self, event: ListenEvent<'_>) {
        for handler in self.handlers.values().flatten() {
            handler(event);
        }
    }

    async fn listen_once(&self, url: &str) -> anyhow::Result<()> {
        let mut target = crate::postgres::Target::parse(url)?;
        target.config_mut().application_name(APPLICATION_NAME);
        let (client, mut connection) = target.connect().await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(Ok((n.channel().to_owned(), n.payload().to_owned()))).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        let _ = tx.send(Err(err));
                        break;
                    }
                }
            }
        });
        let listen: String = self.handlers.keys().map(|c| format!("LISTEN \"{c}\";")).collect();
        let result = async {
            client.batch_execute(&listen).await?;
            tracing::debug!("notification listener connected");
            self.health.set(true);
            self.broadcast(ListenEvent::Connected);
            let mut ping = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(Ok((channel, payload))) => {
                            for handler in self.handlers.get(channel.as_str()).into_iter().flatten() {
                                handler(ListenEvent::Notified(&payload));
                            }
                        }
                        Some(Err(err)) => return Err(err),
                        None => return Ok(()),
                    },
                    // A silent network failure would otherwise go unnoticed.
                    _ = ping.tick() => {
                        match tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await {
                            Ok(answer) => { answer?; }
                            Err(_) => {
                                tracing::warn!("notification listener ping timed out");
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
        .await;
        driver.abort();
        Ok(result?)
    }
}
