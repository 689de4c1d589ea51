//! The local, append-only spool of usage records.
//!
//! Records are JSON lines in numbered segment files (`usage-00000001.jsonl`, …). The writer
//! appends each record with one `write(2)` under a lock, so a record the client has seen the end
//! of is in the kernel before the last byte goes out (it survives a `SIGKILL`; `fsync` runs every
//! [`FSYNC_EVERY`] against power loss). Each process start opens a new segment, so a line torn by
//! a crash is always the last line of a sealed segment: the reader skips it with a log line.
//! The reader's position lives in `committed`, moved only after the store committed the records
//! before it.

use super::UsageRecord;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A segment is closed for writing past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// How often appended records are flushed to the disk itself.
pub const FSYNC_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("usage spool {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

fn segment_name(seq: u64) -> String {
    format!("usage-{seq:08}.jsonl")
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("usage-")?.strip_suffix(".jsonl")?.parse().ok()
}

/// Segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment_seq(&e.file_name().to_string_lossy()))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

struct Segment {
    seq: u64,
    file: File,
    size: u64,
    dirty: bool,
}

pub struct UsageSpool {
    dir: PathBuf,
    writer: Mutex<Segment>,
    /// The segment being written (the reader must not treat its tail as torn).
    writing: AtomicU64,
}

impl UsageSpool {
    /// Open the spool in `dir` (created if needed) and start a new segment.
    pub fn open(dir: &Path) -> Result<UsageSpool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let next = segments(dir).map_err(io_err(dir))?.last().map_or(1, |s| s + 1);
        let segment = Self::create(dir, next)?;
        Ok(UsageSpool {
            dir: dir.to_owned(),
            writing: AtomicU64::new(next),
            writer: Mutex::new(segment),
        })
    }

    fn create(dir: &Path, seq: u64) -> Result<Segment, SpoolError> {
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Segment {
            seq,
            file,
            size: 0,
            dirty: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append one record. Returns once the record is in the kernel's page cache.
    pub fn append(&self, record: &UsageRecord) -> Result<(), SpoolError> {
        let mut line = Vec::with_capacity(640);
        serde_json::to_writer(&mut line, record).map_err(|e| SpoolError::Io {
            path: self.dir.clone(),
            source: e.into(),
        })?;
        line.push(b'\n');
        let mut w = self.writer.lock().map_err(|_| SpoolError::Io {
            path: self.dir.clone(),
            source: io::Error::other("spool lock poisoned"),
        })?;
        if w.size + line.len() as u64 > SEGMENT_BYTES && w.size > 0 {
            let _ = w.file.sync_data();
            let next = w.seq + 1;
            *w = Self::create(&self.dir, next)?;
            self.writing.store(next, Ordering::Release);
        }
        if let Err(e) = w.file.write_all(&line) {
            return Err(io_err(&self.dir.join(segment_name(w.seq)))(e));
        }
        w.size += line.len() as u64;
        w.dirty = true;
        Ok(())
    }

    /// Flush appended records to disk (every [`FSYNC_EVERY`] and at shutdown). The flush runs on
    /// a second handle of the file, so appends never wait for the disk.
    pub fn sync(&self) {
        let handle = match self.writer.lock() {
            Ok(mut w) if w.dirty => {
                w.dirty = false;
                w.file.try_clone().ok()
            }
            _ => None,
        };
        if let Some(file) = handle {
            let _ = file.sync_data();
        }
    }

    pub fn writing_segment(&self) -> u64 {
        self.writing.load(Ordering::Acquire)
    }
}

/// Where the reader is: the next unread byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub seq: u64,
    pub offset: u64,
}

/// A batch read from the spool, and where the reader will be once it is committed.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<UsageRecord>,
    pub next: Position,
}

/// Reads what the writer appended, in order, from the committed position.
pub struct SpoolReader {
    dir: PathBuf,
    position: Position,
}

impl SpoolReader {
    pub fn open(dir: &Path) -> Result<SpoolReader, SpoolError> {
        let position = match std::fs::read_to_string(dir.join("committed")) {
            Ok(text) => {
                let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
                match (parts.next().flatten(), parts.next().flatten()) {
                    (Some(seq), Some(offset)) => Position { seq, offset },
                    _ => Position::default(),
                }
            }
            Err(_) => Position::default(),
        };
        Ok(SpoolReader {
            dir: dir.to_owned(),
            position,
        })
    }

    pub fn position(&self) -> Position {
        self.position
    }

    /// Up to `max` records after the committed position. `writing` is the segment the writer
    /// is on: an incomplete last line there is still being written; anywhere else it is torn.
    pub fn read(&self, max: usize, writing: u64) -> Result<Batch, SpoolError> {
        let mut batch = Batch {
            records: Vec::new(),
            next: self.position,
        };
        let seqs = segments(&self.dir).map_err(io_err(&self.dir))?;
        for seq in seqs.into_iter().filter(|s| *s >= self.position.seq) {
            let path = self.dir.join(segment_name(seq));
            let mut file = File::open(&path).map_err(io_err(&path))?;
            let mut offset = if seq == self.position.seq {
                self.position.offset
            } else {
                0
            };
            file.seek(SeekFrom::Start(offset)).map_err(io_err(&path))?;
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            loop {
                if batch.records.len() >= max {
                    return Ok(batch);
                }
                line.clear();
                let n = reader.read_until(b'\n', &mut line).map_err(io_err(&path))?;
                if n == 0 {
                    break;
                }
                if line.last() != Some(&b'\n') {
                    if seq == writing {
                        // Being written right now: read it next time.
                        return Ok(batch);
                    }
                    tracing::warn!(segment = %path.display(), offset, "skipping a torn last line of {n} bytes in the usage spool");
                    offset += n as u64;
                    batch.next = Position { seq, offset };
                    break;
                }
                offset += n as u64;
                match serde_json::from_slice::<UsageRecord>(&line) {
                    Ok(record) => batch.records.push(record),
                    Err(e) => {
                        tracing::warn!(segment = %path.display(), offset, "skipping an unreadable usage spool line: {e}")
                    }
                }
                batch.next = Position { seq, offset };
            }
            if seq == writing {
                break;
            }
            // A sealed segment read to its end: the next batch starts in the following one.
            batch.next = Position {
                seq: seq + 1,
                offset: 0,
            };
        }
        Ok(batch)
    }

