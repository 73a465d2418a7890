//! `Config`: where the WAL lives and the bounds it enforces.

use crate::Error;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Smallest accepted `segment_bytes_max`.
const SEGMENT_BYTES_MAX_MIN: u64 = 4 * 1024;

/// Configuration of a [`crate::Wal`]. Build with [`Config::new`], adjust fields, and `Wal::open`
/// calls [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory holding segments and meta files; created if missing. No default.
    pub dir: PathBuf,
    /// Size in bytes at which the active segment is sealed and a new one started.
    /// Default 64 MiB; at least 4 KiB. A single batch larger than this still goes into one
    /// segment, so a segment may exceed it by one batch. Segments are preallocated: the active
    /// segment's file is this long (zero-filled past its last frame), and once it is a quarter
    /// full a second file of this size is zero-filled in the background for its successor,
    /// 1 MiB and one fdatasync at a time with a pause after each (see `segment.rs`).
    pub segment_bytes_max: u64,
    /// Largest payload of one entry, in bytes. Default 16 MiB; at least 1, at most 1 GiB.
    /// Appends of larger entries fail with `Error::EntryTooLarge`; recovery treats a frame
    /// claiming a larger length as invalid without allocating for it.
    pub frame_bytes_max: u32,
    /// Bound in bytes of the in-memory read cache. Default 8 MiB; 0 is allowed. Reserved: this
    /// version keeps no payload cache and every read is a `pread` (served by the OS page cache).
    pub read_cache_bytes_max: usize,
    /// An fsync slower than this many milliseconds logs a `warn`. Default 50; at least 1.
    pub fsync_warn_ms: u64,
    /// Whether opening a log with no segment at once starts zero-filling its first segment in
    /// the background, so appends to a fresh log get the preallocated (data-only) fdatasync
    /// from the start. Default false: a short-lived log (tests, tools) would write
    /// `segment_bytes_max` of zeros it never uses. Servers turn it on.
    pub prepare_first_segment: bool,
    /// Called with the duration of every fdatasync of a segment on the append path: each group
    /// commit, and each seal of a full segment before the next one starts. Default `None`. It
    /// runs on the syncing thread while appenders wait for that sync, so it must be quick and
    /// must not call back into the `Wal`.
    pub fsync_observer: Option<FsyncObserver>,
}

/// A callback receiving the duration of each segment fdatasync (see
/// [`Config::fsync_observer`]). It keeps the log free of any metrics library: the embedding
/// program decides where durations go.
#[derive(Clone)]
pub struct FsyncObserver(Arc<dyn Fn(Duration) + Send + Sync>);

impl FsyncObserver {
    /// Wraps `observe`, which is called once per segment fdatasync with its duration.
    pub fn new(observe: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        FsyncObserver(Arc::new(observe))
    }

    /// Reports one fdatasync that took `took`.
    pub(crate) fn observe(&self, took: Duration) {
        (self.0)(took)
    }
}

impl fmt::Debug for FsyncObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FsyncObserver(..)")
    }
}

/// Two observers are equal when they are the same callback, so a `Config` compares equal to its
/// clone.
impl PartialEq for FsyncObserver {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for FsyncObserver {}

impl Config {
    /// A configuration with every default, storing the WAL in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Config {
            dir: dir.into(),
            segment_bytes_max: 64 * 1024 * 1024,
            frame_bytes_max: 16 * 1024 * 1024,
            read_cache_bytes_max: 8 * 1024 * 1024,
            fsync_warn_ms: 50,
            prepare_first_segment: false,
            fsync_observer: None,
        }
    }

    /// Checks every bound stated in the field docs.
    ///
    /// # Errors
    ///
    /// `Error::InvalidConfig` naming the first field out of bounds.
    pub fn validate(&self) -> Result<(), Error> {
        if self.dir.as_os_str().is_empty() {
            return Err(Error::InvalidConfig("dir must not be empty".into()));
        }
        if self.segment_bytes_max < SEGMENT_BYTES_MAX_MIN {
            return Err(Error::InvalidConfig(format!(
                "segment_bytes_max {} is below the minimum {SEGMENT_BYTES_MAX_MIN}",
                self.segment_bytes_max
            )));
        }
        if self.frame_bytes_max == 0 || self.frame_bytes_max > 1 << 30 {
            return Err(Error::InvalidConfig(format!(
                "frame_bytes_max {} is outside 1..=1073741824",
                self.frame_bytes_max
            )));
        }
        if self.fsync_warn_ms == 0 {
            return Err(Error::InvalidConfig(
                "fsync_warn_ms must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test]
    fn defaults_are_valid() {
        Config::new("/tmp/x").validate().expect("defaults valid");
    }

    #[test_case(|c: &mut Config| c.segment_bytes_max = 4095; "segment too small")]
    #[test_case(|c: &mut Config| c.frame_bytes_max = 0; "zero frame max")]
    #[test_case(|c: &mut Config| c.fsync_warn_ms = 0; "zero fsync warn")]
    #[test_case(|c: &mut Config| c.dir = PathBuf::new(); "empty dir")]
    fn out_of_bounds_is_rejected(edit: fn(&mut Config)) {
        let mut config = Config::new("/tmp/x");
        edit(&mut config);
        assert!(matches!(config.validate(), Err(Error::InvalidConfig(_))));
    }
}
