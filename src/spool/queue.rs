//! The spool on disk: one directory per message, made durable before the
//! device hears `250`, and retired only once the message is delivered or
//! its sender was told it failed.
//!
//! ```text
//! dir/tmp/ID/        being written; whatever is here at start is removed
//! dir/queue/ID/      message, envelope.json, status.json, sending
//! dir/dead/ID/       what could be neither delivered nor bounced
//! dir/retry/ID       `oxbridge queue retry` asks the worker to try now
//! ```
//!
//! A message enters `queue/` by one rename of its directory, after its
//! files and the directory itself are synced, and the parent is synced
//! after the rename: a crash leaves it either whole in `queue/` or in
//! `tmp/`, never half. `sending` marks a message whose end went upstream
//! but whose outcome is not yet recorded: found at start, it may have
//! been delivered already (a duplicate when it is sent again).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

const MESSAGE: &str = "message";
const ENVELOPE: &str = "envelope.json";
const STATUS: &str = "status.json";
const SENDING: &str = "sending";

/// What the device said about a message; written once, when it is taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    /// The `[[account]]` (its `login` in the config) the message is sent
    /// as: the device's, or the `[[relay]]` rule's.
    pub account: String,
    /// The XOAUTH2 user it is sent as (a shared mailbox, or the account's).
    pub mailbox: String,
    /// Taken from a device on a `[[relay]]` network, without a password.
    #[serde(default)]
    pub relay: bool,
    /// The reverse path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    /// MAIL parameters passed on upstream (`BODY=8BITMIME`).
    #[serde(default)]
    pub params: Vec<String>,
    /// Unix seconds.
    pub received_at: u64,
    pub client: String,
    pub helo: String,
    pub size: u64,
    /// This message is a delivery status notification oxbridge wrote (it
    /// is never bounced in turn).
    #[serde(default)]
    pub report: bool,
}

/// How delivery is going; rewritten after every attempt.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub attempts: u32,
    /// Unix seconds; 0: now.
    pub next_attempt_at: u64,
    pub last_error: Option<String>,
    /// Recipients done with: delivered, or reported to the sender.
    #[serde(default)]
    pub done: Vec<String>,
    /// Why the message is in `dead/`.
    #[serde(default)]
    pub dead_because: Option<String>,
    /// Attempts that ended in a panic (a bug), not in an answer.
    #[serde(default)]
    pub panics: u32,
    /// Unix seconds: when `oxbridge queue retry` put the message back from
    /// `dead/`. `max_age_h` counts from then, so that it gets real attempts.
    #[serde(default)]
    pub retried_at: Option<u64>,
}

impl Status {
    /// Since when `max_age_h` counts: the message's arrival, or its last
    /// return from the dead-letter folder.
    pub fn age_from(&self, received_at: u64) -> u64 {
        self.retried_at.unwrap_or(0).max(received_at)
    }
}

impl Envelope {
    /// The recipients still to deliver to.
    pub fn pending<'a>(&'a self, status: &'a Status) -> impl Iterator<Item = &'a String> {
        self.recipients
            .iter()
            .filter(|r| !status.done.iter().any(|d| d.eq_ignore_ascii_case(r)))
    }

    /// The recipients still to deliver to, in a few words: `-`, `a@x`,
    /// or `a@x (+2)`.
    pub fn pending_summary(&self, status: &Status) -> String {
        let pending: Vec<&String> = self.pending(status).collect();
        match pending.as_slice() {
            [] => "-".to_string(),
            [one] => one.to_string(),
            [first, rest @ ..] => format!("{first} (+{})", rest.len()),
        }
    }
}

/// Where a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Queue,
    Dead,
}

impl Place {
    fn dir(self) -> &'static str {
        match self {
            Place::Queue => "queue",
            Place::Dead => "dead",
        }
    }
}

/// The spool directory.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new message id: its time (milliseconds, hex) and a random suffix,
/// so that ids sort by arrival.
fn new_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{ms:011x}{:04x}", rand::random::<u16>())
}

/// Whether `id` can name a message (no path tricks from the command line).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Write `bytes` to `path` durably: a temporary file, synced, renamed over.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = create_private(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn bad_id(id: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{id:?} is not a message id"),
    )
}

