//! Who is here now: per-topic counts of the sessions that joined (a page's viewers, say).
//! Ephemeral and per node: a count lives in memory, goes down when its session ends (a
//! data channel closed, a connection timed out), and never enters the Raft log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Most topics a node counts at once (each session joins at most a few).
pub const TOPICS_MAX: usize = 100_000;

#[derive(Default)]
pub struct Presence {
    topics: Mutex<HashMap<String, watch::Sender<u64>>>,
}

/// A session's place in a topic's count; leaving is dropping it.
pub struct Joined {
    presence: Arc<Presence>,
    topic: String,
    count: watch::Receiver<u64>,
}

impl Presence {
    /// Counts one more viewer of `topic`; the count follows until the returned guard is
    /// dropped. `None` when the node counts too many topics already.
    pub fn join(self: &Arc<Presence>, topic: &str) -> Option<Joined> {
        let mut topics = self.topics.lock().expect("presence lock poisoned");
        if !topics.contains_key(topic) && topics.len() >= TOPICS_MAX {
            return None;
        }
        let sender = topics
            .entry(topic.to_string())
            .or_insert_with(|| watch::channel(0).0);
        sender.send_modify(|n| *n += 1);
        Some(Joined {
            presence: self.clone(),
            topic: topic.to_string(),
            count: sender.subscribe(),
        })
    }

    /// The count of `topic` now.
    pub fn count(&self, topic: &str) -> u64 {
        self.topics
            .lock()
            .expect("presence lock poisoned")
            .get(topic)
            .map_or(0, |s| *s.borrow())
    }
}

impl Joined {
    /// The count, as it changes.
    pub fn count(&mut self) -> &mut watch::Receiver<u64> {
        &mut self.count
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let mut topics = self.presence.topics.lock().expect("presence lock poisoned");
        if let Some(sender) = topics.get(&self.topic) {
            sender.send_modify(|n| *n = n.saturating_sub(1));
            if *sender.borrow() == 0 {
                topics.remove(&self.topic);
            }
        }
    }
}
