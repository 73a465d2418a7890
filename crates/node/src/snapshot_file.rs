//! `SnapshotFile`: openraft's snapshot handle, a file on disk that remembers its path.
//!
//! openraft streams a snapshot by reading and seeking its handle, and hands a received snapshot
//! back as the same kind of handle. Keeping the path lets `install_snapshot` move the received
//! file into place instead of copying it through memory.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// An open snapshot file and its path.
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
}

impl SnapshotFile {
    /// Opens an existing snapshot file for reading.
    ///
    /// # Errors
    /// Any io error from opening the file.
    pub async fn open(path: &Path) -> io::Result<SnapshotFile> {
        let file = tokio::fs::File::open(path).await?;
        let path = path.to_path_buf();
        Ok(SnapshotFile { file, path })
    }

    /// Creates (or truncates) a file to receive a snapshot into.
    ///
    /// # Errors
    /// Any io error from creating the file.
    pub async fn create(path: &Path) -> io::Result<SnapshotFile> {
        let mut options = tokio::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(true);
        let file = options.open(path).await?;
        let path = path.to_path_buf();
        Ok(SnapshotFile { file, path })
    }

    /// Where the file lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes buffered writes and fsyncs the file.
    ///
    /// # Errors
    /// Any io error from flushing or syncing.
    pub async fn sync(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        self.file.sync_all().await
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}