impl Queue {
    /// Open (and create, 0700) the spool at `dir`. Drafts in `tmp/` are
    /// left alone: they may be a running server's messages in the making
    /// (`oxbridge check` opens the spool too); only `run` clears them.
    pub fn open(dir: &Path) -> io::Result<Queue> {
        let q = Queue {
            dir: dir.to_path_buf(),
        };
        for sub in ["", "tmp", "queue", "dead", "retry"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))?;
        }
        Ok(q)
    }

    /// Remove what a crash left in `tmp/`: drafts of messages never
    /// acknowledged. Only for the server that owns the spool, at start.
    pub fn clear_drafts(&self) {
        if let Ok(entries) = fs::read_dir(self.dir.join("tmp")) {
            for entry in entries.flatten() {
                let _ = fs::remove_dir_all(entry.path()).or_else(|_| fs::remove_file(entry.path()));
            }
        }
    }

    /// Open an existing spool without changing it (`oxbridge queue`).
    pub fn existing(dir: &Path) -> io::Result<Queue> {
        if !dir.join("queue").is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} holds no spool", dir.display()),
            ));
        }
        Ok(Queue {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, place: Place, id: &str) -> PathBuf {
        self.dir.join(place.dir()).join(id)
    }

    /// Start a new message in `tmp/`.
    pub fn draft(&self) -> io::Result<Draft> {
        let id = new_id();
        let dir = self.dir.join("tmp").join(&id);
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let file = create_private(&dir.join(MESSAGE))?;
        Ok(Draft {
            queue: self.clone(),
            id,
            dir,
            file: Some(file),
            size: 0,
        })
    }

    /// The ids in `place`, oldest first.
    pub fn ids(&self, place: Place) -> io::Result<Vec<String>> {
        let mut ids: Vec<String> = fs::read_dir(self.dir.join(place.dir()))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| valid_id(id))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Where `id` is, if anywhere.
    pub fn find(&self, id: &str) -> Option<Place> {
        if !valid_id(id) {
            return None;
        }
        [Place::Queue, Place::Dead]
            .into_iter()
            .find(|p| self.path(*p, id).join(ENVELOPE).is_file())
    }

    pub fn load(&self, place: Place, id: &str) -> io::Result<(Envelope, Status)> {
        if !valid_id(id) {
            return Err(bad_id(id));
        }
        let dir = self.path(place, id);
        let envelope: Envelope = serde_json::from_slice(&fs::read(dir.join(ENVELOPE))?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let status = match fs::read(dir.join(STATUS)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Status::default(),
            Err(e) => return Err(e),
        };
        Ok((envelope, status))
    }

    pub fn message_path(&self, place: Place, id: &str) -> PathBuf {
        self.path(place, id).join(MESSAGE)
    }

    pub fn save_status(&self, place: Place, id: &str, status: &Status) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(status).map_err(io::Error::other)?;
        write_atomic(&self.path(place, id).join(STATUS), &bytes)
    }

    /// Mark that the end of `id` is about to go upstream.
    pub fn mark_sending(&self, id: &str) -> io::Result<()> {
        let path = self.path(Place::Queue, id).join(SENDING);
        File::create(&path)?.sync_all()?;
        sync_dir(&self.path(Place::Queue, id))
    }

    /// Whether `id` was marked sending, and clear the mark.
    pub fn clear_sending(&self, id: &str) -> bool {
        fs::remove_file(self.path(Place::Queue, id).join(SENDING)).is_ok()
    }

    /// Remove `id` from `place` for good (delivered, reported, dropped):
    /// one rename out of `place`, synced, then the files go.
    pub fn retire(&self, place: Place, id: &str) -> io::Result<()> {
        if !valid_id(id) {
            return Err(bad_id(id));
        }
        let gone = self.dir.join("tmp").join(format!("{id}gone"));
        fs::rename(self.path(place, id), &gone)?;
        sync_dir(&self.dir.join(place.dir()))?;
        fs::remove_dir_all(&gone)
    }

    /// Move `id` from `queue/` to `dead/`, saying why.
    pub fn bury(&self, id: &str, mut status: Status, why: &str) -> io::Result<()> {
        status.dead_because = Some(why.to_string());
        self.save_status(Place::Queue, id, &status)?;
        fs::rename(self.path(Place::Queue, id), self.path(Place::Dead, id))?;
        sync_dir(&self.dir.join("dead"))?;
        sync_dir(&self.dir.join("queue"))
    }

    /// Ask for `id` to be tried now: a dead message goes back to the
    /// queue with its attempts forgotten and a fresh `max_age_h`. The
    /// worker sees the request within a second.
    pub fn request_retry(&self, id: &str) -> io::Result<()> {
        match self.find(id) {
            Some(Place::Dead) => {
                let (_, mut status) = self.load(Place::Dead, id)?;
                status.attempts = 0;
                status.panics = 0;
                status.next_attempt_at = 0;
                status.dead_because = None;
                status.retried_at = Some(now());
                self.save_status(Place::Dead, id, &status)?;
                fs::rename(self.path(Place::Dead, id), self.path(Place::Queue, id))?;
                sync_dir(&self.dir.join("queue"))?;
            }
            Some(Place::Queue) => {}
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no message {id} in the spool"),
                ))
            }
        }
        File::create(self.dir.join("retry").join(id)).map(|_| ())
    }

    /// The retry requests made since the last call; each is taken once.
    pub fn take_retry_requests(&self) -> Vec<String> {
        let dir = self.dir.join("retry");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| fs::remove_file(dir.join(id)).is_ok() && valid_id(id))
            .collect()
    }
}

