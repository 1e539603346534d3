//! How many event streams one user may hold open at once
//! (`QUERN_MAX_STREAMS_PER_USER`). A stream holds a connection for up to
//! fifteen minutes, so without a cap one valid token could hold every
//! connection the gateway has. Service callers are not capped: they are the
//! operator's own backends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The cap unless set (`QUERN_MAX_STREAMS_PER_USER`).
pub const DEFAULT_PER_USER: u32 = 10;

pub struct StreamLimit {
    per_user: u32,
    open: Mutex<HashMap<String, u32>>,
}

impl StreamLimit {
    /// `None` for 0: no cap.
    pub fn per_user(per_user: u32) -> Option<Arc<Self>> {
        (per_user > 0).then(|| Arc::new(Self { per_user, open: Mutex::default() }))
    }

    pub fn limit(&self) -> u32 {
        self.per_user
    }

    /// A place for one more of `user`'s streams, held until dropped; `None`
    /// when the user already holds the most allowed.
    pub fn open(self: &Arc<Self>, user: &str) -> Option<OpenStream> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(user.to_string()).or_default();
        if *count >= self.per_user {
            return None;
        }
        *count += 1;
        Some(OpenStream { limit: self.clone(), user: user.to_string() })
    }
}

/// One open stream's place; the stream carries it and gives it back when it
/// ends or its client goes away.
pub struct OpenStream {
    limit: Arc<StreamLimit>,
    user: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                // Forget the user, so the table holds only users with streams.
                open.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_holds_at_most_the_limit_and_a_closed_stream_frees_its_place() {
        let limit = StreamLimit::per_user(2).unwrap();
        let first = limit.open("alice").unwrap();
        let _second = limit.open("alice").unwrap();
        assert!(limit.open("alice").is_none(), "a third is refused");
        assert!(limit.open("bob").is_some(), "another user is not counted against alice");
        drop(first);
        assert!(limit.open("alice").is_some(), "a closed stream's place is free again");
    }

    #[test]
    fn users_without_streams_are_forgotten() {
        let limit = StreamLimit::per_user(1).unwrap();
        drop(limit.open("alice").unwrap());
        assert!(limit.open.lock().unwrap().is_empty());
        assert!(StreamLimit::per_user(0).is_none(), "0 turns the cap off");
    }
}
