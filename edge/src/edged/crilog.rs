//! Container log files in the CRI format (what the kubelet reads from
//! containerd): one entry per line, `<RFC 3339 time> <stdout|stderr> <F|P>
//! <content>`. `F` ends a line of the container's output, `P` is a part of
//! one (the container wrote no newline yet, or the line is longer than
//! [`MAX_ENTRY`]). Concatenating the contents, with a newline after each
//! `F`, gives back exactly what the container wrote to each stream.
//!
//! The process runtime pipes a container's stdout and stderr through
//! [`copy`], which stamps each entry with the time it was read; `kubectl
//! logs --timestamps` and `--since` use those times.

use std::io;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

/// Longest content of one entry; a longer line becomes several `P` entries.
pub(crate) const MAX_ENTRY: usize = 16 << 10;

/// One parsed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry<'a> {
    /// The entry's time, as written.
    pub stamp: &'a [u8],
    /// When, parsed (`None` for a line that is not a CRI entry).
    pub time: Option<OffsetDateTime>,
    /// Whether it was written to stderr (else stdout).
    pub stderr: bool,
    /// Whether the content ends a line.
    pub full: bool,
    pub content: &'a [u8],
}

/// Parses one line of a log file (without its newline). A line that is not
/// a CRI entry (a log written by an older edgecore) is passed through as a
/// whole line without a time.
pub(crate) fn parse(line: &[u8]) -> Entry<'_> {
    let raw = Entry {
        stamp: b"",
        time: None,
        stderr: false,
        full: true,
        content: line,
    };
    let mut parts = line.splitn(4, |b| *b == b' ');
    let (Some(stamp), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        return raw;
    };
    let content = parts.next().unwrap_or_default();
    let time = std::str::from_utf8(stamp)
        .ok()
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok());
    let full = match tag {
        b"F" => true,
        b"P" => false,
        _ => return raw,
    };
    if time.is_none() || !matches!(stream, b"stdout" | b"stderr") {
        return raw;
    }
    Entry {
        stamp,
        time,
        stderr: stream == b"stderr",
        full,
        content,
    }
}

/// The bytes `kubectl logs` shows for `entry` (its time first, with
/// `timestamps`).
pub(crate) fn render(entry: &Entry<'_>, timestamps: bool, out: &mut Vec<u8>) {
    if timestamps && !entry.stamp.is_empty() {
        out.extend_from_slice(entry.stamp);
        out.push(b' ');
    }
    out.extend_from_slice(entry.content);
    if entry.full {
        out.push(b'\n');
    }
}

/// Appends the entries for `data`, read from `stream` at `now`: complete
/// lines as `F`, a trailing part as `P` (the next entry of the stream
/// continues its line).
fn encode(stream: &str, now: OffsetDateTime, data: &[u8], out: &mut Vec<u8>) {
    let stamp = now
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned());
    let mut rest = data;
    while !rest.is_empty() {
        let newline = rest.iter().position(|b| *b == b'\n');
        let (content, full, used) = match newline {
            Some(i) if i <= MAX_ENTRY => (rest.get(..i).unwrap_or_default(), true, i + 1),
            _ => {
                let n = rest.len().min(MAX_ENTRY);
                (rest.get(..n).unwrap_or_default(), false, n)
            }
        };
        out.extend_from_slice(stamp.as_bytes());
        out.push(b' ');
        out.extend_from_slice(stream.as_bytes());
        out.extend_from_slice(if full { b" F " } else { b" P " });
        out.extend_from_slice(content);
        out.push(b'\n');
        rest = rest.get(used..).unwrap_or_default();
    }
}

/// How a log file rotates (as the kubelet's `containerLogMaxSize` and
/// `containerLogMaxFiles`): once it holds `max_size` bytes it is renamed
/// `<path>.1` (`.1` to `.2`, and so on; beyond `max_files - 1` they are
/// removed) and a new file starts at `path`.
#[derive(Debug, Clone)]
pub(crate) struct Rotation {
    pub path: std::path::PathBuf,
    pub max_size: u64,
    pub max_files: u32,
}