/// A message being written; nothing of it is in the queue until
/// [`Draft::commit`].
pub struct Draft {
    queue: Queue,
    pub id: String,
    dir: PathBuf,
    file: Option<File>,
    pub size: u64,
}

impl Draft {
    /// Append to the message (blocking: call from a blocking task).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("closed"))?;
        file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Make the message and its envelope durable and put them in the
    /// queue (blocking). Returns the id.
    pub fn commit(mut self, mut envelope: Envelope) -> io::Result<String> {
        let file = self.file.take().ok_or_else(|| io::Error::other("closed"))?;
        file.sync_all()?;
        drop(file);
        envelope.id = self.id.clone();
        envelope.size = self.size;
        let bytes = serde_json::to_vec_pretty(&envelope).map_err(io::Error::other)?;
        let mut f = create_private(&self.dir.join(ENVELOPE))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        sync_dir(&self.dir)?;
        let target = self.queue.path(Place::Queue, &self.id);
        fs::rename(&self.dir, &target)?;
        sync_dir(&self.queue.dir.join("queue"))?;
        self.dir = target;
        Ok(std::mem::take(&mut self.id))
    }
}

impl Drop for Draft {
    /// A draft never committed is removed.
    fn drop(&mut self) {
        if !self.id.is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            id: String::new(),
            account: "scanner@contoso.test".into(),
            mailbox: "scanner@contoso.test".into(),
            relay: false,
            sender: "scanner@contoso.test".into(),
            recipients: vec!["a@b.test".into(), "c@d.test".into()],
            params: vec![],
            received_at: now(),
            client: "192.0.2.1".into(),
            helo: "printer".into(),
            size: 0,
            report: false,
        }
    }

    #[test]
    fn a_message_is_in_the_queue_only_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let mut d = q.draft().unwrap();
        d.write(b"Subject: x\r\n\r\nhi\r\n").unwrap();
        assert!(q.ids(Place::Queue).unwrap().is_empty());
        let id = d.commit(envelope()).unwrap();
        assert_eq!(q.ids(Place::Queue).unwrap(), std::slice::from_ref(&id));
        let (env, status) = q.load(Place::Queue, &id).unwrap();
        assert_eq!(
            (env.size, env.id.as_str(), status.attempts),
            (18, id.as_str(), 0)
        );
        assert_eq!(
            fs::read(q.message_path(Place::Queue, &id)).unwrap(),
            b"Subject: x\r\n\r\nhi\r\n"
        );
        // An abandoned draft leaves nothing; a leftover in tmp/ stays when
        // the spool is opened again (a running server's draft, to `check`)
        // and goes when the server that owns it clears it at start.
        drop(q.draft().unwrap());
        std::mem::forget(q.draft().unwrap());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        let q = Queue::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        q.clear_drafts();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(q.ids(Place::Queue).unwrap().len(), 1);
        let mode = fs::metadata(q.message_path(Place::Queue, &id)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn status_dead_letters_retries_and_retirement() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let id = q.draft().unwrap().commit(envelope()).unwrap();
        let (env, mut status) = q.load(Place::Queue, &id).unwrap();
        status.done.push("A@B.test".into());
        status.attempts = 3;
        q.save_status(Place::Queue, &id, &status).unwrap();
        let (_, status) = q.load(Place::Queue, &id).unwrap();
        assert_eq!(env.pending(&status).collect::<Vec<_>>(), ["c@d.test"]);
        q.mark_sending(&id).unwrap();
        assert!(q.clear_sending(&id));
        assert!(!q.clear_sending(&id));
        q.bury(&id, status, "bounce undeliverable").unwrap();
        assert_eq!(q.find(&id), Some(Place::Dead));
        q.request_retry(&id).unwrap();
        assert_eq!(q.find(&id), Some(Place::Queue));
        let (env, status) = q.load(Place::Queue, &id).unwrap();
        // A fresh max_age_h, even for a message that arrived long ago.
        assert!(status.age_from(env.received_at - 3600) >= now() - 1);
        assert_eq!((status.attempts, status.dead_because), (0, None));
        assert_eq!(q.take_retry_requests(), std::slice::from_ref(&id));
        assert!(q.take_retry_requests().is_empty());
        q.retire(Place::Queue, &id).unwrap();
        assert_eq!(q.find(&id), None);
        assert!(q.request_retry(&id).is_err());
        assert!(q.load(Place::Queue, "../x").is_err());
    }
}