    /// Record that everything before `next` is in the store, and delete sealed segments that
    /// are wholly committed. The position is replaced atomically (rename) but not flushed to
    /// disk: after a power loss an older position only replays records the store skips.
    pub fn commit(&mut self, next: Position) -> Result<(), SpoolError> {
        let tmp = self.dir.join("committed.tmp");
        let path = self.dir.join("committed");
        std::fs::write(&tmp, format!("{} {}\n", next.seq, next.offset)).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        let moved_segment = next.seq != self.position.seq;
        self.position = next;
        if moved_segment {
            for seq in segments(&self.dir).map_err(io_err(&self.dir))? {
                if seq < next.seq {
                    let _ = std::fs::remove_file(self.dir.join(segment_name(seq)));
                }
            }
        }
        Ok(())
    }

    /// Bytes appended but not yet committed, and the creation time of the oldest such record.
    pub fn backlog(&self) -> (u64, Option<chrono::DateTime<chrono::Utc>>) {
        let mut bytes = 0;
        let mut oldest = None;
        if let Ok(seqs) = segments(&self.dir) {
            for seq in seqs.into_iter().filter(|s| *s >= self.position.seq) {
                let path = self.dir.join(segment_name(seq));
                let Ok(meta) = std::fs::metadata(&path) else { continue };
                let start = if seq == self.position.seq {
                    self.position.offset
                } else {
                    0
                };
                let pending = meta.len().saturating_sub(start);
                if pending > 0 && oldest.is_none() {
                    oldest = first_record_time(&path, start);
                }
                bytes += pending;
            }
        }
        (bytes, oldest)
    }
}

fn first_record_time(path: &Path, offset: u64) -> Option<chrono::DateTime<chrono::Utc>> {
    let mut file = File::open(path).ok()?;
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut line = Vec::new();
    BufReader::new(file.take(1 << 20)).read_until(b'\n', &mut line).ok()?;
    serde_json::from_slice::<UsageRecord>(&line).ok().map(|r| r.created_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(id: &str) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            account_id: "acct_1".into(),
            key_id: Some("key_1".into()),
            created_at: chrono::Utc::now(),
            route: "chat_completions".into(),
            requested_model: Some("gpt-4o-mini".into()),
            routed_model: Some("gpt-4o-mini".into()),
            provider: Some("openai".into()),
            task: None,
            status: 200,
            input_tokens: 10,
            output_tokens: 5,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost_nano_usd: 4_500,
            unbilled_nano_usd: 0,
            estimated: false,
            latency_ms: 12,
            ttfb_ms: Some(3),
            cache_hit: false,
            lease_id: None,
        }
    }

    #[test]
    fn appended_records_are_read_once_committed_and_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = UsageSpool::open(dir.path()).unwrap();
        for i in 0..5 {
            spool.append(&record(&format!("r{i}"))).unwrap();
        }
        let mut reader = SpoolReader::open(dir.path()).unwrap();
        let batch = reader.read(3, spool.writing_segment()).unwrap();
        assert_eq!(
            batch.records.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(),
            ["r0", "r1", "r2"]
        );
        reader.commit(batch.next).unwrap();
        // A restart: the reader resumes after what was committed, the writer opens a new segment.
        drop(spool);
        let spool = UsageSpool::open(dir.path()).unwrap();
        spool.append(&record("r5")).unwrap();
        let reader = SpoolReader::open(dir.path()).unwrap();
        let batch = reader.read(100, spool.writing_segment()).unwrap();
        assert_eq!(
            batch.records.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(),
            ["r3", "r4", "r5"]
        );
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_later_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let spool = UsageSpool::open(dir.path()).unwrap();
        spool.append(&record("whole")).unwrap();
        let seq = spool.writing_segment();
        drop(spool);
        // A crash in the middle of a write.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(segment_name(seq)))
            .unwrap();
        f.write_all(br#"{"request_id":"torn","account_"#).unwrap();
        let spool = UsageSpool::open(dir.path()).unwrap();
        spool.append(&record("after")).unwrap();
        let mut reader = SpoolReader::open(dir.path()).unwrap();
        let batch = reader.read(100, spool.writing_segment()).unwrap();
        assert_eq!(
            batch.records.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(),
            ["whole", "after"]
        );
        reader.commit(batch.next).unwrap();
        assert!(
            !dir.path().join(segment_name(seq)).exists(),
            "a committed sealed segment is deleted"
        );
        assert_eq!(reader.read(100, spool.writing_segment()).unwrap().records.len(), 0);
    }

    #[test]
    fn an_unfinished_line_of_the_live_segment_waits() {
        let dir = tempfile::tempdir().unwrap();
        let spool = UsageSpool::open(dir.path()).unwrap();
        spool.append(&record("a")).unwrap();
        let path = dir.path().join(segment_name(spool.writing_segment()));
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"partial")
            .unwrap();
        let reader = SpoolReader::open(dir.path()).unwrap();
        let batch = reader.read(100, spool.writing_segment()).unwrap();
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.next.offset, std::fs::metadata(&path).unwrap().len() - 9);
    }
}