impl Rotation {
    fn rotated(&self, n: u32) -> std::path::PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        name.into()
    }

    /// Moves the current file aside and opens a new one at `path`.
    async fn rotate(&self) -> io::Result<tokio::fs::File> {
        self.move_aside().await?;
        tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
    }

    /// Moves the current file aside (to `.1`, the older ones up, the
    /// oldest beyond `max_files` removed); the writer starts a new one.
    pub(crate) async fn move_aside(&self) -> io::Result<()> {
        let keep = self.max_files.saturating_sub(1);
        match tokio::fs::remove_file(self.rotated(keep.max(1))).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..keep).rev() {
            match tokio::fs::rename(self.rotated(n), self.rotated(n + 1)).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if keep >= 1 {
            tokio::fs::rename(&self.path, self.rotated(1)).await
        } else {
            tokio::fs::remove_file(&self.path).await
        }
    }
}

/// Reads a log file's entries as they are written, and on into the new
/// file after a rotation (the old one read to its end first).
#[derive(Debug)]
pub(crate) struct Reader {
    path: std::path::PathBuf,
    file: tokio::fs::File,
    /// Bytes of a line not complete yet (a writer is inside it).
    line: Vec<u8>,
    /// The new file after a rotation, once the old one is read.
    next: Option<tokio::fs::File>,
    buf: Vec<u8>,
    /// Where in the file the next read starts, and where reading stops.
    pos: u64,
    end: Option<u64>,
}

impl Reader {
    pub(crate) async fn open(path: &std::path::Path) -> io::Result<Reader> {
        // A rotation moves the file aside before it creates the new one: a
        // reader arriving in between waits for the new one a little.
        let mut tries = 0;
        let file = loop {
            match tokio::fs::File::open(path).await {
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 10 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                r => break r?,
            }
        };
        Ok(Reader {
            path: path.to_owned(),
            file,
            line: Vec::new(),
            next: None,
            buf: vec![0u8; 64 << 10],
            pos: 0,
            end: None,
        })
    }

    /// The file being read.
    pub(crate) fn file(&mut self) -> &mut tokio::fs::File {
        &mut self.file
    }

    /// Reads from `to` on.
    pub(crate) async fn seek(&mut self, to: std::io::SeekFrom) -> io::Result<()> {
        use tokio::io::AsyncSeekExt as _;
        self.pos = self.file.seek(to).await?;
        Ok(())
    }

    /// Reads no further than byte `end` of the file (what it held when a
    /// request came, for an answer that does not follow).
    pub(crate) fn stop_at(&mut self, end: u64) {
        self.end = Some(end);
    }

    /// Reads what the file holds now, giving each complete entry to
    /// `each` (a line longer than any edgecore writes is given as it is,
    /// as a part); false at the end of the file.
    pub(crate) async fn read(&mut self, mut each: impl FnMut(&Entry<'_>)) -> io::Result<bool> {
        let want = self.end.map_or(self.buf.len(), |end| {
            usize::try_from(end.saturating_sub(self.pos))
                .map_or(self.buf.len(), |left| left.min(self.buf.len()))
        });
        let n = match self.buf.get_mut(..want) {
            Some(buf) if want > 0 => self.file.read(buf).await?,
            _ => 0,
        };
        if n == 0 {
            return Ok(false);
        }
        self.pos += n as u64;
        let mut rest = self.buf.get(..n).unwrap_or_default();
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            self.line
                .extend_from_slice(rest.get(..i).unwrap_or_default());
            rest = rest.get(i + 1..).unwrap_or_default();
            each(&parse(&self.line));
            self.line.clear();
        }
        self.line.extend_from_slice(rest);
        if self.line.len() > 4 * MAX_ENTRY {
            each(&Entry {
                stamp: b"",
                time: None,
                stderr: false,
                full: false,
                content: &self.line,
            });
            self.line.clear();
        }
        Ok(true)
    }

    /// An unfinished last line (an older, plain log without its newline).
    pub(crate) fn partial(&self) -> &[u8] {
        &self.line
    }

