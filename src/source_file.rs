//! Reading a file of the tree safely, and the encoding details a patch must keep.
//!
//! A file is read only if it is a regular file (not a FIFO that would block, not a device, not a
//! symlink that could point at `/dev/zero` or out of the tree) and no larger than
//! [`MAX_SOURCE_BYTES`]. SGLang's largest module is a few hundred KiB; the limit only stops
//! pathological files from exhausting memory.
//!
//! Encoding: a UTF-8 byte-order mark and CRLF line ends are taken off for the engine (which
//! works on LF text) and put back on what it writes, so a BOM file keeps its BOM and a CRLF file
//! gets CRLF in the injected lines too; a file with mixed line ends is left as it is.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Largest file the tool reads.
pub const MAX_SOURCE_BYTES: u64 = 16 << 20;

const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadProblem {
    Symlink,
    NotRegular,
    TooLarge(u64),
    Io(String),
}

impl fmt::Display for ReadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadProblem::Symlink => {
                write!(f, "is a symlink (refused: it could lead out of the tree)")
            }
            ReadProblem::NotRegular => write!(f, "is not a regular file (refused without reading)"),
            ReadProblem::TooLarge(n) => write!(
                f,
                "is {} MiB, over the {} MiB limit for a source file",
                n >> 20,
                MAX_SOURCE_BYTES >> 20
            ),
            ReadProblem::Io(e) => write!(f, "cannot be read: {e}"),
        }
    }
}

/// The bytes of the regular file at `path`; `Ok(None)` if nothing is there.
pub fn read_regular(path: &Path) -> Result<Option<Vec<u8>>, ReadProblem> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReadProblem::Io(e.to_string())),
    };
    if meta.file_type().is_symlink() {
        return Err(ReadProblem::Symlink);
    }
    if !meta.is_file() {
        return Err(ReadProblem::NotRegular);
    }
    // O_NOFOLLOW and O_NONBLOCK: if the path was swapped for a link or a FIFO since the check
    // above, the open fails or returns at once instead of following or blocking.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| ReadProblem::Io(e.to_string()))?;
    let meta = file
        .metadata()
        .map_err(|e| ReadProblem::Io(e.to_string()))?;
    if !meta.is_file() {
        return Err(ReadProblem::NotRegular);
    }
    if meta.len() > MAX_SOURCE_BYTES {
        return Err(ReadProblem::TooLarge(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SOURCE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadProblem::Io(e.to_string()))?;
    if bytes.len() as u64 > MAX_SOURCE_BYTES {
        return Err(ReadProblem::TooLarge(bytes.len() as u64));
    }
    Ok(Some(bytes))
}

/// What the engine's LF text drops and [`Encoding::encode`] puts back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Encoding {
    pub bom: bool,
    pub crlf: bool,
}

impl Encoding {
    /// Split `bytes` into the engine's text (no BOM, LF line ends) and what was taken off.
    /// Errors if the rest is not UTF-8.
    pub fn decode(bytes: &[u8]) -> Result<(String, Encoding), std::str::Utf8Error> {
        let (bom, body) = match bytes.strip_prefix(BOM) {
            Some(rest) => (true, rest),
            None => (false, bytes),
        };
        let text = std::str::from_utf8(body)?;
        let lf = text.matches('\n').count();
        // Only a file whose every line ends in CRLF round-trips exactly through LF text.
        let crlf = lf > 0 && text.matches("\r\n").count() == lf;
        let text = if crlf {
            text.replace("\r\n", "\n")
        } else {
            text.to_string()
        };
        Ok((text, Encoding { bom, crlf }))
    }

    /// The bytes to write for the engine's `text`.
    pub fn encode(self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len() + 3);
        if self.bom {
            out.extend_from_slice(BOM);
        }
        if self.crlf {
            out.extend_from_slice(text.replace('\n', "\r\n").as_bytes());
        } else {
            out.extend_from_slice(text.as_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bom_and_crlf_round_trip_and_mixed_files_stay_as_they_are() {
        for bytes in [
            &b"a = 1\nb = 2\n"[..],
            b"\xEF\xBB\xBFa = 1\r\nb = 2\r\n",
            b"a = 1\r\nb = 2\n",
            b"no newline",
        ] {
            let (text, enc) = Encoding::decode(bytes).unwrap();
            assert_eq!(enc.encode(&text), bytes);
        }
        let (text, enc) = Encoding::decode(b"\xEF\xBB\xBFa\r\n").unwrap();
        assert_eq!(
            (text.as_str(), enc),
            (
                "a\n",
                Encoding {
                    bom: true,
                    crlf: true
                }
            )
        );
        assert_eq!(enc.encode("a\nnew\n"), b"\xEF\xBB\xBFa\r\nnew\r\n");
        let (_, mixed) = Encoding::decode(b"a\r\nb\n").unwrap();
        assert!(!mixed.crlf);
    }

    #[test]
    fn fifos_links_and_huge_files_are_refused_without_reading() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo.py");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        assert_eq!(read_regular(&fifo), Err(ReadProblem::NotRegular));
        let link = t.path().join("zero.py");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert_eq!(read_regular(&link), Err(ReadProblem::Symlink));
        let big = t.path().join("big.py");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_SOURCE_BYTES + 1)
            .unwrap();
        assert!(matches!(read_regular(&big), Err(ReadProblem::TooLarge(_))));
        assert!(read_regular(&big)
            .unwrap_err()
            .to_string()
            .contains("limit"));
        assert_eq!(read_regular(&t.path().join("missing.py")), Ok(None));
        std::fs::write(t.path().join("ok.py"), b"x = 1\n").unwrap();
        assert_eq!(
            read_regular(&t.path().join("ok.py")),
            Ok(Some(b"x = 1\n".to_vec()))
        );
    }
}