    /// At the end of the file: whether to read again because the log was
    /// rotated (the old file is read once more to its end, for what was
    /// written just before the rotation, then the new one).
    pub(crate) async fn rotated(&mut self) -> io::Result<bool> {
        if let Some(new) = self.next.take() {
            self.file = new;
            self.line.clear();
            self.pos = 0;
            return Ok(true);
        }
        if rotated(&self.file, &self.path).await {
            self.next = Some(next_after(&self.file, &self.path).await?);
            return Ok(true);
        }
        Ok(false)
    }
}

/// The log file written after the one `f` reads, which was rotated away
/// from `path`: when it has been moved to `path.k` (rotated `k` times
/// since), `path.{k-1}`, or `path` itself for `k = 1`. A follower that
/// fell behind by more than one rotation thus reads every file in turn
/// instead of jumping to the newest. If `f` is gone (rotated past the
/// files kept), the oldest file kept.
async fn next_after(f: &tokio::fs::File, path: &std::path::Path) -> io::Result<tokio::fs::File> {
    use std::os::unix::fs::MetadataExt as _;
    let name = |k: u32| -> std::path::PathBuf {
        if k == 0 {
            return path.to_owned();
        }
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{k}"));
        name.into()
    };
    let open = f.metadata().await?;
    // Files move up while this looks: a few tries.
    for _ in 0..4 {
        let mut oldest = None;
        let mut found = None;
        for k in 1..=MAX_ROTATED {
            match tokio::fs::metadata(name(k)).await {
                Ok(m) if m.ino() == open.ino() && m.dev() == open.dev() => {
                    found = Some(k);
                    break;
                }
                Ok(_) => oldest = Some(k),
                Err(_) => break,
            }
        }
        let next = match (found, oldest) {
            (Some(k), _) => name(k - 1),
            (None, Some(k)) => name(k),
            (None, None) => name(0),
        };
        match tokio::fs::File::open(&next).await {
            Ok(file) => return Ok(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    tokio::fs::File::open(path).await
}

/// The most rotated files a follower looks through.
const MAX_ROTATED: u32 = 64;

/// Whether the file at `path` is no longer the one `f` reads (the log was
/// rotated: a new file is there).
async fn rotated(f: &tokio::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (f.metadata().await, tokio::fs::metadata(path).await) {
        (Ok(open), Ok(now)) => open.ino() != now.ino() || open.dev() != now.dev(),
        _ => false,
    }
}

/// Copies a container's stdout and stderr into its log file until both
/// end (the container and everything it started closed them), rotating
/// it by `rotation`. Each read becomes whole entries written at once, so a
/// reader never sees an entry of one stream cut by one of the other.
pub(crate) async fn copy(
    mut stdout: impl AsyncRead + Unpin,
    mut stderr: impl AsyncRead + Unpin,
    mut file: tokio::fs::File,
    rotation: &Rotation,
) -> io::Result<()> {
    let mut size = file.metadata().await?.len();
    let mut out_buf = vec![0u8; MAX_ENTRY];
    let mut err_buf = vec![0u8; MAX_ENTRY];
    let (mut out_open, mut err_open) = (true, true);
    let mut entries = Vec::with_capacity(2 * MAX_ENTRY);
    while out_open || err_open {
        // stdout first when both are ready: a shell's `echo a; echo b >&2`
        // then keeps its order.
        let (stream, read) = tokio::select! {
            biased;
            r = stdout.read(&mut out_buf), if out_open => ("stdout", r.map(|n| (n, true))),
            r = stderr.read(&mut err_buf), if err_open => ("stderr", r.map(|n| (n, false))),
        };
        let (n, is_out) = read?;
        if n == 0 {
            if is_out {
                out_open = false;
            } else {
                err_open = false;
            }
            continue;
        }
        let buf = if is_out { &out_buf } else { &err_buf };
        entries.clear();
        encode(
            stream,
            OffsetDateTime::now_utc(),
            buf.get(..n).unwrap_or_default(),
            &mut entries,
        );
        if size > 0 && size + entries.len() as u64 > rotation.max_size {
            file.flush().await?;
            file = rotation.rotate().await?;
            size = 0;
        }
        file.write_all(&entries).await?;
        size += entries.len() as u64;
    }
    file.flush().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn decode(file: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in file.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            render(&parse(line), false, &mut out);
        }
        out
    }

    #[test]
    fn entries_give_back_what_was_written() {
        let now = OffsetDateTime::now_utc();
        let long = vec![b'x'; MAX_ENTRY * 2 + 5];
        for data in [
            &b"hello\nworld\n"[..],
            b"no newline",
            b"\n\n",
            b"a b c F P\n",
            &long,
        ] {
            let mut file = Vec::new();
            encode("stdout", now, data, &mut file);
            assert_eq!(decode(&file), data, "{:?}", String::from_utf8_lossy(data));
        }
        // A line split over two reads joins again.
        let mut file = Vec::new();
        encode("stdout", now, b"par", &mut file);
        encode("stdout", now, b"t\nnext\n", &mut file);
        assert_eq!(decode(&file), b"part\nnext\n");
    }

    #[tokio::test]
    async fn a_log_rotates_keeping_its_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let rotation = Rotation {
            path: path.clone(),
            max_size: 1000,
            max_files: 3,
        };
        let file = tokio::fs::File::create(&path).await.unwrap();
        // 100 lines of ~50 bytes, each read on its own.
        let (mut w, r) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            for i in 0..100 {
                w.write_all(format!("line {i:03}\n").as_bytes())
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        });
        copy(r, tokio::io::empty(), file, &rotation).await.unwrap();
        writer.await.unwrap();
        let read = |p: &std::path::Path| decode(&std::fs::read(p).unwrap());
        let (current, one, two) = (
            read(&path),
            read(&rotation.rotated(1)),
            read(&rotation.rotated(2)),
        );
        assert!(!rotation.rotated(3).exists());
        for f in [&path, &rotation.rotated(1), &rotation.rotated(2)] {
            assert!(std::fs::metadata(f).unwrap().len() <= 1000);
        }
        // Oldest first, nothing lost inside what is kept, the newest last.
        let kept = [two, one, current].concat();
        let text = String::from_utf8(kept).unwrap();
        assert!(text.ends_with("line 099\n"), "{text}");
        // (The oldest kept file may begin inside a line.)
        let numbers: Vec<u32> = text
            .lines()
            .skip_while(|l| !l.starts_with("line "))
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        assert!(numbers.len() < 100, "older lines were dropped");
    }

    #[test]
    fn timestamps_and_times_parse() {
        let now = OffsetDateTime::now_utc();
        let mut file = Vec::new();
        encode("stderr", now, b"oops\n", &mut file);
        let line = file.strip_suffix(b"\n").unwrap();
        let e = parse(line);
        assert_eq!(e.time, Some(now));
        assert!(e.full);
        let mut out = Vec::new();
        render(&e, true, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("Z oops\n"), "{text}");
        // Lines of an older, plain log pass through whole.
        let plain = parse(b"just a line");
        assert_eq!((plain.time, plain.content), (None, &b"just a line"[..]));
        assert_eq!(parse(b"2026-01-01T00:00:00Z stdin F x").time, None);
    }

    /// A follower more than one rotation behind reads every file in turn:
    /// after the one it read (now `.2`), `.1`, then the current one.
    #[tokio::test]
    async fn a_follower_behind_by_two_rotations_reads_the_file_between() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let rotation = Rotation {
            path: path.clone(),
            max_size: 1,
            max_files: 4,
        };
        tokio::fs::write(&path, "2026-01-01T00:00:00Z stdout F first\n")
            .await
            .unwrap();
        let mut r = Reader::open(&path).await.unwrap();
        let mut text = Vec::new();
        let drain = async |r: &mut Reader, text: &mut Vec<u8>| {
            while r.read(|e| render(e, false, text)).await.unwrap() {}
        };
        drain(&mut r, &mut text).await;
        for (n, line) in ["second", "third"].iter().enumerate() {
            rotation.move_aside().await.unwrap();
            let entry = format!("2026-01-01T00:00:0{n}Z stdout F {line}\n");
            tokio::fs::write(&path, entry).await.unwrap();
        }
        // Behind by two rotations: the old file ends, then `.1`, then the
        // current one.
        for _ in 0..4 {
            if !r.rotated().await.unwrap() {
                break;
            }
            drain(&mut r, &mut text).await;
        }
        assert_eq!(String::from_utf8_lossy(&text), "first\nsecond\nthird\n");
    }
}
